"""The frozen image teacher: images in [0, 1] in, one token per cell of the teacher's own feature grid out.

A teacher resizes its input to the resolution it was trained at, applies the normalisation it was trained with,
and returns its last feature map as tokens in row-major grid order. ``resize_tokens`` brings those tokens onto the
student's token grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Teacher", "resize_tokens"]


class Teacher(nn.Module):
    """Base class of the frozen image teachers.

    Subclasses build their network, then call ``freeze()``, and implement ``encode``. Attributes:
    ``name`` (registry name), ``input_size`` (H, W) pixels the network sees, ``grid_size`` (gh, gw) of its tokens,
    ``embed_dim`` (D) of a token.
    """

    name: str = ""

    def __init__(
        self,
        *,
        input_size: tuple[int, int],
        grid_size: tuple[int, int],
        embed_dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize_mode: str = "bilinear",
    ):
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.embed_dim = int(embed_dim)
        self.resize_mode = resize_mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def freeze(self) -> Teacher:
        """No parameter takes gradients and the network stays in inference mode (BatchNorm statistics, dropout)."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        # A frozen teacher ignores train(): a parent module's .train() must not switch its BatchNorm to batch
        # statistics.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, 3, *input_size) resized (the whole image, no crop: the tokens must
        cover the same field of view as the event frame) and normalised as the network was trained."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"{self.name}: expected images (B, 3, H, W) float in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        images = images.to(self.mean.dtype)
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(
                images, size=self.input_size, mode=self.resize_mode, align_corners=False, antialias=True
            )
            images = images.clamp(0.0, 1.0)  # bicubic overshoots at edges
        return (images - self.mean) / self.std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, *input_size) -> tokens (B, gh * gw, D), row-major over the grid."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float in [0, 1] -> tokens (B, gh * gw, D) on the teacher's own grid."""
        return self.encode(self.preprocess(images))


def resize_tokens(tokens: torch.Tensor, from_grid: Sequence[int], to_grid: Sequence[int]) -> torch.Tensor:
    """Resample tokens laid out on a grid to another grid, bilinearly.

    ``tokens`` (B, h * w, D) row-major over ``from_grid`` (h, w) -> (B, gh * gw, D) over ``to_grid`` (gh, gw).
    Cell centres are matched (half-pixel convention, ``align_corners=False``); when the grid shrinks the filter is
    widened (antialiased), so each output token averages every input token its cell covers instead of sampling two.
    """
    (h, w), (gh, gw) = (int(v) for v in from_grid), (int(v) for v in to_grid)
    if tokens.ndim != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"expected tokens (B, {h * w}, D) for a {h}x{w} grid, got {tuple(tokens.shape)}")
    if (h, w) == (gh, gw):
        return tokens
    batch, _, dim = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, dim, h, w)
    dtype = grid.dtype
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        grid = grid.float()  # antialiased interpolation has no half-precision CPU kernel
    resized = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)
    return resized.to(dtype).flatten(2).transpose(1, 2)
