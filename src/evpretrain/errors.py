"""Errors about a run's files that the user can act on; torch-free, so that the command line can name them without
importing the training code. The command line prints them as one line and exits with status 2."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CheckpointError", "ResumeError"]


class ResumeError(ValueError):
    """The checkpoint in the output folder belongs to a run with other settings: resuming would not continue it."""


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one: missing, truncated, not a torch file, or without the expected keys."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        super().__init__(f"{path}: {reason}")
