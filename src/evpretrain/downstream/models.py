"""Downstream models around a backbone, and loading a pre-trained backbone into them.

- ``LinearProbe``: the backbone frozen (kept in eval mode, no gradients), its pooled tokens through BatchNorm without
  affine parameters and a Linear, as MAE's linear probe (``main_linprobe.py``: ``BatchNorm1d(affine=False,
  eps=1e-6)`` before the head, the head initialised with std 0.01).
- ``Classifier``: the whole backbone trained, pooled tokens (the paper's mean of the output tokens) through a
  Linear initialised with std 2e-5 (MAE's fine-tuning head).
Dense models (segmentation, flow) live in ``evpretrain.downstream.heads``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from evpretrain.training.checkpoint import backbone_entries, load_checkpoint

__all__ = ["Classifier", "LinearProbe", "load_backbone"]


class LinearProbe(nn.Module):
    """Frozen ``backbone`` -> pooled tokens (B, D) -> BatchNorm1d(affine=False) -> Linear -> logits (B, K).

    ``forward`` takes a voxel batch (B, C, H, W) or the pooled features (B, D) computed beforehand by ``features``:
    the backbone is frozen, so they are the same, and a probe without augmentation trains on cached features.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = nn.Sequential(
            nn.BatchNorm1d(backbone.embed_dim, affine=False, eps=1e-6), nn.Linear(backbone.embed_dim, num_classes)
        )
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen: its dropout, drop path and norms behave as at evaluation
        return self

    @torch.no_grad()
    def features(self, voxel: Tensor) -> Tensor:
        """(B, D) float32 pooled features of a voxel batch (B, C, H, W)."""
        return self.backbone.pool(self.backbone(voxel)).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.float() if x.ndim == 2 else self.features(x))


class Classifier(nn.Module):
    """Trainable ``backbone`` -> pooled tokens (B, D) -> Linear -> logits (B, K)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, voxel: Tensor) -> Tensor:
        return self.head(self.backbone.pool(self.backbone(voxel)))


def load_backbone(
    backbone: nn.Module, path: str | Path | None, *, source: str | None = None, allow_partial: bool = False
) -> dict[str, Any]:
    """Load ``path``'s backbone weights into ``backbone``; None keeps the random initialisation.

    ``source`` None: a checkpoint of this project, loaded strictly. Otherwise a foreign project's checkpoint
    (``evpretrain.downstream.importers.known_sources()``) through its key map, refused when partial unless
    ``allow_partial``. Returns what was loaded, for the run's metrics.
    """
    if path is None:
        return {"init": "random"}
    if source is not None:
        from evpretrain.downstream.importers import import_checkpoint

        report = import_checkpoint(path, source, backbone, allow_partial=allow_partial)
        return {
            "init": str(path),
            "init_source": source,
            "init_complete": report.complete,
            "init_report": report.summary(),
        }
    backbone.load_state_dict(backbone_entries(load_checkpoint(Path(path))["model"], path), strict=True)
    return {"init": str(path), "init_source": "evpretrain", "init_complete": True}
