"""Process pools whose workers die with their parent.

A pool's workers outlive a parent killed with SIGKILL (its atexit and finalisers never run): they go on holding
the HDF5 file locks of the stores they read. Each worker here asks the kernel for SIGKILL when its parent dies
(Linux ``PR_SET_PDEATHSIG``) and exits at once if the parent is already gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["signal_on_parent_death", "worker_pool"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def worker_pool(
    max_workers: int, initializer: Callable[..., None] | None = None, initargs: Sequence[Any] = ()
) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``max_workers`` whose workers are killed when this process dies. Create it
    from the main thread: the kernel ties the signal to the thread that forks the workers."""
    return ProcessPoolExecutor(
        max_workers=max_workers, initializer=_die_with_parent, initargs=(os.getpid(), initializer, tuple(initargs))
    )


def signal_on_parent_death(parent: int, sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``, tied to the
    parent's thread that forked it); return False if ``parent``, the pid it was started by, has died already."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    return os.getppid() == parent  # checked after the request: a parent that died before it took effect


def _die_with_parent(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    if not signal_on_parent_death(parent, signal.SIGKILL):
        os._exit(1)
    if initializer is not None:
        initializer(*initargs)
