"""Fixed 2-D sine-cosine position embedding (the layout of MAE's ``get_2d_sincos_pos_embed``, no CLS row)."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(P, dim): [sin(p * w_k), cos(p * w_k)] for k < dim / 2, w_k = 10000 ** (-k / (dim / 2)), in float64."""
    if dim % 2:
        raise ValueError(f"a 1-D sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: tuple[int, int]) -> Tensor:
    """(gh * gw, embed_dim) float32 for the row-major positions of a (gh, gw) token grid.

    As in MAE, the first half of the channels encodes the column (x) and the second half the row (y), each as
    ``sincos_1d(embed_dim / 2, coordinate)``; so token (row r, col c) = [sin(c w), cos(c w), sin(r w), cos(r w)].
    """
    if embed_dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")
    embedding = torch.cat(
        [sincos_1d(embed_dim // 2, cols.reshape(-1)), sincos_1d(embed_dim // 2, rows.reshape(-1))], dim=1
    )
    return embedding.float()
