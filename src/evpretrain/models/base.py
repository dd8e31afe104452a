"""The interface every backbone honours: its output, its attributes, and the token bookkeeping of masking.

A mask lives on the grid of the backbone's LAST level (the token grid the contrastive stages and the decoder see):
``mask`` is ``(B, N)`` bool, True = hidden, with the same number of True per row so that the kept tokens stack
into one ``(B, N_kept, D)`` tensor (MAE's convention; per-row counts would need padding and attention masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class BackboneOutput:
    """What a backbone returns for a batch.

    tokens:       (B, N_kept, D) last-level tokens after the final norm.
    levels:       early/middle/last features as tokens on the last-level grid, one (B, N_kept, D_l) tensor per
                  entry of ``Backbone.levels``, D_l = ``Backbone.level_dims[l]``; all BEFORE the final norm (the
                  paper's stage-1 fusion is ``backbone.norm(sum of projected levels)``, so the last entry is the
                  pre-norm output of the last block). A finer level (a conv or Swin stage) is folded onto the
                  last-level grid by space-to-depth, channel-major (c, i, j), so a Linear on it is exactly the
                  strided Conv2d that ConvMAE uses to bring a stage to the last level.
    kept:         (B, N_kept) long, ascending indices of the kept tokens among the N last-level positions (all
                  N positions when no mask is given, or for a backbone that keeps the full grid, i.e. Swin).
    feature_maps: multi-scale maps (B, C_l, h_l, w_l) for dense heads, before the final norm, with channels
                  ``Backbone.feature_dims`` and strides ``Backbone.feature_strides`` (pixels); None when a mask
                  was given (masked inputs are for pre-training, not for dense prediction).
    """

    tokens: Tensor
    levels: list[Tensor]
    kept: Tensor
    feature_maps: list[Tensor] | None


class Backbone(nn.Module):
    """Base class of the event backbones; subclasses set the attributes below in ``__init__``.

    in_chans: input channels (voxel-grid bins); img_size: (H, W) pixels; patch_size: token stride of the last
    level in pixels; grid_size: (gh, gw) last-level grid; num_tokens = gh * gw; embed_dim: last-level width;
    levels: indices (blocks for a ViT, stages otherwise) of the features returned in ``BackboneOutput.levels``;
    level_dims: their widths as tokens; feature_dims / feature_strides: channels and strides of
    ``BackboneOutput.feature_maps``; norm: the final norm (stage 2 trains only this); num_layers: how many
    layer ids ``layer_id`` hands out (for layer-wise learning-rate scales); vit_layer: the layer id of the first
    plain transformer block (the paper's ``vit_block.0``, whose index the layer-grafted groups count), None when
    there are none (Swin).

    Subclasses implement ``forward(x (B, in_chans, H, W), mask (B, N) bool | None) -> BackboneOutput`` and
    ``layer_id(parameter name) -> int``: 0 for the input embedding up to num_layers - 1 for the final norm.
    """

    in_chans: int
    img_size: tuple[int, int]
    patch_size: int
    grid_size: tuple[int, int]
    embed_dim: int
    levels: tuple[int, ...]
    level_dims: list[int]
    feature_dims: list[int]
    feature_strides: list[int]
    norm: nn.Module
    num_layers: int
    vit_layer: int | None

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @staticmethod
    def pool(out: BackboneOutput) -> Tensor:
        """(B, D): the mean of the output tokens, the paper's pooled representation (no CLS token)."""
        return out.tokens.mean(dim=1)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that should not be weight-decayed beyond biases and norms (timm's convention)."""
        return set()

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_chans, *self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {expected[0]}, {expected[1]}, {expected[2]}),"
                f" got {tuple(x.shape)}"
            )


def check_mask(mask: Tensor, batch_size: int, num_tokens: int) -> int:
    """The number of hidden tokens per row of ``mask`` (B, N) bool, True = hidden.

    Raises ValueError unless the mask has that shape and dtype, hides the same number of tokens in every row and
    leaves at least one visible.
    """
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch_size, num_tokens):
        raise ValueError(
            f"mask must be bool of shape ({batch_size}, {num_tokens}) on the last-level grid, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    num_hidden = mask.sum(dim=1)
    if bool((num_hidden != num_hidden[0]).any()):
        raise ValueError(f"mask must hide the same number of tokens in every row, got {num_hidden.tolist()}")
    if int(num_hidden[0]) == num_tokens:
        raise ValueError("mask hides every token; at least one must stay visible")
    return int(num_hidden[0])


def kept_indices(mask: Tensor | None, batch_size: int, num_tokens: int, device: torch.device) -> Tensor:
    """(B, N_kept) long: ascending positions of the tokens that ``mask`` (B, N) bool, True = hidden, keeps
    (all N when ``mask`` is None)."""
    if mask is None:
        return torch.arange(num_tokens, device=device).expand(batch_size, num_tokens)
    num_hidden = check_mask(mask, batch_size, num_tokens)
    # A stable sort of the hidden flags puts the kept positions first, still in ascending order.
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    return order[:, : num_tokens - num_hidden]


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """(B, K, D): the rows ``index`` (B, K) long of ``tokens`` (B, N, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def tokens_to_map(tokens: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """(B, D, gh, gw) from row-major tokens (B, gh * gw, D)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid_size)


def space_to_depth_tokens(feature_map: Tensor, factor: int) -> Tensor:
    """(B, h * w, C * factor**2) tokens of a (B, C, h * factor, w * factor) map, one per factor x factor cell.

    Features are ordered (c, i, j) within a token, the layout of a Conv2d weight (out, C, k, k), so that
    ``Linear(C * factor**2, D)`` with the weight ``conv.weight.flatten(1)`` equals ``Conv2d(C, D, factor, factor)``.
    """
    b, c, height, width = feature_map.shape
    h, w = height // factor, width // factor
    cells = feature_map.reshape(b, c, h, factor, w, factor).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(b, h * w, c * factor * factor)


def upsample_mask(mask: Tensor, factor: int) -> Tensor:
    """(B, 1, gh * factor, gw * factor): each cell of ``mask`` (B, 1, gh, gw) repeated over factor x factor cells."""
    return mask.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def init_xavier(module: nn.Module) -> None:
    """MAE's and the paper's initialisation, for ``Module.apply``: xavier-uniform Linear weights, zero biases,
    unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
