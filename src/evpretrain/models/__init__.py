"""Event backbones: ViT, ConvViT and Swin built from timm's layers, registered by name.

backbone = create_backbone("vit_small_patch16")          # in_chans=5, 224x224, 14x14 tokens
out = backbone(voxels, mask)                              # mask (B, 196) bool, True = hidden
out.tokens, out.levels, out.kept, backbone.pool(out)
build_backbone(backbone_spec(study))                      # the study's backbone: pretrain.backbone, its overrides
"""

from evpretrain.models.base import Backbone, BackboneOutput
from evpretrain.models.convvit import ConvViT
from evpretrain.models.pos_embed import sincos_pos_embed_2d
from evpretrain.models.registry import create_backbone, list_backbones
from evpretrain.models.spec import BackboneSpec, backbone_spec, build_backbone
from evpretrain.models.swin import SwinBackbone
from evpretrain.models.vit import VisionTransformer

__all__ = [
    "Backbone",
    "BackboneOutput",
    "BackboneSpec",
    "ConvViT",
    "SwinBackbone",
    "VisionTransformer",
    "backbone_spec",
    "build_backbone",
    "create_backbone",
    "list_backbones",
    "sincos_pos_embed_2d",
]
