"""Files written whole: each goes to a temporary file beside its target and is renamed when complete.

A process killed while writing leaves the previous file whole; ``os.replace`` is atomic within one file system, and
the temporary name is unique, so processes writing the same target never share one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["AtomicPath", "write_atomic", "write_text_atomic"]


class AtomicPath:
    """A fresh temporary file ``tmp`` beside ``path`` to write by name (as h5py does), then ``commit`` (flush it to
    disk, rename it onto ``path``) or ``discard`` (remove it; ``path`` is left as it was).

    As a context manager it yields ``tmp``, commits when the block ends normally and discards when it raises. The
    temporary file exists, empty, from the start, with the permissions any new file gets (``tempfile.mkstemp``'s
    would be owner-only).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:  # 48 random bits: a clash, with a concurrent writer or a crashed one's leftover, is retried
            self.tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
            try:
                os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue

    def commit(self) -> Path:
        """Flush the temporary file to disk and rename it onto ``path``; on failure, remove it and re-raise."""
        try:
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``."""
    with AtomicPath(path) as tmp, tmp.open("wb") as file:
        write(file)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text``, UTF-8, through ``write_atomic``."""
    return write_atomic(path, lambda file: file.write(text.encode()))
