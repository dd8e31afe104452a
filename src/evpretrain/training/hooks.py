"""What a training run shows its hooks, and the hook interface: MLflow logging, kNN monitoring, user hooks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evpretrain.training.config import TrainConfig


@dataclass
class TrainState:
    """The run as a hook sees it. ``step`` counts optimizer steps taken (1 after the first).

    ``model`` is the bare module (never the DDP wrapper); ``total_steps`` spans all epochs (the schedule's
    length); ``stop_step`` is where this run stops (``max_steps`` or ``total_steps``); ``start_step`` is where it
    began (> 0 after a resume).
    """

    config: TrainConfig
    out_dir: Path
    model: nn.Module
    device: torch.device
    amp: bool
    rank: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    stop_step: int
    start_step: int
    peak_lr: float
    step: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0

    @property
    def epoch(self) -> float:
        """Epochs completed, fractional."""
        return self.step / self.steps_per_epoch

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of the training step (bf16 autocast when ``amp``)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


class Hook:
    """Callbacks of a training run; each method does nothing unless overridden.

    Hooks run on every rank, in the order given; a hook that writes or logs checks ``state.is_main``.
    ``on_step_end`` receives the step's scalars (``loss``, the step function's terms, ``lr``, ``grad_norm`` when
    clipping) and may add its own (e.g. ``knn_top1``): later hooks and the log see them. ``on_log`` receives the
    means over the steps since the previous log, every ``log_every_steps`` and at the run's last step.
    ``on_train_end`` runs after ``metrics.json`` is written; ``on_train_failed`` when the run raises.
    ``state_dict``/``load_state_dict`` travel in the checkpoint so that a resumed run continues, e.g., the same
    MLflow run.
    """

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def on_train_failed(self, state: TrainState, error: BaseException) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
