"""Fine-tune and evaluate a backbone on one downstream task: classification (linear probe or full fine-tuning),
semantic segmentation or optical flow; metrics per epoch, metrics.json and a figure in the run folder.

Settings come from the study config: the backbone from ``pretrain`` (its name, bins and overrides, so a checkpoint
of any stage loads), the task from ``downstream.<task>`` (classification: ``downstream.classify.<mode>``). The input
size is the backbone's ``img_size``.

Metrics: the evaluation split is scored after every ``eval_every_epochs`` epochs and at the end. ``*_last`` is the
final model's score, the honest figure; ``*_best`` the best over the evaluations, which is what the paper's code
reports (it scores the test split every epoch and keeps the maximum, an optimistic protocol: report both).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from evpretrain.config import ConfigError, to_mapping
from evpretrain.data.store import store_digest
from evpretrain.downstream.config import DownstreamTaskConfig, Task, WindowConfig, task_config, task_section
from evpretrain.downstream.data import IGNORE_INDEX, DownstreamDataset, collate
from evpretrain.downstream.heads import FlowModel, SegmentationModel
from evpretrain.downstream.losses import flow_loss, segmentation_loss
from evpretrain.downstream.metrics import (
    ConfusionMatrix,
    FlowMetrics,
    SegmentationMetrics,
    constant_prediction_confusion,
    per_class_accuracy,
    segmentation_scores,
    topk_accuracy,
)
from evpretrain.downstream.models import Classifier, LinearProbe, load_backbone
from evpretrain.files import file_sha256
from evpretrain.inference.spec import InferenceSpec, Representation, store_facts
from evpretrain.models import backbone_spec, build_backbone
from evpretrain.training import train
from evpretrain.training.checkpoint import METRICS_NAME, write_json
from evpretrain.training.config import check_batch_fits, uses_bf16
from evpretrain.training.distributed import process_layout, resolve_device, to_device
from evpretrain.training.hooks import Hook, TrainState
from evpretrain.training.mlflow_hook import LiveTracking
from evpretrain.training.optim import layer_scales, param_groups

__all__ = ["EpochEvaluator", "build_model", "model_settings", "run_downstream"]

# --- models and steps ------------------------------------------------------------------------------------------


def model_settings(task: Task, mode: str | None, config: DownstreamTaskConfig) -> dict[str, Any]:
    """What ``build_model`` needs of ``config`` for ``task``: plain values, saved in the checkpoint's inference entry
    so that ``evpretrain.inference`` rebuilds the same model without the study config."""
    if task == "classify" and mode == "linear":
        return {"head": config.head, "head_init": config.head_init, "backbone_mode": config.probe_backbone_mode}
    if task == "classify":
        return {"head_init": config.head_init}
    dense = {
        "channels": config.channels,
        "neck": config.neck,
        "aux": config.aux_weight > 0,
        "aux_channels": config.aux_channels or config.channels // 2,
    }
    return dense if task == "segment" else {**dense, "predictor": config.predictor}


def build_model(
    task: Task, mode: str | None, backbone: nn.Module, num_classes: int | None, settings: Mapping[str, Any]
) -> nn.Module:
    """The model of ``task`` around ``backbone``; ``settings`` from ``model_settings``."""
    if task == "classify" and mode == "linear":
        return LinearProbe(backbone, num_classes, **settings)
    if task == "classify":
        return Classifier(backbone, num_classes, **settings)
    if task == "segment":
        return SegmentationModel(backbone, num_classes, **settings)
    return FlowModel(backbone, **settings)


class CachedFeatures(Dataset):
    """A linear probe's pooled features (N, D), computed once, with the labels (N,): ``{"features", "label"}``."""

    deterministic = True  # no augmentation: SeededSamples need not seed each read

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "label": self.labels[index]}


def cache_probe_features(
    probe: LinearProbe, dataset: Dataset, batch_size: int, device: torch.device, *, bf16: bool = False
) -> CachedFeatures:
    """Every sample of ``dataset`` through the probe's frozen backbone, once; under bf16 autocast with ``bf16``, as
    the training steps would run it. The features are kept in float32."""
    probe.to(device)
    features, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            features.append(probe.features(batch["voxel"].to(device)).float().cpu())
        labels.append(batch["label"])
    return CachedFeatures(torch.cat(features), torch.cat(labels))


