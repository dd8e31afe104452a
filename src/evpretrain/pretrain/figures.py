"""Figures written beside a stage's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from evpretrain.plotting import pyplot, save_figure
from evpretrain.pretrain.masking import unpatchify


@torch.no_grad()
def reconstruction_figure(module: nn.Module, dataset: Dataset, path: Path, num_samples: int = 4) -> Path:
    """Stage 1: for a few samples, the input (voxel sum), the target, the masked target, the reconstruction.

    The reconstruction is mapped back from per-patch normalised units with each target patch's mean and std, as
    MAE visualises ``norm_pix_loss`` models; visible patches show the target itself.
    """
    plt = pyplot()

    was_training = module.training
    module.eval()
    batch = default_collate([dataset[i] for i in range(min(num_samples, len(dataset)))])
    device = next(module.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    _, _, out = module(batch)
    module.train(was_training)
    target, pred, mask = out["target"], out["pred"], out["mask"]
    if module.config.normalize_target:
        mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
        pred = pred * std + mean
    pred = torch.where(mask.unsqueeze(-1), pred, target)
    grid = module.backbone.grid_size
    p = module.backbone.patch_size
    channel = 0  # the first channel of a multi-channel (voxel) target
    images = {
        "input (sum of bins)": batch["voxel"].sum(1).cpu(),
        "target": unpatchify(target, p, grid)[:, channel].cpu(),
        "masked target": unpatchify(target * (~mask).unsqueeze(-1), p, grid)[:, channel].cpu(),
        "reconstruction": unpatchify(pred, p, grid)[:, channel].cpu(),
    }
    rows = len(batch["voxel"])
    fig, axes = plt.subplots(rows, len(images), figsize=(2.2 * len(images), 2.2 * rows), squeeze=False)
    for col, (title, values) in enumerate(images.items()):
        for row in range(rows):
            ax = axes[row][col]
            limit = float(images["target"][row].abs().max()) if title != "input (sum of bins)" else None
            ax.imshow(
                values[row].float().numpy(),
                cmap="RdBu_r" if limit else "gray",
                vmin=-limit if limit else None,
                vmax=limit,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
