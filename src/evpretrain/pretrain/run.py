"""Run one pre-training stage from the study config: data, model, initialisation, training, figures.

Stage 1 starts from scratch (or ``init``); stage 2 takes the backbone of a stage-1 checkpoint and new heads;
stage 3 takes the whole stage-2 module (backbone and heads) and trains everything with a focus on informative
regions. Every stage writes ``out/checkpoint.pt`` (resumable) and ``out/metrics.json``; stage 1 also writes
``out/reconstructions.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from evpretrain.config import ConfigError, to_mapping
from evpretrain.data.store import store_digest
from evpretrain.files import file_sha256
from evpretrain.inference.spec import InferenceSpec, Representation, store_facts
from evpretrain.models import build_backbone
from evpretrain.pretrain.config import PretrainConfig
from evpretrain.pretrain.data import PretrainDataset, collate, view_tokens
from evpretrain.pretrain.stages import FeatureTransition, MaskedModeling
from evpretrain.training import KnnMonitor, load_checkpoint, train
from evpretrain.training.checkpoint import backbone_entries
from evpretrain.training.config import check_batch_fits
from evpretrain.training.distributed import process_layout
from evpretrain.training.mlflow_hook import LiveTracking
from evpretrain.training.optim import layer_scales, param_groups


def teacher_cache_grid(grid: str, backbone_grid: tuple[int, int], teacher_grid: tuple[int, int]) -> tuple[int, int]:
    """The token grid (h, w) the teacher features are cached on for ``pretrain.teacher.grid``: the backbone's for
    ``resize``, the teacher's own for ``conv`` (which must equal the backbone's or be twice as fine)."""
    backbone_grid, teacher_grid = tuple(backbone_grid), tuple(teacher_grid)
    if grid == "resize":
        return backbone_grid
    if teacher_grid not in (backbone_grid, (2 * backbone_grid[0], 2 * backbone_grid[1])):
        raise ConfigError(
            f"pretrain.teacher.grid: conv needs the teacher's token grid {teacher_grid} equal to the backbone's "
            f"{backbone_grid} or twice as fine (a stride-2 conv); use resize"
        )
    return teacher_grid


def teacher_features_for(config: PretrainConfig, store: Path, out: Path, *, device: str | None = None) -> Path:
    """Compute the teacher's tokens of every sample of ``store`` on the grid ``pretrain.teacher.grid`` asks for
    (``teacher_cache_grid``) into ``out``."""
    from evpretrain.teachers import compute_teacher_features, create_teacher

    backbone = build_backbone(config.backbone_spec)
    options = {"weights": config.teacher.weights} if config.teacher.weights else {}
    teacher = create_teacher(config.teacher.name, **options)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return compute_teacher_features(
        store,
        teacher,
        out,
        grid_size=teacher_cache_grid(config.teacher.grid, backbone.grid_size, teacher.grid_size),
        batch_size=config.teacher.batch_size,
        device=device,
        image=config.teacher.input,
    )


def build_stage_module(
    stage: int, config: PretrainConfig, teacher_dim: int | None, teacher_grid: tuple[int, int] | None = None
) -> nn.Module:
    """The stage's module around a fresh backbone (weights loaded separately by ``initialise``); ``teacher_grid``
    the grid of the cached teacher tokens (stages 2 and 3), None = the backbone's."""
    backbone = build_backbone(config.backbone_spec)
    if stage == 1:
        return MaskedModeling(backbone, config.stage1.method)
    if teacher_dim is None:
        raise ConfigError(f"stage {stage} needs teacher features (--teacher-features)")
    method = (config.stage2 if stage == 2 else config.stage3).method
    return FeatureTransition(backbone, teacher_dim, method, teacher_grid)


