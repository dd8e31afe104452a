"""Swin Transformer from timm's stages, masked as in SimMIM: hidden patches become a learned mask token.

Shifted windows need the full grid, so unlike the ViTs nothing is dropped: every position is encoded and
``kept`` lists them all. The mask is given on the last-level grid (stride 32 for Swin-T) and spread over the
stride-4 patch tokens, as SimMIM masks 32x32 patches. Patch embedding and merging never overlap cells and
attention only sees mask tokens at hidden positions, so a hidden patch's content reaches no output.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import Tensor, nn

from evpretrain.models.base import (
    Backbone,
    BackboneOutput,
    check_mask,
    kept_indices,
    space_to_depth_tokens,
    upsample_mask,
)


class SwinBackbone(Backbone):
    """timm's patch embedding (conv + LayerNorm, NHWC), its four ``SwinTransformerStage``s (patch merging between
    them) and final norm, plus a SimMIM mask token. Levels and feature maps are the four stage outputs.

    norm_eps: eps of every LayerNorm (patch embedding, blocks, patch merging, final): 1e-6 as the paper's Swin
        (``model/backbone/swin.py:44,299``), where timm's default is 1e-5.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 5,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        swin = SwinTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            norm_layer=partial(nn.LayerNorm, eps=norm_eps),
        )
        self.patch_embed = swin.patch_embed
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.stages = swin.layers
        self.norm = swin.norm
        # timm keeps fused attention for windows behind its "experimental" flag; it is plain SDPA with the
        # relative-position bias (plus the shift mask) as an additive attention mask.
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.fused_attn = True

        num_stages = len(depths)
        self.in_chans = in_chans
        self.img_size = tuple(self.patch_embed.img_size)
        self.patch_size = patch_size * 2 ** (num_stages - 1)
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the last-level stride {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.embed_dim = swin.num_features
        self.depths = tuple(depths)
        widths = [embed_dim * 2**i for i in range(num_stages)]
        self.levels = tuple(range(num_stages))
        self._folds = [2 ** (num_stages - 1 - i) for i in range(num_stages)]
        self.level_dims = [width * fold**2 for width, fold in zip(widths, self._folds)]
        self.feature_dims = widths
        self.feature_strides = [patch_size * 2**i for i in range(num_stages)]
        self.num_layers = sum(depths) + 2
        self.vit_layer = None  # no plain ViT blocks (layer-grafted groups)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> BackboneOutput:
        """Encode x (B, in_chans, H, W); ``mask`` (B, N) bool on the last-level grid, True = replace by the token."""
        self._check_input(x)
        batch_size = x.shape[0]
        if mask is not None:
            check_mask(mask, batch_size, self.num_tokens)
        kept = kept_indices(None, batch_size, self.num_tokens, x.device)
        x = self.patch_embed(x)  # (B, H / p, W / p, C)
        if mask is not None:
            hidden = upsample_mask(mask.view(batch_size, 1, *self.grid_size), self._folds[0]).permute(0, 2, 3, 1)
            x = torch.where(hidden, self.mask_token.to(x.dtype), x)

        stage_maps = []
        for stage in self.stages:
            x = stage(x)
            stage_maps.append(x.permute(0, 3, 1, 2))
        tokens = x.reshape(batch_size, self.num_tokens, self.embed_dim)
        levels = [space_to_depth_tokens(m, fold) for m, fold in zip(stage_maps[:-1], self._folds[:-1])] + [tokens]
        return BackboneOutput(
            tokens=self.norm(tokens), levels=levels, kept=kept, feature_maps=stage_maps if mask is None else None
        )

    def layer_id(self, name: str) -> int:
        if name.startswith(("patch_embed.", "mask_token")):
            return 0
        if name.startswith("stages."):
            parts = name.split(".")
            stage = int(parts[1])
            first = 1 + sum(self.depths[:stage])
            # The patch merging that opens a stage shares the id of the stage's first block.
            return first + int(parts[3]) if parts[2] == "blocks" else first
        return self.num_layers - 1

    def no_weight_decay(self) -> set[str]:
        return {
            name
            for name, _ in self.named_parameters()
            if name == "mask_token" or name.endswith("relative_position_bias_table")
        }
