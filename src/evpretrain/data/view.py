"""The paper's view augmentation of per-pixel maps (BIT-Vision/EventPretrain, dataset/augmentation/view_augment.py
``evg_augment``): a random crop drawn by their rule, a resize back to the input size, a horizontal flip. The draw and
its application are separate, so that one draw moves several maps (a voxel grid and its target) alike.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evpretrain.data.resize import resize_maps

__all__ = ["CropBox", "apply_view", "view_crop_box"]

CropBox = tuple[int, int, int, int]  # (top, left, height, width) in pixels of the view it was drawn on


def view_crop_box(size: tuple[int, int], scale: tuple[float, float], rng: np.random.Generator) -> CropBox:
    """The crop of the paper's ``view_crop`` (view_augment.py:9-33) on a view of ``size`` (H, W) pixels.

    Up to 10 tries: an area fraction uniform in ``scale`` and an aspect ratio (width / height) uniform in
    [3/4, 4/3] times the view's own; the sides rounded, then swapped with probability 1/2 (``randint(0, 10) < 5``). The
    first crop strictly smaller than the view on both sides is placed at a uniform offset in [0, W - w) (their
    ``randint`` excludes W - w, so a crop never touches the right or bottom edge). After 10 misses, or when
    ``scale[0] >= 1``, the whole view. Same distribution as theirs; the draws come from ``rng``, not numpy's global
    state.
    """
    height, width = size
    if scale[0] >= 1.0:
        return 0, 0, height, width
    area = height * width
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = rng.uniform(width / height * 3 / 4, width / height * 4 / 3)
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if rng.integers(0, 10) < 5:
            crop_w, crop_h = crop_h, crop_w
        if crop_w < width and crop_h < height:
            left = int(rng.integers(0, width - crop_w))
            top = int(rng.integers(0, height - crop_h))
            return top, left, crop_h, crop_w
    return 0, 0, height, width


def apply_view(
    maps: torch.Tensor, crop: CropBox, size: tuple[int, int], hflip: bool, mode: str = "bilinear"
) -> torch.Tensor:
    """(C, H, W) maps cropped to ``crop``, resized to ``size`` (H', W') with ``mode`` (``resize_maps``) and
    mirrored left-right when ``hflip``: the order of the paper's ``evg_augment`` (view_augment.py:71-73)."""
    top, left, height, width = crop
    if (top, left, height, width) != (0, 0, *maps.shape[-2:]):
        maps = maps[..., top : top + height, left : left + width].contiguous()
    maps = resize_maps(maps, size, mode)
    return maps.flip(-1) if hflip else maps
