"""Settings of the pre-training stages (config section ``pretrain``), as frozen dataclasses, without torch.

``pretrain_config(study)`` is what a stage, the teacher-features job and the pipeline's plan-time check all load, so
a value a job would refuse fails while Snakemake plans. What each setting does is said where it acts
(``pretrain.data``, ``pretrain.stages``, ``pretrain.run``); checks here need no model, no data and no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evpretrain.config import ConfigError, load_section
from evpretrain.models.spec import DEFAULT_NUM_BINS, BackboneSpec, check_backbone
from evpretrain.training.config import TrainConfig

if TYPE_CHECKING:
    from evpretrain.pretrain.data import PretrainDataset

Window = Literal["interval", "clip"]
GridResize = Literal["nearest", "bilinear", "scale_events"]
TargetResize = Literal["bicubic", "bilinear"]
Transforms = Literal["worker", "device"]
TeacherInput = Literal["rgb", "last_frame"]
# The registered teachers (``teachers.list_teachers()``; a test keeps the two equal), known here without torch.
TEACHERS = ("clip_vit_b16", "efficientnet_lite0")


@dataclass(frozen=True)
class PretrainAugment:
    """The view augmentation (config section ``pretrain.data.augment``): ``crop_scale`` [low, high] fraction of the
    area ([1, 1]: no crop), ``hflip_p`` and ``time_flip_p`` the chances of a horizontal and a time flip."""

    crop_scale: tuple[float, float] = (1.0, 1.0)
    hflip_p: float = 0.0
    time_flip_p: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}"
            )
        for name in ("hflip_p", "time_flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must lie in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class PretrainDataConfig:
    """Input of every stage (config section ``pretrain.data``; ``evpretrain.pretrain.data`` says what each does).

    ``input_size`` (H, W) pixels, None = the store's sensor size; ``window`` what a sample spans; ``augment`` the
    view drawn per read, in every stage; ``resize`` and ``target_resize`` how the voxel grid and the targets reach
    the input size; ``align_teacher_tokens`` (stages 2 and 3) moves the cached teacher tokens with the crop and the
    horizontal flip, where the paper leaves them in place (exact for tokens of the event view, ``last_frame``'s;
    ``rgb`` tokens cover CLIP's centre crop of the source, close to but not the simulated view); ``seed`` of every
    draw. ``transforms``: where the dense work runs: ``worker`` (the loader's workers build each sample, as the
    paper's loaders do) or ``device`` (the workers only read and pack; ``PretrainBatchViews`` builds the batch on
    the training device; the same tensors to float32 rounding).
    """

    num_bins: int = DEFAULT_NUM_BINS
    input_size: tuple[int, int] | None = None
    window: Window = "clip"
    augment: PretrainAugment = field(default_factory=lambda: PretrainAugment(time_flip_p=0.5))
    resize: GridResize = "bilinear"
    target_resize: TargetResize = "bilinear"
    align_teacher_tokens: bool = False
    seed: int = 0
    transforms: Transforms = "worker"

    def __post_init__(self) -> None:
        if self.num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {self.num_bins}")
        if self.input_size is not None and min(self.input_size) < 1:
            raise ValueError(f"input_size must be [H, W] of at least 1 pixel or null, got {list(self.input_size)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def dataset(self, store: Path, *, augment: bool = True, transforms: Transforms | None = None) -> PretrainDataset:
        """The pre-training dataset of ``store`` with these settings; ``augment=False`` for the kNN monitor and the
        figures (the window is still drawn, seeded, per index); ``transforms`` overrides the setting (the figures
        read whole samples: ``worker``)."""
        from evpretrain.pretrain.data import PretrainDataset  # torch: only where a job builds data

        return PretrainDataset(
            store,
            num_bins=self.num_bins,
            input_size=self.input_size,
            window=self.window,
            augment=self.augment if augment else PretrainAugment(),
            resize=self.resize,
            target_resize=self.target_resize,
            seed=self.seed,
            transforms=transforms or self.transforms,
        )


@dataclass(frozen=True)
class KnnConfig:
    """The kNN monitor: ``memory`` labelled training samples, ``queries`` validation samples (0 = off)."""

    every_steps: int = 100
    memory: int = 600
    queries: int = 150
    k: int = 20
    temperature: float = 0.07

    def __post_init__(self) -> None:
        for name, low in (("every_steps", 1), ("memory", 0), ("queries", 0), ("k", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.memory > 0 and self.k > self.memory:
            raise ValueError(f"k {self.k} is above memory {self.memory}: a query has at most memory neighbours")


@dataclass(frozen=True)
class MaskedModelingConfig:
    """Stage 1 (config section ``pretrain.stage1.method``).

    ``mask_token_init``: the decoder's mask token drawn from N(0, 0.02^2) (``normal``, MAE's and ours) or left at
    zeros (``zeros``, the paper's code). ``density_score`` (``densest`` / ``sparsest`` masking): a patch's event
    count with ties broken at random (``events``, ours) or the paper's mean ``|sum over bins|`` of the input voxel
    grid with ties in ``torch.argsort``'s order (``abs_sum``; ``evpretrain.pretrain.masking``).
    """

    mask_ratio: float = 0.5
    masking: Literal["random", "densest", "sparsest"] = "random"
    target: Literal["difference", "voxel", "frame"] = "difference"
    normalize_target: bool = True
    decoder_dim: int = 256
    decoder_depth: int = 8
    decoder_heads: int = 8
    mask_token_init: Literal["normal", "zeros"] = "normal"
    density_score: Literal["events", "abs_sum"] = "events"

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:  # 0 hides nothing: no token to reconstruct, a loss of 0/0
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        for name, low in (("decoder_dim", 1), ("decoder_depth", 0), ("decoder_heads", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_heads {self.decoder_heads} must divide decoder_dim {self.decoder_dim}")


@dataclass(frozen=True)
class ContrastConfig:
    """Stages 2 and 3 (config sections ``pretrain.stage2.method`` and ``pretrain.stage3.method``).

    ``teacher_projection``: whether the teacher side's LayerNorm + Linear trains ("trained", the paper's code,
    model/pretrain/pr_hub_model.py:92-97, and the ``paper`` preset) or keeps its initialisation ("frozen", the default
    and the demo's). Why frozen is offered: queued negatives are detached, so a trained projection feels
    only the positives' pull, drifts towards what every student token matches and fills the queue with ever more
    similar keys (the loss climbs back towards log(queue_length + 1); docs/results.md); a frozen random projection
    keeps the queue consistent at no cost, as it preserves the teacher tokens' angles closely. In-batch negatives
    (``queue_length: 0``) repel the keys too, so a trained projection is safe there.

    ``queue_exclude_same_sample``: leave a sample's own queued keys out of its negatives (ours) or keep them (the
    paper's code); ``queue_enqueue``: every rank's keys into the queue (``gathered``, MoCo's) or this rank's only
    (``local``, the paper's code). See ``TokenInfoNCE``.
    """

    projector_layers: int = 3
    predictor_layers: int = 2
    hidden_dim: int = 4096
    queue_length: int = 1024
    temperature: float = 0.07
    focus: Literal["none", "density", "difference"] = "none"
    teacher_projection: Literal["trained", "frozen"] = "frozen"
    queue_exclude_same_sample: bool = True
    queue_enqueue: Literal["gathered", "local"] = "gathered"

    def __post_init__(self) -> None:
        for name, low in (("projector_layers", 0), ("predictor_layers", 0), ("hidden_dim", 1), ("queue_length", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class LayerLrConfig:
    """Stage 3's layer-wise learning-rate factors: ``none``, ``decay`` (``decay`` ** depth from the top) or
    ``grafted`` (0.01 / 0.1 / 1.0 by group). ``grafted_groups``: ``blocks_of_4``, the paper's groups
    (``utils/lr_decay.py``: embeddings and conv stages, then plain blocks 0-3, 4-7, 8+), or ``thirds`` of all the
    blocks by depth (ours before; the same for a 12-block ViT). See ``training.optim.layer_scales``."""

    rule: Literal["none", "decay", "grafted"] = "none"
    decay: float = 0.75
    grafted_groups: Literal["blocks_of_4", "thirds"] = "blocks_of_4"

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {self.decay}")


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen image teacher whose tokens stages 2 and 3 learn from (``weights``: a local file, for CLIP).

    ``input``: what it sees, one image per stored video: ``rgb`` the colour source image as CLIP's preprocessing crops
    it (the paper's; stores built with ``data.ef.keep_rgb``) or ``last_frame`` the video's last frame, grey in three
    channels (``evpretrain.teachers.features``).

    ``grid``: how its tokens reach the backbone's token grid. ``resize`` (ours): cached resized onto the backbone's
    grid (antialiased bilinear, ``resize_tokens``), then LayerNorm + Linear. ``conv`` (the paper's): cached on the
    teacher's own grid; one equal to the backbone's takes LayerNorm + Linear, one twice as fine LayerNorm + a
    stride-2 Conv2d (model/pretrain/pr_hub_model.py:94-97: CLIP's 14 x 14 onto Swin's 7 x 7); any other is refused.
    One setting for both stages: they share the features, and stage 3 starts from stage 2's projection.
    """

    name: str = "efficientnet_lite0"
    weights: str | None = None
    batch_size: int = 32
    input: TeacherInput = "last_frame"
    grid: Literal["resize", "conv"] = "resize"

    def __post_init__(self) -> None:
        if self.name not in TEACHERS:
            raise ValueError(f"unknown teacher {self.name!r}; known teachers: {', '.join(TEACHERS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Stage1Config:
    train: TrainConfig
    method: MaskedModelingConfig = field(default_factory=MaskedModelingConfig)


@dataclass(frozen=True)
class ContrastStageConfig:
    train: TrainConfig
    method: ContrastConfig = field(default_factory=ContrastConfig)
    layer_lr: LayerLrConfig = field(default_factory=LayerLrConfig)


@dataclass(frozen=True)
class PretrainConfig:
    """Config section ``pretrain``. A stage's section may be absent where that stage does not run (the pipeline
    gives each stage a config holding its own section only, so that another stage's change does not touch it)."""

    backbone: str
    stage1: Stage1Config | None = None
    stage2: ContrastStageConfig | None = None
    stage3: ContrastStageConfig | None = None
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    mlflow: dict[str, str] = field(default_factory=dict)  # {tracking_uri, experiment}; empty = no MLflow

    def __post_init__(self) -> None:
        check_backbone(self.backbone, self.data.num_bins)
        if self.data.input_size is not None:
            self.check_input_size(self.data.input_size)

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The study's backbone: ``backbone`` with the voxel bins as input channels and the overrides."""
        return BackboneSpec(self.backbone, self.data.num_bins, self.backbone_overrides)

    def check_input_size(self, size: tuple[int, int], store: Path | None = None) -> None:
        """Raise ConfigError unless ``size`` (H, W) pixels, the voxel grid ``data.input_size`` gives (of ``store``:
        its sensor size when null), is the size the backbone takes."""
        expected = self.backbone_spec.img_size
        if tuple(size) != tuple(expected):
            given = f"{list(size)} (the sensor size of {store})" if store is not None else list(size)
            where = "backbone_overrides.img_size" if "img_size" in self.backbone_overrides else self.backbone
            raise ConfigError(
                f"pretrain.data.input_size: the input is {given} but the backbone ({where}) takes "
                f"{list(expected)}; set input_size: {list(expected)}"
            )


def pretrain_config(study: Mapping[str, Any]) -> PretrainConfig:
    """The validated ``pretrain`` section of a study config."""
    return load_section(PretrainConfig, study, "pretrain")