def _inputs(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return batch["features"] if "features" in batch else batch["voxel"]


def step_function(task: Task, config: DownstreamTaskConfig) -> Callable:
    """``step_fn(model, batch) -> (loss, terms)`` of the training loop for ``task``."""
    if task == "classify":

        def step(model, batch):
            loss = F.cross_entropy(model(_inputs(batch)), batch["label"], label_smoothing=config.label_smoothing)
            return loss, {}
    elif task == "segment":

        def step(model, batch):
            out = model(batch["voxel"], size=batch["mask"].shape[-2:])
            loss, terms = segmentation_loss(out["logits"], batch["mask"], IGNORE_INDEX, config.dice_weight, config.dice)
            if "aux_logits" in out:
                aux, _ = segmentation_loss(
                    out["aux_logits"], batch["mask"], IGNORE_INDEX, config.dice_weight, config.dice
                )
                loss = loss + config.aux_weight * aux
                terms = {**terms, "aux": aux.detach()}
            return loss, terms
    else:

        def step(model, batch):
            out = model(batch["voxel"], size=batch["flow"].shape[-2:])
            loss = flow_loss(out["flow"], batch["flow"], batch["valid"], config.max_flow)
            if "aux_flow" not in out:
                return loss, {}
            aux = flow_loss(out["aux_flow"], batch["flow"], batch["valid"], config.max_flow)
            return loss + config.aux_weight * aux, {"aux": aux.detach()}

    return step


def optimizer_groups(model: nn.Module, config: DownstreamTaskConfig) -> list[dict[str, Any]]:
    """Decay / no-decay groups; with ``layer_decay``, the backbone's layer-wise scales (heads at 1.0)."""
    scales = None
    if config.layer_decay is not None:
        scales = layer_scales(model, "decay", config.layer_decay)
    return param_groups(model, config.train.weight_decay, lr_scales=scales)


# --- evaluation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    task: Task,
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int | None,
    autocast: Callable = contextlib.nullcontext,
) -> dict[str, Any]:
    """Scores of ``model`` on every sample of ``loader`` (see ``evpretrain.downstream.metrics``)."""
    was_training = model.training
    model.eval()
    try:
        if task == "classify":
            logits, labels = [], []
            for batch in loader:
                batch = to_device(batch, device)
                with autocast():
                    logits.append(model(_inputs(batch)).float())
                labels.append(batch["label"])
            logits, labels = torch.cat(logits), torch.cat(labels)
            confusion = ConfusionMatrix(num_classes, ignore_index=None)
            confusion.update(logits.argmax(1), labels)
            matrix = confusion.compute()
            per_class = per_class_accuracy(matrix)
            return {
                **topk_accuracy(logits, labels, (1, 5)),
                "per_class_accuracy": [None if math.isnan(v) else v for v in per_class.tolist()],
                "confusion": matrix.tolist(),
            }
        if task == "segment":
            scores = SegmentationMetrics(num_classes, ignore_index=IGNORE_INDEX)
            for batch in loader:
                batch = to_device(batch, device)
                with autocast():
                    logits = model(batch["voxel"], size=batch["mask"].shape[-2:])["logits"]
                scores.update(logits.argmax(1), batch["mask"])
            return scores.compute()
        flow = FlowMetrics()
        for batch in loader:
            batch = to_device(batch, device)
            with autocast():
                pred = model(batch["voxel"], size=batch["flow"].shape[-2:])["flow"]
            flow.update(pred.float(), batch["flow"], batch["valid"], batch.get("events"))
        return flow.compute()
    finally:
        model.train(was_training)


def trivial_baseline(task: Task, loader: DataLoader, num_classes: int | None) -> dict[str, Any]:
    """What a model must beat on ``loader``'s split, through the same metrics: for classification and segmentation
    the split's own most frequent class predicted everywhere (the best constant prediction; all-background for
    segmentation), for flow zero flow."""
    if task == "flow":
        flow = FlowMetrics()
        for batch in loader:
            flow.update(torch.zeros_like(batch["flow"]), batch["flow"], batch["valid"], batch.get("events"))
        return {"name": "zero flow", **flow.compute()}
    key = "label" if task == "classify" else "mask"
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for batch in loader:
        targets = batch[key].flatten()
        targets = targets[targets != IGNORE_INDEX] if task == "segment" else targets
        counts += torch.bincount(targets, minlength=num_classes)[:num_classes]
    confusion = constant_prediction_confusion(counts)
    name = f"class {int(counts.argmax())} everywhere (the split's most frequent)"
    if task == "classify":
        return {"name": name, "top1": float(counts.max() / counts.sum())}
    scores = segmentation_scores(confusion)
    return {"name": name, "miou": scores.miou, "macc": scores.macc, "pixel_accuracy": scores.pixel_accuracy}


