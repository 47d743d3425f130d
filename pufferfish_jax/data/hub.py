"""Documents from a Hugging Face dataset, streamed: `hf:NAME[:config][@split]`.

`datasets.load_dataset(..., streaming=True)` yields rows as it downloads them, so a dataset of any
size is read in bounded memory and never fully downloaded. NAME may also be a local folder of
parquet files, loaded through datasets' own `parquet` builder: the same code path, offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pufferfish_jax.data.files import Log, no_log
from pufferfish_jax.errors import DataError

_FALLBACK = "or use a local file or a built-in corpus: wiki, shakespeare, kjv"


def parse_hf(value: str) -> tuple[str, str, str]:
    """`NAME[:config][@split]` (the part after `hf:`) as (name, config, split); split defaults to train."""
    rest, _, split = value.partition("@")
    name, _, config = rest.partition(":")
    if not name.strip():
        raise DataError(f"'hf:{value}' names no dataset; write hf:NAME, hf:NAME:CONFIG or hf:NAME@SPLIT")
    return name.strip(), config.strip(), split.strip() or "train"


def load_args(name: str, config: str, split: str) -> tuple[tuple, dict]:
    """The `datasets.load_dataset` call for a spec: a hub dataset (and config), or a local folder
    of parquet files through the `parquet` builder with its files as the split's data_files."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        files = sorted(str(p) for p in folder.rglob("*.parquet"))
        if not files:
            raise DataError(f"hf:{name} is a folder without .parquet files; point it at parquet shards")
        return ("parquet",), dict(data_files={split: files}, split=split, streaming=True)
    return ((name, config) if config else (name,)), dict(split=split, streaming=True)


def read_hf(value: str, text_field: str = "text", log: Log = no_log) -> Iterator[str]:
    """The documents of `hf:value`, streamed in the dataset's order; column `text_field`."""
    name, config, split = parse_hf(value)
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{value} needs the `datasets` package and access to the Hugging Face hub "
                        f"(pip install datasets; {_FALLBACK})") from None
    args, kwargs = load_args(name, config, split)
    log(f"corpus hf:{value}: streaming split {split}")
    try:
        dataset = datasets.load_dataset(*args, **kwargs)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as e:  # datasets raises many types for offline / unknown name / bad split
        raise DataError(f"hf:{value} could not be loaded ({type(e).__name__}); check the name, config, "
                        f"split and hub access, {_FALLBACK}") from None
    if first is None:
        return
    if text_field not in first:
        raise DataError(f"hf:{value} has no '{text_field}' column (it has {', '.join(first)}); set data.text_field")
    yield from _texts(first, rows, text_field, value)


def _texts(first: dict, rows: Iterator[dict], text_field: str, value: str) -> Iterator[str]:
    row = first
    while row is not None:
        text = row.get(text_field)
        if isinstance(text, str) and text.strip():
            yield text
        try:
            row = next(rows, None)
        except Exception as e:  # a broken shard or connection mid-stream
            raise DataError(f"hf:{value} stopped mid-stream ({type(e).__name__}); rerun, or use local files") from None
