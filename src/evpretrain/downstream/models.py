"""Downstream models around a backbone, and loading a pre-trained backbone into them.

- ``LinearProbe``: the backbone frozen (no gradients), its pooled tokens through a head: ``linear``, the authors'
  probe (BIT-Vision/EventPretrain ``model/finetune_cls/ft_cls_hub_model.py:104,133-134``: one Linear on the mean of
  the final-normed tokens, trained with ``--linprob``, ``main_finetune_cls.py:383-388``), or ``mae_bn``, MAE's
  (``main_linprob.py``: ``BatchNorm1d(affine=False, eps=1e-6)`` before the Linear). ``backbone_mode``: the frozen
  backbone in ``eval`` mode (MAE: deterministic features) or ``train`` mode while the head trains (theirs:
  ``model.train(True)`` in ``trainer/finetune_cls/ft_cls_trainer.py:16``, so drop path stays active).
- ``Classifier``: the whole backbone trained, pooled tokens (the paper's mean of the output tokens) through a Linear.
Head initialisation (``head_init``): ``xavier_uniform`` (theirs, ``ft_cls_hub_model.py:106-113``, bias 0) or
``trunc_normal`` (MAE's: std 0.01 for the probe, 2e-5 for fine-tuning).
Dense models (segmentation, flow) live in ``evpretrain.downstream.heads``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from evpretrain.downstream.config import BACKBONE_MODES, HEAD_INITS, PROBE_HEADS
from evpretrain.training.checkpoint import backbone_entries, load_checkpoint

__all__ = ["Classifier", "LinearProbe", "init_head", "load_backbone"]


def init_head(linear: nn.Linear, rule: str, std: float) -> nn.Linear:
    """Initialise ``linear`` by ``rule`` (``HEAD_INITS``; ``std`` for ``trunc_normal``), bias zero."""
    if rule not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {rule!r}")
    if rule == "xavier_uniform":
        nn.init.xavier_uniform_(linear.weight)
    else:
        trunc_normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)
    return linear


class LinearProbe(nn.Module):
    """Frozen ``backbone`` -> pooled tokens (B, D) -> head (``linear`` or ``mae_bn``) -> logits (B, K).

    ``forward`` takes a voxel batch (B, C, H, W) or the pooled features (B, D) computed beforehand by ``features``:
    the backbone is frozen, so a probe without augmentation (and a backbone in eval mode) trains on cached features;
    otherwise the backbone runs under ``no_grad`` every step.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: str = "linear",
        head_init: str = "trunc_normal",
        backbone_mode: str = "eval",
    ):
        super().__init__()
        if head not in PROBE_HEADS:
            raise ValueError(f"head must be one of {PROBE_HEADS}, got {head!r}")
        if backbone_mode not in BACKBONE_MODES:
            raise ValueError(f"backbone_mode must be one of {BACKBONE_MODES}, got {backbone_mode!r}")
        self.backbone = backbone.requires_grad_(False)
        self.backbone_mode = backbone_mode
        linear = init_head(nn.Linear(backbone.embed_dim, num_classes), head_init, std=0.01)
        if head == "mae_bn":
            self.head = nn.Sequential(nn.BatchNorm1d(backbone.embed_dim, affine=False, eps=1e-6), linear)
        else:
            self.head = linear

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        if self.backbone_mode == "eval":
            self.backbone.eval()  # its dropout, drop path and norms behave as at evaluation
        return self

    @torch.no_grad()
    def features(self, voxel: Tensor) -> Tensor:
        """(B, D) float32 pooled features of a voxel batch (B, C, H, W)."""
        return self.backbone.pool(self.backbone(voxel)).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x.float() if x.ndim == 2 else self.features(x))


class Classifier(nn.Module):
    """Trainable ``backbone`` -> pooled tokens (B, D) -> Linear -> logits (B, K)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_init: str = "trunc_normal"):
        super().__init__()
        self.backbone = backbone
        self.head = init_head(nn.Linear(backbone.embed_dim, num_classes), head_init, std=2e-5)

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
    backbone.load_state_dict(
        backbone_entries(load_checkpoint(Path(path), required=("model",))["model"], path), strict=True
    )
    return {"init": str(path), "init_source": "evpretrain", "init_complete": True}
