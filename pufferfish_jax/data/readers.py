"""Documents out of one local file, streamed: .txt, .jsonl, .parquet, and .gz/.zst of text or jsonl.

Every reader is a generator that holds at most one block of the file (a text block, a line, a
parquet record batch), so a corpus of any size is read in bounded memory. A file that cannot be
read (bad gzip or zstd stream, a jsonl line that is not an object with the text field, a corrupt
parquet file, non-UTF-8 bytes) raises a one-line DataError naming the file (and line): a corpus is
never silently trained on less than it names.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pufferfish_jax.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSED = (".gz", ".zst")
_WHOLE_FILE_CHARS = 64 * 1024
_CHUNK_MIN, _CHUNK_MAX = 4 * 1024, 8 * 1024
_READ_BYTES = 1 << 20
_PARQUET_ROWS = 1024


def is_supported(path: Path) -> bool:
    """.txt, .jsonl, .parquet, or .gz/.zst of a .txt or .jsonl (a bare x.gz / x.zst is jsonl)."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED:
        return suffixes[0] != ".parquet"
    return bool(suffixes) and suffixes[-1] in TEXT_SUFFIXES


def _inner_kind(path: Path) -> str:
    """'txt', 'jsonl' or 'parquet': the format under any compression suffix."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1] in COMPRESSED:
        return "txt" if len(suffixes) == 2 and suffixes[0] == ".txt" else "jsonl"
    return suffixes[-1][1:]


def _open_binary(path: Path) -> BinaryIO:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"reading {path} needs zstandard (pip install zstandard), or decompress it") from None
        return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
    return path.open("rb")


def _brief(error: Exception) -> str:
    """An exception's message on one short line, for a one-line DataError."""
    return " ".join(str(error).split())[:80]


def _blocks(path: Path) -> Iterator[bytes]:
    """The file's (decompressed) bytes in blocks; a broken compressed stream is a DataError."""
    try:
        with _open_binary(path) as f:
            while block := f.read(_READ_BYTES):
                yield block
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {_brief(e)}); fix or remove that file") from None
    except Exception as e:  # zstandard.ZstdError is not an OSError
        if type(e).__name__ != "ZstdError":
            raise
        raise DataError(f"{path} is not a valid zstd stream ({_brief(e)}); fix or remove that file") from None


def _decoded(path: Path) -> Iterator[str]:
    """The file as UTF-8 text in blocks; NUL bytes near the start or invalid UTF-8 are DataErrors."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    for block in _blocks(path):
        if offset == 0 and b"\x00" in block[:65536]:
            raise DataError(f"{path} looks binary (it has NUL bytes), not text; pass a UTF-8 text file")
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {block[e.start]:#04x} at offset {offset + e.start}); "
                            f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name}") from None
        offset += len(block)
        yield text
    try:
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path} ends inside a UTF-8 character; convert it to UTF-8 text") from None


def _cut(text: str, start: int) -> int:
    """Where the piece starting at `start` ends: a paragraph break, else a line break, else a space
    within [start + 4 KB, start + 8 KB), else start + 8 KB."""
    lo, hi = start + _CHUNK_MIN, start + _CHUNK_MAX
    return next((i + len(sep) for sep in ("\n\n", "\n", " ") if (i := text.rfind(sep, lo, hi)) >= 0), hi)


def chunked_text(blocks: Iterator[str]) -> Iterator[str]:
    """Text (given in blocks) as documents: whole when at most 64 K characters, else ~4-8 KB pieces
    that end at a paragraph, line or word break and concatenate back to the text exactly (blank
    pieces dropped). The same pieces whatever the blocks: a cut depends only on the 8 KB after the
    previous cut."""
    buffer, start, done = "", 0, False
    while not done and len(buffer) <= _WHOLE_FILE_CHARS:
        try:
            buffer += next(blocks)
        except StopIteration:
            done = True
    if done and len(buffer) <= _WHOLE_FILE_CHARS:
        if buffer.strip():
            yield buffer
        return
    while True:
        while len(buffer) - start > _CHUNK_MAX:
            cut = _cut(buffer, start)
            if buffer[start:cut].strip():
                yield buffer[start:cut]
            start = cut
        if done:
            break
        buffer = buffer[start:]
        start = 0
        try:
            buffer += next(blocks)
        except StopIteration:
            done = True
    if buffer[start:].strip():
        yield buffer[start:]


def chunk_text(text: str) -> list[str]:
    """A whole text as `chunked_text` documents."""
    return list(chunked_text(iter([text])))


def _lines(path: Path) -> Iterator[str]:
    pending = ""
    for text in _decoded(path):
        pending += text
        *whole, pending = pending.split("\n")
        yield from whole
    if pending:
        yield pending


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            text = None
        if not isinstance(text, str):
            raise DataError(f"{path}:{n} is not a JSON object with a string field '{text_field}'; "
                            "fix that line, or set data.text_field")
        if text.strip():
            yield text


def _parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to .jsonl") from None
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{path} has no '{text_field}' column (it has {', '.join(names)}); "
                            "set data.text_field")
        for batch in parquet.iter_batches(batch_size=_PARQUET_ROWS, columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, ArrowIOError, OSError ... for a corrupt file
        raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}); "
                        "fix or remove that file") from None


def read_file(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, streamed, in file order."""
    kind = _inner_kind(path)
    if kind == "txt":
        return chunked_text(_decoded(path))
    if kind == "jsonl":
        return _jsonl(path, text_field)
    return _parquet(path, text_field)