# The figure each evaluation tracks and ``*_best`` keeps; for the dense tasks the paper code's own (per-batch means).
PRIMARY = {"classify": ("top1", max), "segment": ("miou_batch_mean", max), "flow": ("aee_batch_mean", min)}


class EpochEvaluator(Hook):
    """Scores the evaluation split every ``every_epochs`` epochs and at the last step; keeps the history (it travels
    in the checkpoint, so a resumed run keeps the scores of the epochs before its interruption). ``report`` is
    given each new row of the history (live tracking)."""

    def __init__(
        self,
        task: Task,
        loader: DataLoader,
        num_classes: int | None,
        every_epochs: int = 1,
        report: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.task, self.loader, self.num_classes, self.every_epochs = task, loader, num_classes, every_epochs
        self.report = report
        self.history: list[dict[str, Any]] = []

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        epoch_end = state.step % (state.steps_per_epoch * self.every_epochs) == 0
        if state.is_main and (epoch_end or state.step == state.stop_step):
            scores = evaluate(self.task, state.model, self.loader, state.device, self.num_classes, state.autocast)
            self.history.append(
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    **{k: v for k, v in scores.items() if isinstance(v, (int, float))},
                }
            )
            name = PRIMARY[self.task][0]
            metrics[f"eval_{name}"] = float(scores[name])
            if self.report is not None:
                self.report(self.history[-1])

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


# --- the run ---------------------------------------------------------------------------------------------------


