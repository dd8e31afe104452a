"""The three pre-training stages as modules whose ``forward(batch)`` returns (loss, metrics).

Stage 1, difference-guided masked modeling: mask half the patches (at random or by event density), encode the
visible ones, fuse early, middle and last features, decode every patch, and regress the per-patch normalised
target on the masked patches. The target is the temporal intensity difference map (the paper), the input voxel grid
(MAE-style) or the intensity frame.
Stage 2, backbone-fixed feature transition: student tokens -> projector -> predictor, teacher tokens -> LayerNorm ->
bias-free Linear (or a stride-2 Conv2d from a grid twice as fine), token-level InfoNCE; only the backbone's final
norm and the heads train (``freeze_for_transition``).
Stage 3, focus-aimed contrastive learning: the same heads and loss with everything trainable, each token's loss
weighted by the value of its region (``focus``): its event density or its difference-map energy, normalised to mean
1 over the tokens of each sample, so that informative regions count more and empty ones less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evpretrain.pretrain.config import ContrastConfig, MaskedModelingConfig
from evpretrain.pretrain.heads import FeatureFusion, ReconstructionDecoder, TeacherProjection, TokenMLP
from evpretrain.pretrain.losses import TokenInfoNCE, masked_reconstruction_loss, weighted_token_mean
from evpretrain.pretrain.masking import make_mask, patch_abs_sum, patch_density, patchify

TARGET_KEYS = {"difference": "target_difference", "voxel": "voxel", "frame": "target_frame"}


class MaskedModeling(nn.Module):
    """Stage 1 around a backbone. ``forward(batch)`` -> (loss, metrics (0-d tensors), outputs for figures)."""

    def __init__(self, backbone: nn.Module, config: MaskedModelingConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config
        out_chans = backbone.in_chans if config.target == "voxel" else 1
        self.fusion = FeatureFusion(backbone.level_dims, norm=backbone.norm)
        self.decoder = ReconstructionDecoder(
            backbone.embed_dim,
            backbone.grid_size,
            backbone.patch_size,
            out_chans=out_chans,
            dim=config.decoder_dim,
            depth=config.decoder_depth,
            num_heads=config.decoder_heads,
            mask_token_init=config.mask_token_init,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        voxel, patch_size = batch["voxel"], self.backbone.patch_size
        if self.config.density_score == "abs_sum":  # the paper's, on the (augmented) network input
            mask = make_mask(
                self.config.masking, patch_abs_sum(voxel, patch_size), self.config.mask_ratio, ties="argsort"
            )
        else:
            density = patch_density(batch["density"], patch_size)
            mask = make_mask(self.config.masking, density, self.config.mask_ratio, generator=None)
        out = self.backbone(voxel, mask=mask)
        pred = self.decoder(self.fusion(out.levels), out.kept)
        target = patchify(batch[TARGET_KEYS[self.config.target]], self.backbone.patch_size)
        loss = masked_reconstruction_loss(pred, target, mask, normalize_target=self.config.normalize_target)
        # The term as a tensor: .item() here would sync the device and break a compiled graph; the loop reads it.
        return loss, {"loss_rec": loss.detach()}, {"pred": pred.detach(), "mask": mask, "target": target}


class FeatureTransition(nn.Module):
    """Stages 2 and 3 around a backbone: token InfoNCE against cached teacher tokens (``batch["teacher"]``).

    ``teacher_grid`` (h, w): the grid of the cached tokens, None = the backbone's. On the backbone's grid the teacher
    projection is a Linear layer; on a grid twice as fine (the paper's Swin with CLIP) a stride-2 Conv2d.
    """

    def __init__(
        self,
        backbone: nn.Module,
        teacher_dim: int,
        config: ContrastConfig,
        teacher_grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.config = config
        dim = backbone.embed_dim
        self.projector = TokenMLP(config.projector_layers, dim, config.hidden_dim, dim)
        self.predictor = TokenMLP(config.predictor_layers, dim, config.hidden_dim, dim)
        grid, teacher_grid = tuple(backbone.grid_size), tuple(teacher_grid or backbone.grid_size)
        if teacher_grid not in (grid, (2 * grid[0], 2 * grid[1])):
            raise ValueError(f"teacher tokens on a {teacher_grid} grid: expected the backbone's {grid} or twice it")
        stride = 1 if teacher_grid == grid else 2
        self.teacher_projection = TeacherProjection(teacher_dim, dim, teacher_grid, stride)
        if config.teacher_projection == "frozen":
            self.teacher_projection.requires_grad_(False)
        self.criterion = TokenInfoNCE(
            dim,
            backbone.num_tokens,
            config.queue_length,
            config.temperature,
            exclude_same_sample=config.queue_exclude_same_sample,
            enqueue=config.queue_enqueue,
        )

    def freeze_for_transition(self) -> None:
        """Stage 2: the backbone is frozen except its final norm; the heads train."""
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        for parameter in self.backbone.norm.parameters():
            parameter.requires_grad_(True)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
        out = self.backbone(batch["voxel"])
        student = self.predictor(self.projector(out.tokens))
        teacher = self.teacher_projection(batch["teacher"].to(student.dtype))
        per_token = self.criterion(student, teacher, batch.get("index"))
        weights = focus_weights(self.config.focus, batch, self.backbone.patch_size)
        loss = weighted_token_mean(per_token, weights)
        return loss, {"loss_con": loss.detach()}, {}


def focus_weights(focus: str, batch: dict[str, torch.Tensor], patch_size: int) -> torch.Tensor | None:
    """Per-token weights (B, N) with mean 1 per sample, or None for ``focus="none"``.

    ``density``: the patch's event count; ``difference``: the patch's difference-map energy (mean of dL^2). A small
    floor (1% of the sample's mean) keeps every token in the loss.
    """
    if focus == "none":
        return None
    if focus == "density":
        value = patch_density(batch["density"], patch_size)
    elif focus == "difference":
        value = F.avg_pool2d(batch["target_difference"].float() ** 2, patch_size).flatten(1)
    else:
        raise ValueError(f"focus must be none, density or difference, got {focus!r}")
    mean = value.mean(dim=1, keepdim=True).clamp_min(1e-12)
    value = value + 0.01 * mean
    return value / value.mean(dim=1, keepdim=True)
