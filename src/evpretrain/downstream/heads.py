"""Dense-prediction heads on a backbone's multi-level feature maps: UPerNet for semantic segmentation and optical
flow, each with an FCN auxiliary head.

Feature maps follow the backbone contract: a list of (B, C_l, h_l, w_l) maps, finest first, with channels
``Backbone.feature_dims`` and strides ``Backbone.feature_strides`` (input pixels per map cell). A neck turns them
into the maps the heads read (``NECKS``):

- ``none``, the paper's code (BIT-Vision/EventPretrain ``model/backbone/{vit,convvit,swin}.py``): a ViT's four
  maps at its patch stride go to the heads as they are (``vit.py:149-150``); a ConvViT's two conv-stage maps, its
  last stage AFTER the final norm, and a fourth level made from that by a 3x3 stride-2 conv (no padding), BatchNorm
  and GELU (``convvit.py:53-58,200-204``: 14x14 -> 6x6 at 224 pixels); a Swin's four stage maps as they are.
- ``beit``: a ViT's maps rescaled into a stride s/4 .. 2s pyramid by ``MultiLevelNeck`` (BEiT / MAE /
  mmsegmentation's ViT + UPerNet); ConvViT's three stage maps (the last before the final norm) and Swin's maps as
  they are.

Predictions come out at the finest map's stride and are resized to the size the caller asks for (the label's, as
the paper's code does, or the input's): ``upsample_to`` for logits, ``upsample_flow`` for flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evpretrain.downstream.config import FLOW_PREDICTORS, NECKS
from evpretrain.models.base import Backbone, BackboneOutput, tokens_to_map
from evpretrain.models.convvit import ConvViT


def upsample_to(logits: Tensor, size: Sequence[int]) -> Tensor:
    """(B, K, *size): bilinear resize of ``logits`` (B, K, h, w), align_corners=False (mmsegmentation's resize)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def upsample_flow(flow: Tensor, size: Sequence[int]) -> Tensor:
    """(B, 2, *size): flow (B, 2, h, w) in units of its own grid cells, resized bilinearly to ``size`` = (H, W) and
    rescaled to pixels of that size: x (channel 0) times W / w, y (channel 1) times H / h (RAFT's ``upflow8``, per
    axis so that a size that is not a multiple of the grid stays exact). Interpolation uses align_corners=False
    like ``upsample_to`` (RAFT uses True; the two differ only in how the border cells are stretched)."""
    height, width = size
    scale = flow.new_tensor([width / flow.shape[-1], height / flow.shape[-2]]).view(1, 2, 1, 1)
    return upsample_to(flow, size) * scale


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias), BatchNorm, ReLU; 'same' padding (mmcv's ConvModule as mmsegmentation's heads use it).
    Written out rather than torchvision's Conv2dNormActivation (same layout): importing torchvision.ops costs a
    job 2 s of start-up."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _init_dense_head(module: nn.Module) -> None:
    """mmsegmentation's initialisation, for ``Module.apply``: Kaiming-normal (fan-out) convolutions with zero
    biases, unit BatchNorms. Transposed convolutions keep PyTorch's default, as in BEiT's neck."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _init_predictor(conv: nn.Conv2d) -> None:
    """A small normal initialisation of a final 1x1 / 3x3 predictor (mmsegmentation's ``conv_seg``: std 0.01)."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


class MultiLevelNeck(nn.Module):
    """Four single-stride ViT maps -> strides (s/4, s/2, s, 2s) for s = the patch size (BEiT's ``fpn1..fpn4``).

    Level 0: 4x up by ConvTranspose2d(2, 2) -> BatchNorm -> GELU -> ConvTranspose2d(2, 2); level 1: 2x up by one
    ConvTranspose2d(2, 2); level 2: identity; level 3: 2x2 max-pool. Channels are kept. Input and output: lists
    of four (B, C_l, h, w) maps -> (B, C_l, 4h, 4w), (B, C_l, 2h, 2w), (B, C_l, h, w), (B, C_l, h/2, w/2).
    """

    def __init__(self, in_channels: Sequence[int], stride: int):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"the ViT multi-level neck takes 4 maps, got {len(in_channels)}")
        if stride % 4:
            raise ValueError(f"the ViT multi-level neck needs a stride divisible by 4, got {stride}")
        c0, c1 = in_channels[0], in_channels[1]
        self.rescales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(c0, c0, 2, stride=2),
                    nn.BatchNorm2d(c0),
                    nn.GELU(),
                    nn.ConvTranspose2d(c0, c0, 2, stride=2),
                ),
                nn.ConvTranspose2d(c1, c1, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2),
            ]
        )
        self.out_strides = [stride // 4, stride // 2, stride, stride * 2]

    def forward(self, feature_maps: Sequence[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.rescales):
            raise ValueError(f"expected {len(self.rescales)} feature maps, got {len(feature_maps)}")
        return [rescale(feature_map) for rescale, feature_map in zip(self.rescales, feature_maps)]


class ConvViTLevels(nn.Module):
    """The paper code's ConvViT maps for dense heads (``convvit.py:53-58,200-204``): stage 1, stage 2, the last
    stage after the backbone's final norm, and that map through Conv2d(C, C, 3, stride 2, no padding) ->
    BatchNorm -> GELU. Channels (c1, c2, c3, c3); the fourth map is ((h - 3) // 2 + 1) cells high for a last-level
    grid h high (14 -> 6), so the grid must be at least 3x3. The conv keeps PyTorch's initialisation, as theirs."""

    def __init__(self, channels: int, grid_size: Sequence[int]):
        super().__init__()
        if min(grid_size) < 3:
            raise ValueError(
                f"the ConvViT fourth level needs a last-level grid of at least 3x3, got {tuple(grid_size)}"
            )
        self.grid_size = tuple(grid_size)
        self.down = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2), nn.BatchNorm2d(channels), nn.GELU())

    def forward(self, output: BackboneOutput) -> list[Tensor]:
        last = tokens_to_map(output.tokens, self.grid_size)  # the final-normed tokens, as theirs
        return [*output.feature_maps[:2], last, self.down(last)]


