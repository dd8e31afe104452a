"""Settings of the training loop (config section ``<stage>.train``), shared by every stage that trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evpretrain.config import ConfigError

# Settings that change how a run executes but not the weights it ends with: a run may resume under other values.
EXECUTION_FIELDS = frozenset({"num_workers", "log_every_steps", "checkpoint_every_steps", "max_steps"})


@dataclass(frozen=True)
class TrainConfig:
    """How to optimise: AdamW, a per-step cosine schedule with linear warm-up, checkpoints, precision.

    The peak learning rate is ``base_lr * batch_size * world_size / 256`` (MAE's linear scaling rule), with
    ``batch_size`` the batch of ONE process; ``min_lr`` is absolute (not scaled), as in MAE.
    ``warmup_epochs`` may be fractional. ``clip_grad`` is the max global L2 norm of the gradients, None = no clipping.
    ``amp``: "auto" = bf16 autocast on CUDA and full float32 on CPU; "bf16" = bf16 autocast on any device; "off".
    ``compile``: ``torch.compile`` the model for the steps (the saved weights are the plain module's); its fused
    kernels round differently, so a run is not resumed under the other value. ``optimizer_impl``: AdamW's kernels,
    "foreach" (one op over all tensors), "fused" (one kernel; on CUDA, also on CPU) or "auto" = fused on CUDA,
    foreach elsewhere (foreach on the CPU gives the same bits as the per-tensor loop; fused differs in the last bit).
    ``max_steps`` stops the run early (tests, benchmarks) without changing the schedule, which always spans
    ``epochs``; a later run with a larger cap (or none) resumes and continues on the same trajectory.
    """

    epochs: int
    batch_size: int
    base_lr: float
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None
    checkpoint_every_steps: int = 1000
    seed: int = 0
    amp: Literal["auto", "off", "bf16"] = "auto"
    num_workers: int = 0
    log_every_steps: int = 50
    max_steps: int | None = None
    compile: bool = False
    optimizer_impl: Literal["auto", "foreach", "fused"] = "auto"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if not 0 <= self.min_lr <= self.base_lr:
            raise ValueError(f"min_lr must lie in [0, base_lr], got {self.min_lr}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must lie in [0, epochs], got {self.warmup_epochs}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.amp not in ("auto", "off", "bf16"):
            raise ValueError(f"amp must be one of auto, off, bf16, got {self.amp!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.optimizer_impl not in ("auto", "foreach", "fused"):
            raise ValueError(f"optimizer_impl must be one of auto, foreach, fused, got {self.optimizer_impl!r}")


def uses_bf16(config: TrainConfig, device_type: str) -> bool:
    """Whether a run of ``config`` on a ``device_type`` device ("cpu", "cuda") computes under bf16 autocast."""
    return config.amp == "bf16" or (config.amp == "auto" and device_type == "cuda")


def check_batch_fits(config: TrainConfig, num_samples: int, world_size: int, key: str, store: str | Path) -> None:
    """Raise ConfigError unless the ``num_samples`` of ``store`` fill one global batch, ``batch_size`` x
    ``world_size`` processes: the loop drops the tail that does not (MAE's ``drop_last``), so fewer samples would
    make epochs of 0 steps. ``key``: the dotted section of ``config`` (e.g. ``pretrain.stage1.train``)."""
    if num_samples < config.batch_size * world_size:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise ConfigError(
            f"{key}.batch_size {config.batch_size}{processes} is larger than the {num_samples} samples of {store}"
        )
