"""What a checkpoint needs to be used without the study config that trained it: the checkpoint's ``inference`` entry.

Stage runs (``evpretrain pretrain``) and fine-tuning runs (``evpretrain finetune``) save it in ``checkpoint.pt`` (a
plain dict, loadable with ``weights_only=True``), so that the file alone says how to turn events into its input and
what it outputs. In the checkpoint rather than in a file beside it: a checkpoint copied or renamed on its own keeps it.

- ``task``: ``embed`` (a pre-training stage: pooled tokens), ``classify``, ``segment`` or ``flow``.
- ``backbone``: the registered name, input channels and overrides (``evpretrain.models.BackboneSpec``).
- ``representation``: the input tensor: ``voxel_grid`` of ``num_bins`` bins built on the recording's pixel grid and
  resized to the input size by ``resize`` (``bilinear`` or ``nearest``), or with ``scale_events`` built on the input
  grid from coordinates scaled to it (``evpretrain.pretrain.data``); ``histogram_ecdp`` ECDP's 2-channel histogram of
  coordinates scaled to the input grid, normalised (foreign ECDP checkpoints).
- ``input_size``: (H, W) of the network input (None: the backbone's ``img_size``).
- ``sensor_size``: (H, W) of the training data's sensor (None: unknown); a recording of another size is resized or
  centre-cropped to its aspect (``evpretrain.inference.model``).
- ``window_events``: the events per window the model was trained or scored on (classification's evaluation window,
  else the median events per sample of the training store): ``predict``'s default window.
- ``class_names``, ``num_classes``: classification and segmentation; ``mode``: ``linear`` or ``finetune``;
  ``stage``: the pre-training stage; ``head``: the head's settings (``evpretrain.downstream.run.model_settings``).
- ``source``: ``evpretrain``, or the importer a foreign checkpoint was read with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from evpretrain.config import ConfigError, from_mapping, to_mapping
from evpretrain.errors import CheckpointError
from evpretrain.models.spec import BackboneSpec

__all__ = [
    "FOREIGN_SPECS",
    "INFERENCE_KEY",
    "InferenceSpec",
    "Representation",
    "foreign_spec",
    "read_spec",
    "spec_from_study",
]

INFERENCE_KEY = "inference"  # the checkpoint's entry
INFERENCE_FORMAT = 1
TASKS = ("embed", "classify", "segment", "flow")


@dataclass(frozen=True)
class Representation:
    """How a window's events become the network's input (module docstring)."""

    kind: Literal["voxel_grid", "histogram_ecdp"] = "voxel_grid"
    num_bins: int = 5
    resize: Literal["bilinear", "nearest", "scale_events"] = "bilinear"

    @property
    def channels(self) -> int:
        return self.num_bins if self.kind == "voxel_grid" else 2


@dataclass(frozen=True)
class InferenceSpec:
    """A checkpoint's ``inference`` entry (module docstring)."""

    task: Literal["embed", "classify", "segment", "flow"]
    backbone: BackboneSpec
    representation: Representation = field(default_factory=Representation)
    input_size: tuple[int, int] | None = None
    sensor_size: tuple[int, int] | None = None
    window_events: int | None = None
    class_names: tuple[str, ...] | None = None
    num_classes: int | None = None
    mode: Literal["linear", "finetune"] | None = None
    stage: int | None = None
    head: dict[str, Any] = field(default_factory=dict)
    source: str = "evpretrain"
    format: int = INFERENCE_FORMAT

    def __post_init__(self) -> None:
        if self.representation.channels != self.backbone.in_chans:
            raise ValueError(
                f"representation {self.representation.kind} gives {self.representation.channels} channels, the "
                f"backbone takes {self.backbone.in_chans}"
            )
        if self.task in ("classify", "segment") and not self.num_classes:
            raise ValueError(f"task {self.task} needs num_classes")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for {self.num_classes} classes")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what the checkpoint holds)."""
        return to_mapping(self)


def read_spec(checkpoint: Mapping[str, Any], path: str | Path) -> InferenceSpec:
    """The ``inference`` entry of a loaded checkpoint of this project, checked. A checkpoint without it (written
    before checkpoints carried it) raises CheckpointError saying what is missing and how to supply it."""
    entry = checkpoint.get(INFERENCE_KEY)
    if entry is None:
        raise CheckpointError(
            path,
            "holds no 'inference' entry (the task, backbone, input representation and size, sensor size and class "
            "names that embed and predict read): it was written before checkpoints carried one. Name the study that "
            "trained it: --config STUDY.yaml (the pipeline writes it beside each run: RUN/study.yaml); its pretrain "
            "section gives the backbone and input, and for predict the run folder's metrics.json the task, classes "
            "and head",
        )
    try:
        return from_mapping(InferenceSpec, entry, f"{path}: inference")
    except ConfigError as error:
        raise CheckpointError(path, f"its inference entry is not readable: {error}") from None


