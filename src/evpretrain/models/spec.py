"""The study's backbone as data: a registered name, its input channels (the voxel bins) and preset overrides.

Pre-training and every downstream task build their backbone from the same study keys, ``pretrain.backbone``,
``pretrain.backbone_overrides`` and ``pretrain.data.num_bins``, so that a checkpoint of any stage loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evpretrain.config import from_mapping, section

if TYPE_CHECKING:
    from evpretrain.models.base import Backbone

# The voxel bins when ``pretrain.data.num_bins`` is not set: 5, the presets' own ``in_chans``.
DEFAULT_NUM_BINS = 5
# The registered backbones and the input side (pixels) each takes (``registry.list_backbones()`` and the presets'
# ``img_size``; a test keeps them equal), known here without torch so that the pipeline refuses an unknown
# ``pretrain.backbone`` or an input of another size while it plans.
BACKBONE_IMG_SIZES = {
    "convvit_base": 224,
    "convvit_demo": 64,
    "convvit_small": 224,
    "swin_demo": 64,
    "swin_tiny": 224,
    "vit_base_patch16": 224,
    "vit_demo": 64,
    "vit_small_patch16": 224,
    "vit_tiny_demo": 64,
}
BACKBONES = tuple(BACKBONE_IMG_SIZES)


def check_backbone(name: str, num_bins: int) -> None:
    """Raise ValueError unless ``name`` is a registered backbone and ``num_bins`` (its input channels) >= 1."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    if num_bins < 1:
        raise ValueError(f"data.num_bins must be >= 1, got {num_bins}")


@dataclass(frozen=True)
class BackboneSpec:
    """``create_backbone(name, in_chans=in_chans, **overrides)``: ``in_chans`` is the voxel grid's bins."""

    name: str
    in_chans: int = DEFAULT_NUM_BINS
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def img_size(self) -> tuple[int, int]:
        """(H, W) pixels of the input the backbone takes: its preset's, or ``overrides["img_size"]`` (an int for a
        square or [H, W])."""
        size = self.overrides.get("img_size", BACKBONE_IMG_SIZES.get(self.name))
        return (size, size) if isinstance(size, int) else tuple(size)

    def with_overrides(self, **overrides: Any) -> BackboneSpec:
        """The same spec with ``overrides`` set on top of its own (e.g. a task's ``drop_path_rate``)."""
        return dataclasses.replace(self, overrides={**self.overrides, **overrides})


def build_backbone(spec: BackboneSpec) -> Backbone:
    """A freshly initialised backbone of ``spec``."""
    from evpretrain.models.registry import create_backbone

    return create_backbone(spec.name, in_chans=spec.in_chans, **spec.overrides)


@dataclass(frozen=True)
class _Data:
    num_bins: int = DEFAULT_NUM_BINS


@dataclass(frozen=True)
class _BackboneKeys:
    """The backbone's keys of section ``pretrain``, typed as in the pre-training config."""

    backbone: str
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    data: _Data = field(default_factory=_Data)

    def __post_init__(self) -> None:
        check_backbone(self.backbone, self.data.num_bins)


def backbone_spec(study: Mapping[str, Any]) -> BackboneSpec:
    """The backbone of a study config, validated; the rest of section ``pretrain`` is the pre-training's to check.

    Raises ConfigError naming the dotted key (``pretrain``, ``pretrain.backbone``, ``pretrain.data.num_bins``...).
    """
    pretrain = section(study, "pretrain")
    keys = {key: pretrain[key] for key in ("backbone", "backbone_overrides") if key in pretrain}
    if "data" in pretrain:
        data = pretrain["data"]  # not a mapping: from_mapping names pretrain.data
        keys["data"] = {k: v for k, v in data.items() if k == "num_bins"} if isinstance(data, Mapping) else data
    parsed = from_mapping(_BackboneKeys, keys, "pretrain")
    return BackboneSpec(parsed.backbone, parsed.data.num_bins, parsed.backbone_overrides)
