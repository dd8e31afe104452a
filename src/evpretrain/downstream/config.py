"""Settings of the downstream tasks (config section ``downstream``), as frozen dataclasses, without torch.

``task_config(study, task, mode)`` is what a downstream job and the pipeline's plan-time check both load, so a value
a job would refuse fails while Snakemake plans; ``robustness_config`` the same for ``downstream.robustness``. What
each setting does is said where it acts (``downstream.data``, ``heads``, ``losses``, ``models``, ``run``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from evpretrain.config import ConfigError, load_section
from evpretrain.training.config import TrainConfig

Task = Literal["classify", "segment", "flow"]
Transforms = Literal["worker", "device"]  # downstream.data
CLASSIFY_MODES = ("linear", "finetune")
TARGET_RESOLUTIONS = ("label", "input")  # downstream.data
EVAL_POSITIONS = ("middle", "random")
CROP_ASPECTS = ("sensor_relative", "torchvision")
PROBE_HEADS = ("linear", "mae_bn")  # downstream.models
HEAD_INITS = ("xavier_uniform", "trunc_normal")
BACKBONE_MODES = ("eval", "train")
NECKS = ("none", "beit")  # downstream.heads
FLOW_PREDICTORS = ("linear", "conv3x3")
DICE_FORMS = ("squared", "present")  # the keys of losses.DICE_LOSSES (a test keeps the two equal)


@dataclass(frozen=True)
class WindowConfig:
    """Events per classification sample: ``train_events`` at a random start, ``eval_events`` at ``eval_position``
    (``random``: a start drawn from (seed, index); ``middle``: the middle of the sample)."""

    train_events: int | None = None
    eval_events: int | None = None
    eval_position: str = "middle"

    def __post_init__(self) -> None:
        for name in ("train_events", "eval_events"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"window.{name} must be >= 1 or null (every event), got {value}")
        if self.eval_position not in EVAL_POSITIONS:
            raise ValueError(f"window.eval_position must be one of {EVAL_POSITIONS}, got {self.eval_position!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (``evpretrain.downstream.data`` says what each does). Fractions of events; pixels
    of the sensor; microseconds. ``crop_aspect``: ``sensor_relative`` (theirs, view_augment.py:14-22: aspect uniform in
    [3/4, 4/3] x the sensor's W/H, width and height swapped with p 1/2, the crop strictly inside the view) or
    ``torchvision`` (RandomResizedCrop's log-uniform 3/4 to 4/3)."""

    erase_add_fraction: tuple[float, float] = (0.0, 0.0)
    jitter_px: float = 1.5
    jitter_us: float = 0.0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_aspect: str = "torchvision"
    hflip_p: float = 0.0
    time_flip_p: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.erase_add_fraction
        if not 0.0 <= low <= high <= 0.5:
            raise ValueError(
                f"augment.erase_add_fraction must be [low, high] with 0 <= low <= high <= 0.5, got "
                f"{list(self.erase_add_fraction)}"
            )
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}"
            )
        if self.crop_aspect not in CROP_ASPECTS:
            raise ValueError(f"augment.crop_aspect must be one of {CROP_ASPECTS}, got {self.crop_aspect!r}")
        for name in ("hflip_p", "time_flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("jitter_px", "jitter_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class DownstreamTaskConfig:
    """One task's settings (``downstream.classify.<mode>``, ``downstream.segment`` or ``downstream.flow``).

    ``layer_decay``: MAE's layer-wise lr decay for the backbone (None: one lr, as the authors' without
    ``--use_layer_decay``). ``drop_path_rate``: the backbone's stochastic depth. ``label_smoothing``: classification.
    ``head``, ``head_init``, ``probe_backbone_mode``: classification heads (``evpretrain.downstream.models``):
    the probe's head (``linear`` or ``mae_bn``; fine-tuning takes ``linear``), its initialisation, and the frozen
    backbone's mode while a probe trains. ``eval_every_epochs``: how often the evaluation split is scored.
    ``num_classes``: overrides the count the store's attributes give (``class_names``, ``mask_class_names``).

    Dense tasks (``evpretrain.downstream.heads``): ``channels`` the decoder's width; ``aux_weight`` the FCN
    auxiliary loss weight (0: no auxiliary head); ``aux_channels`` its width (None: ``channels // 2``);
    ``dice_weight`` the Dice term's weight and ``dice`` its form (segmentation, ``losses.DICE_LOSSES``); ``neck``
    (``NECKS``); ``target_resolution``: targets, loss and scores at the label's resolution or the input's
    (``downstream.data``); ``max_flow``: the flow loss leaves out true flow of this magnitude or more, pixels (None:
    none left out); ``predictor``: the flow head's last layer (``FLOW_PREDICTORS``).

    ``transforms``: where the training samples' voxel grids, crops and flips are built: in the loader's workers
    (``worker``, the authors' loaders) or on the training device (``device``, ``downstream.data``); the evaluation
    split is always read whole in the workers.
    """

    train: TrainConfig
    window: WindowConfig = field(default_factory=WindowConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    layer_decay: float | None = None
    drop_path_rate: float = 0.0
    label_smoothing: float = 0.0
    head: str = "linear"
    head_init: str = "trunc_normal"
    probe_backbone_mode: str = "eval"
    channels: int = 256
    aux_weight: float = 0.4
    dice_weight: float = 1.0
    aux_channels: int | None = 256
    neck: str = "none"
    target_resolution: str = "label"
    max_flow: float | None = 400.0
    predictor: str = "linear"
    dice: str = "squared"
    eval_batch_size: int = 64
    eval_every_epochs: int = 1
    num_classes: int | None = None
    transforms: Transforms = "worker"

    def __post_init__(self) -> None:
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must lie in (0, 1] or be null, got {self.layer_decay}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        for name, allowed in (
            ("head", PROBE_HEADS),
            ("head_init", HEAD_INITS),
            ("probe_backbone_mode", BACKBONE_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("channels", "eval_batch_size", "eval_every_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.aux_channels is not None and self.aux_channels < 1:
            raise ValueError(f"aux_channels must be >= 1 or null (channels // 2), got {self.aux_channels}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0 (0: no auxiliary head), got {self.aux_weight}")
        if self.dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0 (0: no Dice term), got {self.dice_weight}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 or null (the store's count), got {self.num_classes}")
        if self.max_flow is not None and self.max_flow <= 0:
            raise ValueError(f"max_flow must be > 0 pixels or null (no cut), got {self.max_flow}")
        for name, allowed in (
            ("neck", NECKS),
            ("target_resolution", TARGET_RESOLUTIONS),
            ("predictor", FLOW_PREDICTORS),
            ("dice", DICE_FORMS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")


def task_section(task: Task, mode: str | None = None) -> str:
    """The dotted config section of ``task`` (and classification ``mode``): ``downstream.classify.linear``..."""
    if task != "classify":
        return f"downstream.{task}"
    if mode not in CLASSIFY_MODES:
        raise ConfigError(f"classification mode must be one of {CLASSIFY_MODES}, got {mode!r}")
    return f"downstream.classify.{mode}"


def task_config(study: Mapping[str, Any], task: Task, mode: str | None = None) -> DownstreamTaskConfig:
    """The validated settings of ``task`` (and classification ``mode``) from a study config."""
    config = load_section(DownstreamTaskConfig, study, task_section(task, mode))
    if task != "classify":
        return config
    if mode == "finetune" and config.head != "linear":
        raise ConfigError(
            f"downstream.classify.finetune.head: fine-tuning trains a plain Linear head; expected 'linear' (the "
            f"probe's {config.head!r} belongs to downstream.classify.linear), got {config.head!r}"
        )
    return config


@dataclass(frozen=True)
class RobustnessConfig:
    """Levels to evaluate: shot-noise rates in events per pixel per second (Hz), drop fractions in [0, 1];
    ``val_event_noise``: also the authors' protocol (the run's training erase-and-add at evaluation)."""

    shot_noise_hz: tuple[float, ...] = (0.0, 10.0, 30.0, 100.0)
    drop: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9)
    val_event_noise: bool = False
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not all(math.isfinite(rate) and rate >= 0 for rate in self.shot_noise_hz):
            raise ValueError(f"shot_noise_hz must be finite rates >= 0 (Hz), got {list(self.shot_noise_hz)}")
        if not all(0 <= fraction <= 1 for fraction in self.drop):
            raise ValueError(f"drop must be fractions in [0, 1], got {list(self.drop)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def robustness_config(study: Mapping[str, Any]) -> RobustnessConfig:
    """The levels of ``downstream.robustness``; the pipeline writes the study's section into each stressed
    evaluation's config. An empty section means the default levels; a missing one is a ConfigError."""
    return load_section(RobustnessConfig, study, "downstream.robustness")
