"""Sizes and resizing of per-pixel maps onto the network's input grid, shared by the pre-training and downstream
datasets. ``bilinear`` (the default) keeps a map's per-pixel meaning: a value is averaged, not summed, over the pixels
it covers; ``nearest`` and ``bicubic`` are the paper's choices for its voxel grids and targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RESIZE_MODES", "as_size", "resize_maps"]

RESIZE_MODES = ("bilinear", "nearest", "bicubic")


def as_size(size: tuple[int, int] | int) -> tuple[int, int]:
    """(H, W) from a pair or one int for a square; a non-positive side raises."""
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"expected a positive size, got {size}")
    return int(height), int(width)


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) float maps resized to ``size`` (H', W'). Returns ``maps`` itself when the size already matches.

    ``bilinear``: half-pixel centres, antialiased when shrinking. ``nearest``: each output pixel takes input pixel
    floor(i * H / H') (``F.interpolate``'s ``nearest``); ``bicubic``: half-pixel centres, no antialiasing, no clamping.
    The last two are ``F.interpolate`` with its defaults, as the paper's ``utils/reshape.py`` ``resize`` calls it.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode == "nearest":
        return F.interpolate(maps[None], size=size, mode="nearest")[0]
    if mode == "bicubic":
        return F.interpolate(maps[None], size=size, mode="bicubic", align_corners=False)[0]
    # Antialiasing only changes a shrinking axis, and costs 1.7x when upsampling 64 -> 224 (measured).
    shrinks = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False, antialias=shrinks)[0]