def initialise(module: nn.Module, stage: int, init: Path | None) -> dict[str, list[str]]:
    """Load ``init`` (a checkpoint.pt of an earlier stage) into ``module``; return the keys left out.

    Stages 1 and 2 take its backbone only. Stage 3 takes the whole stage-2 module (the same heads, queue included)
    when ``init`` is a stage-2 checkpoint, else (a stage-1 checkpoint: the "without stage 2" ablation) its backbone,
    the heads starting afresh.
    """
    if init is None:
        return {"missing": [], "unexpected": []}
    state = load_checkpoint(init, required=("model",))["model"]
    if stage == 3 and any(key.startswith("projector.") for key in state):
        result = module.load_state_dict(state, strict=True)
    else:
        result = module.backbone.load_state_dict(backbone_entries(state, init), strict=True)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def stage_param_groups(module: nn.Module, stage: int, config: PretrainConfig, weight_decay: float) -> list[dict]:
    """Optimizer groups: stage 2 freezes the backbone but its final norm; stage 3 applies the layer-lr rule."""
    if stage == 2:
        module.freeze_for_transition()
    scales = None
    if stage == 3 and config.stage3.layer_lr.rule != "none":
        rule = config.stage3.layer_lr
        scales = layer_scales(module, rule.rule, rule.decay, grafted_groups=rule.grafted_groups)
    return param_groups(module, weight_decay, lr_scales=scales)


class _WithTeacher(Dataset):
    """Adds the cached teacher tokens of each sample to the pre-training batch (key ``teacher``): as cached (the
    paper's: a crop or a horizontal flip of the voxel grid leaves them misaligned), or with ``align`` moved by the
    sample's view (``view_tokens``)."""

    def __init__(self, dataset: PretrainDataset, features: Any, *, align: bool = False):
        self.dataset, self.features, self.align = dataset, features, align

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = self.features[index]
        if self.align:
            tokens = view_tokens(tokens, self.features.grid_size, self.dataset.view(index), self.dataset.grid_size)
        return self.dataset[index] | {"teacher": tokens}

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def _step(model: nn.Module, batch: dict[str, torch.Tensor]):
    loss, metrics, _ = model(batch)
    return loss, metrics


def _embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    backbone = model.backbone
    return backbone.pool(backbone(batch["voxel"]))


def knn_monitor(config: PretrainConfig, train_store: Path, val_store: Path) -> KnnMonitor:
    """kNN top-1 of the pooled backbone features: the first ``knn.memory`` training samples as the labelled
    memory, the first ``knn.queries`` validation samples as queries."""
    memory = config.data.dataset(train_store, augment=False)
    queries = config.data.dataset(val_store, augment=False)
    config.check_input_size(queries.input_size, val_store)  # the training store's is checked by run_stage
    return KnnMonitor(
        _embed,
        Subset(memory, range(min(config.knn.memory, len(memory)))),
        Subset(queries, range(min(config.knn.queries, len(queries)))),
        every_steps=config.knn.every_steps,
        collate_fn=collate,
        batch_transform=_batch_transform(memory),
        k=config.knn.k,
        temperature=config.knn.temperature,
    )


def _batch_transform(dataset: PretrainDataset):
    """What the device does to the dataset's batches: its ``PretrainBatchViews`` with ``transforms: device``."""
    return dataset.batch_views() if dataset.transforms == "device" else None


def knn_of_checkpoint(
    config: PretrainConfig, checkpoint: Path | None, train_store: Path, val_store: Path, *, seed: int = 0
) -> float:
    """kNN top-1 of a stage checkpoint's backbone, or of a randomly initialised one (seeded) when None."""
    torch.manual_seed(seed)
    holder = nn.Module()  # what the monitor embeds with: a module with a ``backbone``
    holder.backbone = build_backbone(config.backbone_spec)
    if checkpoint is not None:
        holder.backbone.load_state_dict(
            backbone_entries(load_checkpoint(checkpoint, required=("model",))["model"], checkpoint)
        )
    return knn_monitor(config, train_store, val_store).evaluate(holder, torch.device("cpu"))