def spec_from_study(study: Mapping[str, Any], run: Mapping[str, Any] | None = None) -> InferenceSpec:
    """The spec of a checkpoint without the entry, from the study config that trained it: an ``embed`` spec from its
    ``pretrain`` section, or with ``run`` (a fine-tuning run's metrics.json: task, mode, classes, its task config)
    that run's model, its sensor size and class names read from its training store when it is still there."""
    from evpretrain.pretrain.config import pretrain_config

    config = pretrain_config(study)
    data = config.data
    spec = InferenceSpec(
        task="embed",
        backbone=config.backbone_spec,
        representation=Representation("voxel_grid", data.num_bins, data.resize),
        input_size=data.input_size,
    )
    if run is None or run.get("task") not in ("classify", "segment", "flow"):
        return spec
    from evpretrain.downstream.config import DownstreamTaskConfig
    from evpretrain.downstream.run import model_settings

    task, mode = run["task"], run.get("mode")
    task_config = from_mapping(DownstreamTaskConfig, run["config"], f"{task} run config")
    sensor_size = class_names = median_events = None
    store = Path(run.get("train_store", ""))
    if store.is_file():
        from evpretrain.data.store import EventStore

        sensor_size, median_events = store_facts(store)
        with EventStore(store) as opened:
            names = opened.attrs.get({"classify": "class_names", "segment": "mask_class_names"}.get(task, ""))
        class_names = tuple(names) if names is not None and len(names) == run.get("num_classes") else None
    return replace(
        spec,
        task=task,
        representation=Representation("voxel_grid", spec.backbone.in_chans, "bilinear"),
        sensor_size=sensor_size,
        window_events=(task_config.window.eval_events if task == "classify" else None) or median_events,
        class_names=class_names,
        num_classes=run.get("num_classes"),
        mode=mode,
        head=model_settings(task, mode, task_config),
    )


# Foreign checkpoints (``evpretrain.downstream.importers``): the backbone their released weights fit and the input
# their projects feed it. The paper's: a 5-bin voxel grid (main_pretrain.py:117) at 224 x 224, resized bilinearly
# (ours; their fine-tuning loaders differ by dataset); ECDP's: its 2-channel histogram. MEM's import is partial by
# construction (its relative position bias has no place in our ViT), so its embeddings are not offered.
FOREIGN_SPECS: dict[str, InferenceSpec] = {
    "eventpretrain_vit": InferenceSpec("embed", BackboneSpec("vit_small_patch16", 5), source="eventpretrain_vit"),
    "eventpretrain_convvit": InferenceSpec("embed", BackboneSpec("convvit_small", 5), source="eventpretrain_convvit"),
    "eventpretrain_swin": InferenceSpec("embed", BackboneSpec("swin_tiny", 5), source="eventpretrain_swin"),
    "ecdp_vit": InferenceSpec(
        "embed",
        BackboneSpec("vit_small_patch16", 2, {"patch_norm": False}),
        Representation("histogram_ecdp", 2, "scale_events"),
        source="ecdp_vit",
    ),
}


def foreign_spec(source: str, backbone: str | None = None) -> InferenceSpec:
    """The defaults for a foreign checkpoint of ``source`` (``FOREIGN_SPECS``); ``backbone`` another registered
    name of the same family (e.g. ``vit_base_patch16`` for the paper's ViT-B)."""
    if source not in FOREIGN_SPECS:
        raise ConfigError(
            f"--checkpoint-source {source!r}: embed reads {', '.join(FOREIGN_SPECS)} (mem_vit's import is partial: "
            "its relative position bias has no place in our ViT)"
        )
    spec = FOREIGN_SPECS[source]
    if backbone is None:
        return spec
    return replace(spec, backbone=replace(spec.backbone, name=backbone))


def store_facts(path: str | Path) -> tuple[tuple[int, int], int | None]:
    """(sensor size (H, W), median events per sample or None when empty) of an event store: what a spec records of
    the data a run trained on."""
    import numpy as np

    from evpretrain.data.store import EventStore

    with EventStore(path) as store:
        counts = store.event_counts
        return tuple(int(v) for v in store.sensor_size), (int(np.median(counts)) if len(counts) else None)
