"""Files written whole, and folders written by one process at a time.

A file goes to a temporary file beside its target and is renamed when complete: a process killed while writing
leaves the previous file whole; ``os.replace`` is atomic within one file system, and the temporary name is unique,
so processes writing the same target never share one. The temporary name carries the writer's host and pid, so that
the next writer of the target removes what a dead writer on its host left behind.

A run folder is held by a ``FolderLock``: a second writer is refused with the holder's pid, host and SLURM job.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["AtomicPath", "FolderLock", "FolderLockedError", "file_sha256", "write_atomic", "write_text_atomic"]


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
        remove_leftovers(self.path)
        while True:  # 48 random bits: a clash, with a concurrent writer or a crashed one's leftover, is retried
            self.tmp = self.path.with_name(f".{self.path.name}.{_writer()}.{secrets.token_hex(6)}.tmp")
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


def _writer(host: str | None = None, pid: int | None = None) -> str:
    """``host-pid`` of a temporary file's writer (dots of the host name become ``_``: names split on dots)."""
    return f"{(host or socket.gethostname()).replace('.', '_')}-{pid or os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path`` that writers on this host left when they died (killed mid-write);
    return them. Files of live writers, and of writers on other hosts (whose pids mean nothing here), are kept."""
    path = Path(path)
    host = _writer().rsplit("-", 1)[0]
    removed = []
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(host)}-*.tmp"):
        pid = leftover.name[len(f".{path.name}.{host}-") :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


class FolderLockedError(RuntimeError):
    """Another live process holds the folder."""


class FolderLock:
    """An exclusive lock on a folder, for as long as this object holds it (a context manager).

    The lock is an advisory ``flock`` on ``folder/.lock``, which names its holder (pid, host, SLURM job id, start
    time). The kernel releases it when the holder dies, however it dies, so a lock left by a killed run is simply
    taken over; a live holder makes ``acquire`` raise FolderLockedError naming it. On NFS (v4) and Lustre, flock is
    shared by every client.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.NAME

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise FolderLockedError(
                f"{self.folder} is being written by another run ({describe_holder(self.path)}): wait for it to "
                "end, or stop it, before running again on this folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays, naming the last holder
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder() -> dict[str, Any]:
    """Who this process is, as a lock records it."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return "holder unknown"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('since')}"


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``."""
    with AtomicPath(path) as tmp, tmp.open("wb") as file:
        write(file)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text``, UTF-8, through ``write_atomic``."""
    return write_atomic(path, lambda file: file.write(text.encode()))


def file_sha256(path: str | Path | None) -> str | None:
    """The SHA-256 of a file's bytes (hex), read in chunks; None for no file."""
    if path is None:
        return None
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