class DenseNeck(nn.Module):
    """A backbone's output -> the maps the heads read: ``feature_maps`` through ``rescale`` (an identity or
    ``MultiLevelNeck``), or ``ConvViTLevels``. ``channels`` and ``strides`` describe the maps it returns."""

    def __init__(self, backbone: Backbone, kind: str = "none"):
        super().__init__()
        if kind not in NECKS:
            raise ValueError(f"neck must be one of {NECKS}, got {kind!r}")
        dims, strides = list(backbone.feature_dims), list(backbone.feature_strides)
        self.levels: nn.Module | None = None
        self.rescale: nn.Module = nn.Identity()
        if kind == "none" and isinstance(backbone, ConvViT):
            self.levels = ConvViTLevels(dims[-1], backbone.grid_size)
            dims, strides = [*dims, dims[-1]], [*strides, 2 * strides[-1]]
        elif kind == "beit" and len(set(strides)) == 1 and len(strides) > 1:
            self.rescale = MultiLevelNeck(dims, strides[0])
            strides = list(self.rescale.out_strides)
        self.channels, self.strides = dims, strides

    def forward(self, output: BackboneOutput) -> list[Tensor]:
        if self.levels is not None:
            return self.levels(output)
        return self.rescale(output.feature_maps)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pooling on one map (B, C, h, w): average-pool to each of ``pool_scales`` x scale cells, 1x1 conv-BN-
    ReLU to ``channels``, upsample back to (h, w); returns the input concatenated with all of them,
    (B, C + len(pool_scales) * channels, h, w)."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_bn_relu(in_channels, channels, 1)) for scale in pool_scales
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, *(upsample_to(stage(x), x.shape[-2:]) for stage in self.stages)], dim=1)


class UPerFusion(nn.Module):
    """UPerNet's feature fusion (Xiao et al. 2018, as mmsegmentation's ``UPerHead`` without its classifier).

    A pyramid pooling module and a 3x3 bottleneck on the coarsest map; 1x1 lateral convs on the others; a top-down
    path adding each coarser level, upsampled, to the next finer one; 3x3 FPN convs; every level upsampled to the
    finest and concatenated; a 3x3 fusion conv. All convs are conv-BN-ReLU. Input: maps finest first, (B, C_l,
    h_l, w_l); output (B, channels, h_0, w_0), at the stride of the finest map.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.in_channels = list(in_channels)
        self.ppm = PyramidPoolingModule(in_channels[-1], channels, pool_scales)
        self.ppm_bottleneck = _conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fusion = _conv_bn_relu(len(in_channels) * channels, channels, 3)

    def forward(self, feature_maps: Sequence[Tensor]) -> Tensor:
        if [f.shape[1] for f in feature_maps] != self.in_channels:
            raise ValueError(
                f"expected maps with channels {self.in_channels}, got {[f.shape[1] for f in feature_maps]}"
            )
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feature_maps)]
        laterals.append(self.ppm_bottleneck(self.ppm(feature_maps[-1])))
        for level in range(len(laterals) - 1, 0, -1):
            finer = laterals[level - 1]
            laterals[level - 1] = finer + upsample_to(laterals[level], finer.shape[-2:])
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        finest_size = outputs[0].shape[-2:]
        return self.fusion(torch.cat([upsample_to(out, finest_size) for out in outputs], dim=1))


class UPerHead(nn.Module):
    """UPerNet segmentation head: ``UPerFusion``, dropout 0.1, 1x1 classifier.

    Input: maps finest first (B, C_l, h_l, w_l) with ``in_channels``; ``in_strides`` are their strides in pixels.
    Output: logits (B, num_classes, h_0, w_0) at the finest stride ``out_stride``; ``upsample_to`` brings them to
    the input size.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(in_channels) != len(in_strides):
            raise ValueError(f"{len(in_channels)} channel counts for {len(in_strides)} strides")
        self.out_stride = min(in_strides)
        self.fusion = UPerFusion(in_channels, channels, pool_scales)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.apply(_init_dense_head)
        _init_predictor(self.classifier)

    def forward(self, feature_maps: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.fusion(feature_maps)))


