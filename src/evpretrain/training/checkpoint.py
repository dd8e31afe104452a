"""The files a training run writes, each written whole (``evpretrain.files.write_atomic``): a run killed while
writing leaves the previous file whole."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from evpretrain.errors import CheckpointError
from evpretrain.files import write_atomic, write_text_atomic

CHECKPOINT_NAME = "checkpoint.pt"  # a run's final state: published when it reaches its stop step
# The state of a run in progress, written every checkpoint_every_steps. Not a pipeline output: Snakemake deletes the
# outputs of a job that fails or is interrupted, and the run must resume from this file when rerun.
RESUME_NAME = "resume.pt"
METRICS_NAME = "metrics.json"


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` atomically; keep ``checkpoint`` to what ``torch.load(weights_only=True)`` accepts."""
    return write_atomic(path, lambda file: torch.save(checkpoint, file))


def load_checkpoint(path: str | Path, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint onto the CPU, with ``weights_only=True`` (no code runs while loading): a dict holding the keys
    ``required``. Raises CheckpointError naming the file when it is missing, truncated, not a torch file, or
    holds something else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file" if not path.exists() else "not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        raise CheckpointError(path, f"not a readable torch checkpoint ({type(err).__name__}: {_cause(err)})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(path, f"holds a {type(checkpoint).__name__}, expected a dict of saved state")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise CheckpointError(path, f"lacks {missing}: not a checkpoint of this kind (it has {sorted(checkpoint)[:8]})")
    return checkpoint


def write_json(data: Any, path: str | Path) -> Path:
    """JSON with sorted keys, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return write_text_atomic(path, text)


def backbone_entries(state: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries of a model state dict, without the prefix: the backbone of any of this project's
    stage or downstream modules. Raises ConfigError naming ``path`` when there are none."""
    from evpretrain.config import ConfigError

    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise ConfigError(
            f"{path}: holds no backbone weights (no 'backbone.' keys); a checkpoint of another project "
            "needs an importer (evpretrain.downstream.importers)"
        )
    return backbone


def _cause(err: Exception) -> str:
    """``err``'s message on one line; of torch's paragraph on ``weights_only`` only what the unpickler refused."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split())
