"""Plain ViT on event voxel grids: fixed sin-cos positions, no CLS token, runs on the visible tokens only (MAE)."""

from __future__ import annotations

from functools import partial

from timm.layers import PatchEmbed, calculate_drop_path_rates
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from evpretrain.models.base import Backbone, BackboneOutput, gather_tokens, init_xavier, kept_indices, tokens_to_map
from evpretrain.models.pos_embed import sincos_pos_embed_2d


class VisionTransformer(Backbone):
    """ViT encoder as in the paper's code: patch embedding conv -> LayerNorm -> GELU (``patch_norm``; plain conv as
    in MAE/ECDP when False), + fixed 2-D sin-cos positions, pre-norm timm blocks (fused SDPA attention), final norm.

    levels: block indices (0-based) returned as early/middle/last features; the default (depth/6 - 1,
        depth/3 - 1, depth - 1) is the paper's stage-1 fusion, blocks 1, 3 and 11 of ViT-S/B (its masked path).
    feature_blocks: block indices returned as feature maps (stride ``patch_size``) for dense heads; the default
        (depth/3 - 1, depth/2 - 1, 2 depth/3 - 1, depth - 1) is the paper's ``out_indices`` (3, 5, 7, 11).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 5,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        levels: tuple[int, ...] | None = None,
        feature_blocks: tuple[int, ...] | None = None,
        patch_norm: bool = True,
        drop_path_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm if patch_norm else None,
        )
        self.patch_act = nn.GELU() if patch_norm else nn.Identity()
        self.in_chans = in_chans
        self.img_size = tuple(self.patch_embed.img_size)
        self.patch_size = patch_size
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.embed_dim = embed_dim
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {patch_size}")
        # Non-persistent: a deterministic function of the grid, so checkpoints stay loadable at any img_size.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid_size)[None], persistent=False)

        drop_path = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path[i],
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.levels = _block_indices(levels, depth, (max(depth // 6, 1) - 1, max(depth // 3, 1) - 1, depth - 1))
        self.feature_blocks = _block_indices(
            feature_blocks, depth, tuple(max(depth * q // 6, 1) - 1 for q in (2, 3, 4, 6))
        )
        self.level_dims = [embed_dim] * len(self.levels)
        self.feature_dims = [embed_dim] * len(self.feature_blocks)
        self.feature_strides = [patch_size] * len(self.feature_blocks)
        self.num_layers = depth + 2
        self.vit_layer = 1
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation: the patch projection like a Linear, xavier-uniform Linears, unit LayerNorms.
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        for module in self.blocks.modules():
            init_xavier(module)

    def embed(self, x: Tensor) -> Tensor:
        """(B, N, D) patch tokens with their position embedding, from x (B, in_chans, H, W)."""
        return self.patch_act(self.patch_embed(x)) + self.pos_embed

    def forward(self, x: Tensor, mask: Tensor | None = None) -> BackboneOutput:
        """Encode x (B, in_chans, H, W); with ``mask`` (B, N) bool (True = hidden) only the visible tokens enter."""
        self._check_input(x)
        tokens = self.embed(x)
        kept = kept_indices(mask, x.shape[0], self.num_tokens, x.device)
        if mask is not None:
            tokens = gather_tokens(tokens, kept)
        levels, feature_maps = [], []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in self.levels:
                levels.append(tokens)
            if mask is None and i in self.feature_blocks:
                feature_maps.append(tokens_to_map(tokens, self.grid_size))
        return BackboneOutput(
            tokens=self.norm(tokens), levels=levels, kept=kept, feature_maps=feature_maps if mask is None else None
        )

    def layer_id(self, name: str) -> int:
        if name.startswith(("patch_embed.", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers - 1


def _block_indices(indices: tuple[int, ...] | None, depth: int, default: tuple[int, ...]) -> tuple[int, ...]:
    indices = tuple(sorted(set(default)) if indices is None else indices)
    if any(not 0 <= i < depth for i in indices) or list(indices) != sorted(set(indices)):
        raise ValueError(f"block indices must be distinct, ascending and in [0, {depth}), got {indices}")
    return indices