class FCNHead(nn.Module):
    """Auxiliary FCN head on ONE map, ``feature_maps[in_index]`` (default -2, the second-to-last, as in
    mmsegmentation's UPerNet configs): ``num_convs`` 3x3 conv-BN-ReLU, dropout 0.1, 1x1 classifier. Output logits
    (B, num_classes, h, w) at that map's stride. Its loss is added with weight 0.4 by the caller (mmsegmentation's
    and the paper's ``loss_weight``); the head itself knows nothing of the weight.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        num_convs: int = 1,
        in_index: int = -2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(
            *(_conv_bn_relu(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels if num_convs else in_channels, num_classes, 1)
        self.apply(_init_dense_head)
        _init_predictor(self.classifier)

    def forward(self, feature_maps: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.convs(feature_maps[self.in_index])))


class SegmentationModel(nn.Module):
    """Backbone -> neck -> UPerHead (+ FCNHead on the neck's second-to-last map when ``aux``: with four maps the
    third, the paper code's ``in_index=2``).

    forward(x (B, C_in, H, W), size) -> {"logits": (B, num_classes, *size)} plus "aux_logits" of the same shape
    when ``aux``; ``size`` (the label's (H', W'), as the paper's code resizes its logits, or None for the input's).
    Training loss: ``loss(logits) + aux_weight * loss(aux_logits)``. The paper's code: ``neck="none"``, 384
    decoder channels, 256 auxiliary ones (``model/finetune_dense/ft_dense_decoder.py:225-244``).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        channels: int = 384,
        aux: bool = True,
        aux_channels: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        neck: str = "none",
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = DenseNeck(backbone, neck)
        dims = self.neck.channels
        self.decode_head = UPerHead(dims, self.neck.strides, channels, num_classes, pool_scales)
        self.aux_head = FCNHead(dims[-2], aux_channels, num_classes) if aux else None

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> dict[str, Tensor]:
        size = x.shape[-2:] if size is None else size
        feature_maps = self.neck(self.backbone(x))
        out = {"logits": upsample_to(self.decode_head(feature_maps), size)}
        if self.aux_head is not None:
            out["aux_logits"] = upsample_to(self.aux_head(feature_maps), size)
        return out


class FlowHead(nn.Module):
    """Optical flow from multi-level maps: ``UPerFusion`` then a 3x3 conv to 2 channels (x, y); the
    ``predictor="conv3x3"`` alternative to the paper code's ``UPerHead`` with 2 outputs (dropout, 1x1 conv).

    The prediction is a coarse flow at the finest map's stride, in units of that grid's cells; ``upsample_flow``
    turns it into pixels of the size asked for (bilinear upsampling times the upsampling factor, RAFT's and the
    paper code's ``resize_flow`` convention), so the network never has to produce large numbers at the coarse level.
    Input: maps finest first; output (B, 2, h_0, w_0).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.fusion = UPerFusion(in_channels, channels, pool_scales)
        self.predictor = nn.Conv2d(channels, 2, 3, padding=1)
        self.apply(_init_dense_head)
        _init_predictor(self.predictor)

    def forward(self, feature_maps: Sequence[Tensor]) -> Tensor:
        return self.predictor(self.fusion(feature_maps))


class FlowModel(nn.Module):
    """Backbone -> neck -> flow head (+ FCN auxiliary head with 2 outputs on the second-to-last map when ``aux``).

    forward(x (B, C_in, H, W), size) -> {"flow": (B, 2, *size)} plus "aux_flow" when ``aux``: channel 0 = x
    (columns), 1 = y (rows), in pixels of ``size`` (the label's (H', W'), as the paper's code resizes its flow, or
    None for the input's) over the time span of the input voxel grid. ``predictor``: "linear" is the paper code's
    head (``UPerHead`` with 2 outputs, ``ft_dense_hub_model.py:26-29``), "conv3x3" ``FlowHead``.
    """

    def __init__(
        self,
        backbone: Backbone,
        channels: int = 384,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        neck: str = "none",
        aux: bool = True,
        aux_channels: int = 256,
        predictor: str = "linear",
    ):
        super().__init__()
        if predictor not in FLOW_PREDICTORS:
            raise ValueError(f"predictor must be one of {FLOW_PREDICTORS}, got {predictor!r}")
        self.backbone = backbone
        self.neck = DenseNeck(backbone, neck)
        dims = self.neck.channels
        if predictor == "linear":
            self.flow_head: nn.Module = UPerHead(dims, self.neck.strides, channels, 2, pool_scales)
        else:
            self.flow_head = FlowHead(dims, channels, pool_scales)
        self.aux_head = FCNHead(dims[-2], aux_channels, 2) if aux else None

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> dict[str, Tensor]:
        size = x.shape[-2:] if size is None else size
        feature_maps = self.neck(self.backbone(x))
        out = {"flow": upsample_flow(self.flow_head(feature_maps), size)}
        if self.aux_head is not None:
            out["aux_flow"] = upsample_flow(self.aux_head(feature_maps), size)
        return out
