"""Patch masks for stage 1 (random, or by event density) and MAE's patch layout and per-patch normalised target.

Patches are numbered row-major over the (H / p, W / p) grid, the order of ``patchify``, of a ViT's patch
embedding and of the backbone's ``mask`` (True = masked, hidden from the encoder).

Density masking, as in the paper's code (BIT-Vision/EventPretrain, model/backbone/vit.py ``random_masking``): the
patches are sorted by a score and the ones with the largest scores are masked. ``--masking_strategy density``
scores by density, so it masks the densest patches ("densest" here); ``anti-density`` masks the sparsest; the
default of its main_pretrain.py is ``random``. The score and the ties are options (``MaskedModelingConfig``
``density_score``): ``events`` (ours) scores a patch by its event count and breaks ties at random, reproducibly for
a given generator; ``abs_sum`` (the paper's, vit.py:80-92, convvit.py:99-111, swin.py:127-139) by the mean over its
pixels of ``|sum over bins of the voxel grid|`` (``patch_abs_sum``), where ON and OFF events at a pixel cancel, and
leaves ties to ``torch.argsort``'s order (``ties="argsort"``): of equally empty patches, the same ones are masked
every time.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "MaskKind",
    "make_mask",
    "normalized_patch_target",
    "num_masked",
    "patch_abs_sum",
    "patch_density",
    "patchify",
    "unpatchify",
]

MaskKind = Literal["random", "densest", "sparsest"]
Ties = Literal["random", "argsort"]


def patch_density(density: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Events per patch: density (B, H, W) events per pixel -> (B, N), N = (H / p) * (W / p), row-major."""
    batch, height, width = density.shape
    _check_divisible(height, width, patch_size)
    p = patch_size
    return density.reshape(batch, height // p, p, width // p, p).sum(dim=(2, 4)).flatten(1)


def patch_abs_sum(voxel: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The paper's density score: voxel grid (B, C, H, W) -> (B, N), each patch's mean over its p x p pixels of
    ``|sum over the C bins|`` (BIT-Vision/EventPretrain model/backbone/vit.py:81-83: ``AvgPool2d(p, p)`` of
    ``abs(torch.sum(x, dim=1))`` on the network input). Polarity-signed bins cancel: a pixel with as many ON as OFF
    events scores 0. Computed in the voxel grid's floating dtype (float32 for integer input)."""
    batch, _, height, width = voxel.shape
    _check_divisible(height, width, patch_size)
    voxel = voxel if voxel.is_floating_point() else voxel.float()
    return F.avg_pool2d(voxel.sum(dim=1, keepdim=True).abs(), patch_size).flatten(1)


def num_masked(num_patches: int, ratio: float) -> int:
    """Patches masked per sample: ``round(ratio * num_patches)`` (Python's rounding, half to even)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    return round(ratio * num_patches)


def make_mask(
    kind: MaskKind,
    density_per_patch: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    ties: Ties = "random",
) -> torch.Tensor:
    """A mask with exactly ``num_masked(N, ratio)`` True (masked) patches in each row.

    Args:
        kind: "random" (uniform, MAE), "densest" (the patches with the most events) or "sparsest" (the fewest).
        density_per_patch: (B, N) a density score per patch (``patch_density`` or ``patch_abs_sum``); only its
            order matters, and only its shape for "random".
        ratio: fraction of the patches to mask.
        generator: the random draws (random masks, ``ties="random"``); on the generator's device.
        ties: how "densest" and "sparsest" order equal scores: "random" (a random order, from ``generator``), or
            "argsort" (the paper's: ``torch.argsort`` of the score, or of its negative for "sparsest", ascending
            and not stable, the masked patches its last; ties then follow torch's sort, draw nothing, and may
            differ between devices).

    Returns:
        (B, N) bool on the device of ``density_per_patch``, True = masked.
    """
    if kind not in ("random", "densest", "sparsest"):
        raise ValueError(f"mask kind must be 'random', 'densest' or 'sparsest', got {kind!r}")
    if ties not in ("random", "argsort"):
        raise ValueError(f"ties must be 'random' or 'argsort', got {ties!r}")
    batch, patches = density_per_patch.shape
    count = num_masked(patches, ratio)
    device = density_per_patch.device
    mask = torch.zeros(batch, patches, dtype=torch.bool, device=device)
    if kind != "random" and ties == "argsort":
        # vit.py:84-92: noise = density (or -density), ids_shuffle = argsort(noise), the largest noise masked.
        noise = density_per_patch if kind == "densest" else -density_per_patch
        order = torch.argsort(noise, dim=1)
        return mask.scatter_(1, order[:, patches - count :], True)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, patches, generator=generator, device=noise_device).to(device)
    order = noise.argsort(dim=1)  # a random permutation per row
    if kind != "random":
        # Sort by density, ties in the random order: a stable sort of the randomly permuted densities.
        shuffled = density_per_patch.gather(1, order)
        order = order.gather(1, shuffled.argsort(dim=1, descending=kind == "densest", stable=True))
    return mask.scatter_(1, order[:, :count], True)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C), patches row-major, each flattened in (row, column, channel) order (MAE's)."""
    batch, channels, height, width = images.shape
    _check_divisible(height, width, patch_size)
    p, h, w = patch_size, height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, h * w, p * p * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of ``patchify``: (B, N, p * p * C) -> (B, C, h * p, w * p); ``grid_size`` (h, w), square when None."""
    batch, count, dim = patches.shape
    p = patch_size
    channels, remainder = divmod(dim, p * p)
    if remainder:
        raise ValueError(f"patch dimension {dim} is not a multiple of patch_size ** 2 = {p * p}")
    if grid_size is None:
        side = round(count**0.5)
        grid_size = (side, side)
    h, w = grid_size
    if h * w != count:
        raise ValueError(f"{count} patches do not fill a {h}x{w} grid; pass grid_size")
    x = patches.reshape(batch, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, h * p, w * p)


def normalized_patch_target(target: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: (B, C, H, W) -> (B, N, p * p * C) float32, each patch minus its mean,
    divided by sqrt(unbiased variance + eps). A constant patch becomes zeros."""
    patches = patchify(target.float(), patch_size)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def _check_divisible(height: int, width: int, patch_size: int) -> None:
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(f"a {height}x{width} (HxW) grid does not split into {patch_size}x{patch_size} patches")
