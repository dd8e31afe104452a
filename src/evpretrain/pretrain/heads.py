"""Pre-training heads: the stage-1 reconstruction decoder and the stage-2/3 token projector, predictor and teacher
projection. Shapes follow the backbone contract: tokens (B, N_kept, D) with ``kept`` (B, N_kept) indices into the
N = gh * gw positions of the last-level grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from evpretrain.models.base import init_xavier
from evpretrain.models.pos_embed import sincos_pos_embed_2d


class FeatureFusion(nn.Module):
    """``norm`` of the sum of early, middle and last features (the paper's multi-scale decoder input).

    As in the paper's code, ``norm`` is the backbone's own final norm (shared, not a copy), so the fused input
    lives where the encoder's output does. Levels wider than the last one (ConvViT's and Swin's finer stages,
    folded onto the last grid by space-to-depth) are first projected by a Linear layer, which equals ConvMAE's
    strided-conv stage decoding. Input: list of (B, N_kept, D_l); output (B, N_kept, D_last).
    """

    def __init__(self, level_dims: Sequence[int], norm: nn.Module):
        super().__init__()
        out_dim = level_dims[-1]
        self.projections = nn.ModuleList(
            nn.Identity() if dim == out_dim else nn.Linear(dim, out_dim) for dim in level_dims
        )
        self.norm = norm

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(levels) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} feature levels, got {len(levels)}")
        return self.norm(sum(proj(level) for proj, level in zip(self.projections, levels)))


class ReconstructionDecoder(nn.Module):
    """A light ViT decoder (MAE-style) predicting ``out_chans`` x patch x patch values for every position.

    The kept tokens are embedded, mask tokens fill the hidden positions, a fixed 2-D sin-cos position embedding is
    added, and ``depth`` transformer blocks run on the full grid. Output (B, N, patch_size**2 * out_chans).
    ``mask_token_init``: ``normal`` (std 0.02, MAE's) or ``zeros`` (the paper's code never initialises it,
    model/pretrain/pr_rec_decoder.py:21,34-50).
    """

    def __init__(
        self,
        in_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        out_chans: int = 1,
        dim: int = 256,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        mask_token_init: str = "normal",
    ):
        super().__init__()
        if mask_token_init not in ("normal", "zeros"):
            raise ValueError(f"mask_token_init must be 'normal' or 'zeros', got {mask_token_init!r}")
        self.grid_size = tuple(grid_size)
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid_size).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm) for _ in range(depth)
        )
        self.norm = _layer_norm(dim)
        self.pred = nn.Linear(dim, patch_size**2 * out_chans)
        self.apply(init_xavier)
        if mask_token_init == "normal":
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        batch, num_positions = tokens.shape[0], self.grid_size[0] * self.grid_size[1]
        x = self.embed(tokens)
        full = self.mask_token.to(x.dtype).expand(batch, num_positions, -1).clone()
        full = full.scatter(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        x = full + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


def _layer_norm(dim: int, **factory) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **factory)


class TokenMLP(nn.Module):
    """Per-token MLP with BatchNorm over all tokens of the batch (the paper's 2-D MLP head, MoCo v3 style).

    ``num_layers`` Linear layers without bias; BatchNorm + ReLU between them; a final BatchNorm without affine
    parameters (SimCLR). Statistics are taken over batch and positions, as BatchNorm2d on the token grid does.
    Input and output (B, N, D).
    """

    def __init__(self, num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            d_in = in_dim if i == 0 else hidden_dim
            d_out = out_dim if i == num_layers - 1 else hidden_dim
            layers.append(nn.Linear(d_in, d_out, bias=False))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
            elif last_bn:
                layers.append(nn.BatchNorm1d(d_out, affine=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, num, dim = tokens.shape
        return self.layers(tokens.reshape(batch * num, dim)).reshape(batch, num, -1)


class TeacherProjection(nn.Module):
    """Teacher tokens -> student space: LayerNorm, then a bias-free Linear, (B, N, D_t) -> (B, N, D); or, with
    ``grid_size`` (h, w) of the input tokens and ``stride`` 2, a Conv2d(D_t, D, 2, stride 2) with bias on the token
    grid, (B, h * w, D_t) -> (B, h / 2 * w / 2, D), row-major (the paper's Swin branch: a 14 x 14 CLIP grid onto
    the 7 x 7 backbone grid, model/pretrain/pr_hub_model.py:94-97,218-219)."""

    def __init__(self, teacher_dim: int, out_dim: int, grid_size: Sequence[int] | None = None, stride: int = 1):
        super().__init__()
        if stride not in (1, 2) or (stride == 2 and (grid_size is None or any(int(s) % 2 for s in grid_size))):
            raise ValueError(f"stride must be 1, or 2 with an even token grid, got stride {stride} on {grid_size}")
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))
        self.norm = nn.LayerNorm(teacher_dim)
        if stride == 1:
            self.proj = nn.Linear(teacher_dim, out_dim, bias=False)
        else:
            self.proj = nn.Conv2d(teacher_dim, out_dim, 2, stride=2)  # PyTorch's default init, as theirs

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(tokens)
        if isinstance(self.proj, nn.Linear):
            return self.proj(tokens)
        batch, num, dim = tokens.shape
        h, w = self.grid_size
        if num != h * w:
            raise ValueError(f"expected {h * w} tokens of a {h}x{w} grid, got {num}")
        grid = tokens.transpose(1, 2).reshape(batch, dim, h, w)
        return self.proj(grid).flatten(2).transpose(1, 2)