def run_stage(
    stage: int,
    config: PretrainConfig,
    *,
    train_store: Path,
    out: Path,
    val_store: Path | None = None,
    teacher_features: Path | None = None,
    init: Path | None = None,
    run_name: str | None = None,
    live: LiveTracking | None = None,
) -> dict[str, Any]:
    """Train one stage into ``out``; return its final metrics (also in ``out/metrics.json``). ``live``: log to MLflow
    while it trains (else ``pretrain.mlflow``'s store, if set, under ``run_name``)."""
    if stage not in (1, 2, 3):
        raise ConfigError(f"--stage must be 1, 2 or 3, got {stage}")
    stage_config = {1: config.stage1, 2: config.stage2, 3: config.stage3}[stage]
    if stage_config is None:
        raise ConfigError(f"config has no section 'pretrain.stage{stage}'")
    data = config.data
    dataset: Dataset = data.dataset(train_store)
    batch_transform = _batch_transform(dataset)
    config.check_input_size(dataset.input_size, train_store)
    key = f"pretrain.stage{stage}.train"
    check_batch_fits(stage_config.train, len(dataset), process_layout().world_size, key, train_store)
    teacher_dim = teacher_grid = None
    if stage > 1:
        from evpretrain.teachers import TeacherFeatures

        if teacher_features is None:
            raise ConfigError(f"stage {stage} needs --teacher-features (see `evpretrain teacher-features`)")
        # Refuses features of another store, or of another teacher input than pretrain.teacher.input.
        features = TeacherFeatures(teacher_features, store=train_store, image=config.teacher.input)
        teacher_dim, teacher_grid = features.embed_dim, features.grid_size
        own_grid = tuple(features.attrs.get("teacher_grid", teacher_grid))
        backbone_grid = tuple(build_backbone(config.backbone_spec).grid_size)  # before the seed: only its grid
        expected = teacher_cache_grid(config.teacher.grid, backbone_grid, own_grid)
        if teacher_grid != expected:
            raise ConfigError(
                f"{teacher_features}: teacher tokens on a {teacher_grid} grid, but pretrain.teacher.grid: "
                f"{config.teacher.grid} with this backbone needs {expected}: recompute them (`evpretrain "
                "teacher-features`)"
            )
        dataset = _WithTeacher(dataset, features, align=data.align_teacher_tokens)
    torch.manual_seed(stage_config.train.seed)  # the initial weights of the new parts are part of the run's recipe
    module = build_stage_module(stage, config, teacher_dim, teacher_grid)
    left_out = initialise(module, stage, init)
    groups = stage_param_groups(module, stage, config, stage_config.train.weight_decay)
    hooks = []
    if val_store is not None and config.knn.memory > 0 and config.knn.queries > 0:
        hooks.append(knn_monitor(config, train_store, val_store))
    if live is None and config.mlflow.get("tracking_uri"):
        live = LiveTracking(
            config.mlflow["tracking_uri"],
            config.mlflow.get("experiment", "evpretrain"),
            run_name or f"stage{stage}",
            params={"stage": stage, **to_mapping(config)},
        )
    if live is not None:
        hooks.append(live.hook())
    # What the run trains on and from beyond its train settings: resuming a checkpoint of another is refused.
    identity = {
        "data": store_digest(train_store),
        "stage": stage,
        "method": to_mapping(stage_config.method),
        # transforms moves work between workers and device, the same tensors to float32 rounding: not the run's
        # identity, so a run resumes under either (and checkpoints of before the setting still resume).
        "inputs": {k: v for k, v in to_mapping(config.data).items() if k != "transforms"},
        "backbone": to_mapping(config.backbone_spec),
        "init": file_sha256(init),
        "teacher_features": file_sha256(teacher_features),
    }
    sensor_size, median_events = store_facts(train_store)
    inference = InferenceSpec(
        "embed",
        config.backbone_spec,
        Representation("voxel_grid", data.num_bins, data.resize),
        input_size=tuple(module.backbone.img_size),
        sensor_size=sensor_size,
        window_events=median_events,
        stage=stage,
    )
    metrics = train(
        module,
        _step,
        dataset,
        stage_config.train,
        out,
        param_groups=groups,
        hooks=hooks,
        identity=identity,
        inference=inference.to_dict(),
        collate_fn=collate,
        batch_transform=batch_transform,
    )
    metrics = dict(metrics) | {"init": str(init) if init else None, "init_left_out": left_out}
    if stage == 1 and process_layout().is_main:  # under DDP one rank draws
        from evpretrain.pretrain.figures import reconstruction_figure

        reconstruction_figure(
            module,
            data.dataset(val_store or train_store, augment=False, transforms="worker"),
            out / "reconstructions.png",
        )
    return metrics