def run_downstream(
    task: Task,
    study: Mapping[str, Any],
    *,
    train_store: Path,
    eval_store: Path,
    out: Path,
    checkpoint: Path | None = None,
    mode: str | None = None,
    seed: int = 0,
    device: str | None = None,
    checkpoint_source: str | None = None,
    allow_partial: bool = False,
    live: LiveTracking | None = None,
) -> dict[str, Any]:
    """Fine-tune on ``train_store``, score ``eval_store``; write ``out/{metrics.json, checkpoint.pt, figure}``.

    ``checkpoint``: a pre-training stage's checkpoint (its backbone is loaded) or None for a random initialisation
    (the "scratch" baseline); with ``checkpoint_source``, another project's checkpoint through its importer
    (``evpretrain.downstream.importers``), so any published backbone is evaluated under this protocol.
    ``seed`` seeds the head's initialisation, the data order and the augmentation. ``live``: log to MLflow while it
    trains: the training log, the scores of each evaluation (``eval/<name>`` per epoch), then the final metrics.
    Returns the metrics written to ``out/metrics.json``.
    """
    spec = backbone_spec(study)
    config = task_config(study, task, mode)
    config = replace(config, train=replace(config.train, seed=seed))
    torch.manual_seed(seed)
    backbone = build_backbone(spec.with_overrides(drop_path_rate=config.drop_path_rate))
    init = load_backbone(backbone, checkpoint, source=checkpoint_source, allow_partial=allow_partial)
    common = dict(
        num_bins=spec.in_chans,
        input_size=tuple(backbone.img_size),
        window=config.window,
        target_resolution=config.target_resolution,
        seed=seed,
    )
    train_set = DownstreamDataset(train_store, task, train=True, augment=config.augment, **common)
    eval_set = DownstreamDataset(eval_store, task, train=False, **common)
    key = f"{task_section(task, mode)}.train"
    check_batch_fits(config.train, len(train_set), process_layout().world_size, key, train_store)
    num_classes = config.num_classes or _num_classes(task, train_set, eval_set)
    class_names = _class_names(task, eval_set)
    settings = model_settings(task, mode, config)
    model = build_model(task, mode, backbone, num_classes, settings)
    sensor_size, median_events = store_facts(train_store)
    inference = InferenceSpec(
        task,
        spec,  # without the training's drop path: inference runs in eval mode
        Representation("voxel_grid", spec.in_chans, "bilinear"),  # DownstreamDataset: resize_maps' bilinear
        input_size=tuple(backbone.img_size),
        sensor_size=sensor_size,
        window_events=config.window.eval_events if task == "classify" and config.window.eval_events else median_events,
        class_names=tuple(class_names) if class_names is not None and len(class_names) == num_classes else None,
        num_classes=num_classes,
        mode=mode,
        head=settings,
    )
    stochastic_backbone = config.probe_backbone_mode == "train" and config.drop_path_rate > 0
    batch_transform = None
    if mode == "linear" and train_set.deterministic and not stochastic_backbone:
        # A frozen backbone and fixed inputs: the features are the same every epoch, so compute them once.
        run_device = resolve_device(device, process_layout())
        bf16 = uses_bf16(config.train, run_device.type)
        train_set, eval_set = (
            cache_probe_features(model, data, config.eval_batch_size, run_device, bf16=bf16)
            for data in (train_set, eval_set)
        )
    elif config.transforms == "device":  # the training samples' dense work on the device; evaluation reads whole
        train_set = DownstreamDataset(
            train_store, task, train=True, augment=config.augment, transforms="device", **common
        )
        batch_transform = train_set.batch_views()
    eval_loader = DataLoader(
        eval_set, batch_size=config.eval_batch_size, shuffle=False, num_workers=config.train.num_workers
    )
    tracker = live.hook(finish_at_end=False) if live is not None else None  # ends once the final scores are in
    report = (lambda row: tracker.log_row("eval", row, int(row["epoch"]))) if tracker is not None else None
    evaluator = EpochEvaluator(task, eval_loader, num_classes, config.eval_every_epochs, report)
    out.mkdir(parents=True, exist_ok=True)
    summary = train(
        model,
        step_function(task, config),
        train_set,
        config.train,
        out,
        param_groups=optimizer_groups(model, config),
        hooks=[evaluator] if tracker is None else [evaluator, tracker],
        device=device,
        collate_fn=collate,
        batch_transform=batch_transform,
        # what the run trains on and from beyond its train settings: resuming a checkpoint of another is refused
        identity={
            "data": {"train": store_digest(train_store), "eval": store_digest(eval_store)},
            "task": [task, mode],
            # transforms: where the inputs are built, the same to float32 rounding (as pretrain's, not identity)
            "settings": {k: v for k, v in to_mapping(config).items() if k not in ("train", "transforms")},
            "backbone": to_mapping(spec),
            "init": [file_sha256(checkpoint), checkpoint_source],
        },
        inference=inference.to_dict(),
    )
    try:
        final = evaluate(task, model, eval_loader, next(model.parameters()).device, num_classes)
        name, better = PRIMARY[task]
        best = better(evaluator.history, key=lambda row: row[name])
        metrics = {
            "task": task,
            "mode": mode,
            "seed": seed,
            "train_store": str(train_store),
            "eval_store": str(eval_store),
            **init,
            **{f"train_{k}": v for k, v in summary.items() if isinstance(v, (int, float))},
            **{f"{k}_last": v for k, v in final.items() if k != "confusion"},
            f"{name}_best": best[name],
            "best_epoch": best["epoch"],
            "slurm_job_id": summary.get("slurm_job_id"),
            "baseline": trivial_baseline(task, eval_loader, num_classes),
            "history": evaluator.history,
            "train_log": summary.get("log", []),
            "num_classes": num_classes,
            "eval_window": _eval_window(task, config.window),
            "config": to_mapping(config),
        }
        if process_layout().is_main:  # under DDP every rank scored the split; one writes
            write_json(metrics, out / METRICS_NAME)
            from evpretrain.downstream.figures import write_task_figure

            write_task_figure(task, model, eval_set, final, out, class_names=class_names)
    except BaseException as error:
        if tracker is not None:
            tracker.fail(error)
        raise
    if tracker is not None:  # the final scores at the last step, as `evpretrain track` logs them
        tracker.finish(metrics, metrics["train_step"], artifacts=[out / METRICS_NAME], is_main=process_layout().is_main)
    return metrics


def _eval_window(task: Task, window: WindowConfig) -> str:
    """How the evaluation samples' events were chosen, for the tables: e.g. "40000 events at a random start"."""
    if task != "classify" or window.eval_events is None:
        return "every event"
    where = "at a random start" if window.eval_position == "random" else "from the middle"
    return f"{window.eval_events} events {where}"


def _num_classes(task: Task, train_set: DownstreamDataset, eval_set: DownstreamDataset) -> int | None:
    if task == "flow":
        return None
    known = train_set.num_classes or eval_set.num_classes
    if known is not None:
        return known
    raise ConfigError(
        f"{train_set.store_path}: the store does not name its classes (attribute "
        f"{'class_names' if task == 'classify' else 'mask_class_names'}); set "
        f"downstream.{task}{'.<mode>' if task == 'classify' else ''}.num_classes"
    )


def _class_names(task: Task, dataset: DownstreamDataset) -> list[str] | None:
    key = {"classify": "class_names", "segment": "mask_class_names"}.get(task)
    names = dataset.attrs.get(key) if key else None
    return list(names) if names is not None else None
