"""Event backbones: ViT, ConvViT and Swin built from timm's layers, registered by name.

backbone = create_backbone("vit_small_patch16")          # in_chans=5, 224x224, 14x14 tokens
out = backbone(voxels, mask)                              # mask (B, 196) bool, True = hidden
out.tokens, out.levels, out.kept, backbone.pool(out)
build_backbone(backbone_spec(study))                      # the study's backbone: pretrain.backbone, its overrides

Names load lazily so that ``import evpretrain.models.spec`` stays torch-free (the pipeline checks the study's
backbone while Snakemake plans, without torch).
"""

from evpretrain.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "Backbone": "base",
        "BackboneOutput": "base",
        "ConvViT": "convvit",
        "sincos_pos_embed_2d": "pos_embed",
        "create_backbone": "registry",
        "list_backbones": "registry",
        "BackboneSpec": "spec",
        "backbone_spec": "spec",
        "build_backbone": "spec",
        "SwinBackbone": "swin",
        "VisionTransformer": "vit",
    },
)
