"""ConvViT (ConvMAE, Gao et al. 2022): two convolutional stages, then a plain ViT stage on the last-level grid.

Masked modelling as ConvMAE does it: the mask on the last-level grid is spread over the pixels of the earlier
stages, every conv block zeroes the hidden positions before its 5x5 depthwise convolution (the only operation
that mixes positions; patch embeddings are non-overlapping), and the transformer stage drops the hidden tokens.
So nothing of a hidden patch reaches a visible token.
"""

from __future__ import annotations

from functools import partial

from timm.layers import DropPath, LayerNorm2d, Mlp, calculate_drop_path_rates
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from evpretrain.models.base import (
    Backbone,
    BackboneOutput,
    gather_tokens,
    init_xavier,
    kept_indices,
    space_to_depth_tokens,
    tokens_to_map,
    upsample_mask,
)
from evpretrain.models.pos_embed import sincos_pos_embed_2d


class ConvPatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, D, H / stride, W / stride): non-overlapping strided conv, channel LayerNorm, GELU."""

    def __init__(self, in_chans: int, embed_dim: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=stride, stride=stride)
        self.norm = LayerNorm2d(embed_dim, eps=1e-5)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.proj(x)))


class ConvBlock(nn.Module):
    """ConvMAE's block on (B, C, H, W): x + conv1x1 -> depthwise kxk -> conv1x1 mixing, then x + a 1x1-conv MLP.

    ``hidden`` (B, 1, H, W) bool, True = hidden, zeroes the depthwise convolution's input at hidden positions, so
    their content cannot spread to visible ones.
    """

    def __init__(
        self, dim: int, kernel_size: int = 5, mlp_ratio: float = 4.0, proj_drop: float = 0.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-5)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, use_conv=True)

    def forward(self, x: Tensor, hidden: Tensor | None = None) -> Tensor:
        mixer_input = self.conv1(self.norm1(x))
        if hidden is not None:
            mixer_input = mixer_input.masked_fill(hidden, 0.0)
        x = x + self.drop_path(self.conv2(self.attn(mixer_input)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvViT(Backbone):
    """Stages of ``depths`` blocks at widths ``embed_dims``, each entered by a ``strides`` patch embedding:
    two ConvBlock stages and a ViT stage (Linear on the tokens, fixed sin-cos positions, timm blocks, final norm).

    Levels are the three stage outputs (levels = (0, 1, 2)) folded onto the last-level grid by space-to-depth;
    feature maps are the same three stage outputs at strides (s0, s0 s1, s0 s1 s2).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 5,
        embed_dims: tuple[int, int, int] = (128, 256, 384),
        depths: tuple[int, int, int] = (2, 2, 11),
        strides: tuple[int, int, int] = (4, 2, 2),
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        kernel_size: int = 5,
        drop_path_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(strides) == 3:
            raise ValueError("ConvViT has three stages: embed_dims, depths and strides need three entries each")
        self.in_chans = in_chans
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = strides[0] * strides[1] * strides[2]
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the total stride {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.embed_dim = embed_dims[2]
        self.strides = tuple(strides)

        drop_path = calculate_drop_path_rates(drop_path_rate, sum(depths))
        conv_block = partial(ConvBlock, kernel_size=kernel_size, mlp_ratio=mlp_ratio, proj_drop=proj_drop_rate)
        self.patch_embed1 = ConvPatchEmbed(in_chans, embed_dims[0], strides[0])
        self.blocks1 = nn.ModuleList([conv_block(embed_dims[0], drop_path=drop_path[i]) for i in range(depths[0])])
        self.patch_embed2 = ConvPatchEmbed(embed_dims[0], embed_dims[1], strides[1])
        self.blocks2 = nn.ModuleList(
            [conv_block(embed_dims[1], drop_path=drop_path[depths[0] + i]) for i in range(depths[1])]
        )
        self.patch_embed3 = ConvPatchEmbed(embed_dims[1], embed_dims[2], strides[2])
        self.patch_embed4 = nn.Linear(embed_dims[2], embed_dims[2])
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dims[2], self.grid_size)[None], persistent=False)
        self.blocks3 = nn.ModuleList(
            [
                Block(
                    dim=embed_dims[2],
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path[depths[0] + depths[1] + i],
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for i in range(depths[2])
            ]
        )
        self.norm = nn.LayerNorm(embed_dims[2], eps=1e-6)

        self.levels = (0, 1, 2)
        self.level_dims = [
            embed_dims[0] * (strides[1] * strides[2]) ** 2,
            embed_dims[1] * strides[2] ** 2,
            embed_dims[2],
        ]
        self.feature_dims = list(embed_dims)
        self.feature_strides = [strides[0], strides[0] * strides[1], self.patch_size]
        self.depths = tuple(depths)
        self.num_layers = sum(depths) + 2
        self.vit_layer = 1 + depths[0] + depths[1]  # blocks3.0, the paper's vit_block.0
        self._init_weights()

    def _init_weights(self) -> None:
        # ConvMAE's initialisation: the last patch projection like a Linear, xavier-uniform Linears, unit norms;
        # convolutions keep PyTorch's default.
        weight = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for module in self.modules():
            init_xavier(module)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> BackboneOutput:
        """Encode x (B, in_chans, H, W); ``mask`` (B, N) bool on the last-level grid, True = hidden."""
        self._check_input(x)
        batch_size = x.shape[0]
        kept = kept_indices(mask, batch_size, self.num_tokens, x.device)
        hidden1 = hidden2 = None
        if mask is not None:
            hidden2 = upsample_mask(mask.view(batch_size, 1, *self.grid_size), self.strides[2])
            hidden1 = upsample_mask(hidden2, self.strides[1])

        stage1 = self.patch_embed1(x)
        for block in self.blocks1:
            stage1 = block(stage1, hidden1)
        stage2 = self.patch_embed2(stage1)
        for block in self.blocks2:
            stage2 = block(stage2, hidden2)
        tokens = self.patch_embed4(self.patch_embed3(stage2).flatten(2).transpose(1, 2)) + self.pos_embed
        if mask is not None:
            tokens = gather_tokens(tokens, kept)
        for block in self.blocks3:
            tokens = block(tokens)

        fold1 = space_to_depth_tokens(stage1, self.strides[1] * self.strides[2])
        fold2 = space_to_depth_tokens(stage2, self.strides[2])
        if mask is not None:
            fold1, fold2 = gather_tokens(fold1, kept), gather_tokens(fold2, kept)
        feature_maps = None if mask is not None else [stage1, stage2, tokens_to_map(tokens, self.grid_size)]
        return BackboneOutput(
            tokens=self.norm(tokens), levels=[fold1, fold2, tokens], kept=kept, feature_maps=feature_maps
        )

    def layer_id(self, name: str) -> int:
        # The input embedding is 0; a later stage's patch embedding shares the id of its first block.
        d1, d2, _ = self.depths
        first_block = {
            "patch_embed1": 0,
            "blocks1": 1,
            "patch_embed2": 1 + d1,
            "blocks2": 1 + d1,
            "patch_embed3": 1 + d1 + d2,
            "patch_embed4": 1 + d1 + d2,
            "pos_embed": 1 + d1 + d2,
            "blocks3": 1 + d1 + d2,
        }
        head = name.split(".")[0]
        if head not in first_block:
            return self.num_layers - 1
        offset = int(name.split(".")[1]) if head.startswith("blocks") else 0
        return first_block[head] + offset
