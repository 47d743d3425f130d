"""Small file helpers every data stage shares: the progress callback type and atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from pufferfish_jax.errors import DataError

Log = Callable[[str], None]


def no_log(message: str) -> None:
    """Default `log`: library code reports progress only to a caller that asks for it."""


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Yields a temp file beside `path`, renamed over it only on success.

    Caches are trusted by their mere presence, so an interrupted write must never leave a
    truncated file under the final name. A write the disk refuses (full, read-only, no
    permission) is the user's to fix: a one-line DataError, with the temp file removed.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise DataError(f"cannot write {path} ({e.strerror or e}); free some space, fix its permissions "
                        "or choose another data.cache_dir") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise DataError(f"cannot write {path} ({e.strerror or e}); nothing half-written was kept: free some "
                            "space, fix its permissions or choose another data.cache_dir") from None
        raise
