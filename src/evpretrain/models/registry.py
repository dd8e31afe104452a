"""Backbones by name: the paper-size models and small presets for the demo and for CPU tests."""

from __future__ import annotations

import inspect
from typing import Any

from evpretrain.config import ConfigError
from evpretrain.models.base import Backbone
from evpretrain.models.convvit import ConvViT
from evpretrain.models.swin import SwinBackbone
from evpretrain.models.vit import VisionTransformer

# name -> (class, keyword arguments); every preset takes a 5-bin voxel grid (the classes' default in_chans).
_PRESETS: dict[str, tuple[type[Backbone], dict[str, Any]]] = {
    "vit_small_patch16": (
        VisionTransformer,
        dict(
            img_size=224,
            patch_size=16,
            embed_dim=384,
            depth=12,
            num_heads=12,
            levels=(1, 3, 11),
            feature_blocks=(3, 5, 7, 11),
        ),
    ),
    "vit_base_patch16": (
        VisionTransformer,
        dict(
            img_size=224,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            levels=(1, 3, 11),
            feature_blocks=(3, 5, 7, 11),
        ),
    ),
    "convvit_small": (
        ConvViT,
        dict(img_size=224, embed_dims=(128, 256, 384), depths=(2, 2, 11), strides=(4, 2, 2), num_heads=12),
    ),
    "convvit_base": (
        ConvViT,
        dict(img_size=224, embed_dims=(256, 384, 768), depths=(2, 2, 11), strides=(4, 2, 2), num_heads=12),
    ),
    "swin_tiny": (
        SwinBackbone,
        dict(img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    ),
    # Demo / CPU presets on 64x64 voxel grids.
    "vit_demo": (VisionTransformer, dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)),
    "vit_tiny_demo": (
        VisionTransformer,
        dict(
            img_size=64,
            patch_size=8,
            embed_dim=128,
            depth=4,
            num_heads=4,
            levels=(0, 1, 3),
            feature_blocks=(0, 1, 2, 3),
        ),
    ),
    "convvit_demo": (
        ConvViT,
        dict(img_size=64, embed_dims=(64, 96, 192), depths=(1, 1, 4), strides=(2, 2, 2), num_heads=3),
    ),
    "swin_demo": (
        SwinBackbone,
        dict(img_size=64, patch_size=2, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4),
    ),
}


def list_backbones() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(_PRESETS)


def create_backbone(name: str, **overrides: Any) -> Backbone:
    """A freshly initialised backbone ``name`` with its preset arguments updated by ``overrides``
    (e.g. ``in_chans=3``, ``img_size=(128, 160)``, ``drop_path_rate=0.1``).

    Raises ConfigError naming the known backbones for an unknown name, the accepted arguments for an unknown
    override, and what the class refuses in an override's value (``depth: 0``).
    """
    if name not in _PRESETS:
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")
    cls, preset = _PRESETS[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ConfigError(f"backbone {name!r} ({cls.__name__}) does not take {unknown}; it takes {accepted}")
    try:
        return cls(**{**preset, **overrides})
    except (TypeError, ValueError, AssertionError, ZeroDivisionError) as err:  # timm's layers assert
        raise ConfigError(f"backbone {name!r} with overrides {overrides}: {type(err).__name__}: {err}") from err
