"""The files a training run writes, each written to a temporary name and renamed when complete.

A run killed while writing leaves the previous file whole; ``os.replace`` is atomic within one file system.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` atomically; keep ``checkpoint`` to what ``torch.load(weights_only=True)`` accepts."""
    return write_atomic(path, lambda file: torch.save(checkpoint, file))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint onto the CPU, with ``weights_only=True`` (no code runs while loading)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(data: Any, path: str | Path) -> Path:
    """JSON with sorted keys, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return write_atomic(path, lambda file: file.write(text.encode()))


def backbone_entries(state: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a model state dict, without the prefix: the backbone of any of this project's
    stage or downstream modules. Raises ConfigError naming ``path`` when there are none."""
    from evpretrain.config import ConfigError

    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise ConfigError(f"{path}: holds no backbone weights (no 'backbone.' keys); a checkpoint of another project "
                          "needs an importer (evpretrain.downstream.importers)")
    return backbone
