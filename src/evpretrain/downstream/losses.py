"""Downstream training losses: cross-entropy + soft Dice for semantic segmentation, L1 for optical flow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_dice_loss(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Multi-class soft Dice loss, 1 - mean Dice over the classes present in the batch's target.

    logits: (B, K, H, W); target: (B, H, W) int in [0, K) or ``ignore_index``. With p = softmax(logits) and y the
    one-hot target, summed over every non-ignored pixel of the whole batch (ignored pixels enter neither p nor y):
    Dice_k = 2 sum(p_k y_k) / (sum(p_k) + sum(y_k)). The mean runs over the classes k with at least one target
    pixel in the batch; an absent class is left out (its Dice would reward predicting nothing), and probability
    put on it still costs through the lower overlap of the present classes. No smoothing term is needed: every
    counted class has sum(y_k) >= 1. Returns a scalar; 0 (keeping the graph) when every pixel is ignored.
    """
    # Masks instead of boolean indexing: no host-device synchronisation in the training step.
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    one_hot = ((target.unsqueeze(1) == classes) & valid).float()  # (B, K, H, W)
    probs = logits.float().softmax(dim=1) * valid
    intersection = (probs * one_hot).sum(dim=(0, 2, 3))
    target_count = one_hot.sum(dim=(0, 2, 3))
    present = target_count > 0
    # An absent class gets denominator 1 (and intersection 0) so that no 0 / 0 reaches the backward pass.
    denominator = torch.where(present, probs.sum(dim=(0, 2, 3)) + target_count, torch.ones_like(target_count))
    dice = torch.where(present, 2.0 * intersection / denominator, torch.zeros_like(intersection))
    num_present = present.sum()
    return (num_present - dice.sum()) / num_present.clamp_min(1)


def squared_dice_loss(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """The paper code's Dice loss (BIT-Vision/EventPretrain ``trainer/finetune_semseg/semseg_loss.py:40-112``):
    per class k over every non-ignored pixel of the batch, 1 - (2 sum(p_k y_k) + 1) / (sum(p_k^2) + sum(y_k^2) + 1),
    averaged over ALL K classes (an absent class costs sum(p_k^2) / (sum(p_k^2) + 1)). logits (B, K, H, W), target
    (B, H, W). Returns a scalar."""
    valid = (target != ignore_index).unsqueeze(1)
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    one_hot = ((target.unsqueeze(1) == classes) & valid).float()
    probs = logits.float().softmax(dim=1) * valid
    numerator = 2.0 * (probs * one_hot).sum(dim=(0, 2, 3)) + 1.0
    denominator = probs.square().sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3)) + 1.0
    return (1.0 - numerator / denominator).mean()


DICE_LOSSES = {"squared": squared_dice_loss, "present": soft_dice_loss}


def segmentation_loss(
    logits: Tensor, target: Tensor, ignore_index: int = 255, dice_weight: float = 1.0, dice: str = "present"
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy + ``dice_weight`` x a soft Dice loss, the paper's segmentation loss. ``dice``: "squared" the
    paper code's (``squared_dice_loss``), "present" ours (``soft_dice_loss``).

    logits: (B, K, H, W) at the target's resolution; target: (B, H, W) int, ``ignore_index`` pixels left out of
    both terms. Cross-entropy is the mean over the non-ignored pixels. Returns (loss, {"ce": ..., "dice": ...})
    with the terms detached, for logging. With every pixel ignored both terms are 0 (the graph is kept). For
    UPerNet + FCN training the caller adds ``0.4 x`` the same loss on the auxiliary logits.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits (B, K, H, W) and target (B, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    target = target.long()
    num_valid = (target != ignore_index).sum()
    # Sum / count rather than reduction="mean", which gives 0 / 0 = NaN when every pixel is ignored.
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum") / num_valid.clamp_min(1)
    if dice not in DICE_LOSSES:
        raise ValueError(f"dice must be one of {list(DICE_LOSSES)}, got {dice!r}")
    dice_term = DICE_LOSSES[dice](logits, target, ignore_index)
    loss = ce + dice_weight * dice_term
    return loss, {"ce": ce.detach(), "dice": dice_term.detach()}


def flow_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None, max_flow: float | None = None) -> Tensor:
    """L1 flow loss: |dx - dx'| and |dy - dy'| averaged over both components of the counted pixels of the batch.

    pred, target: (B, 2, H, W) flow in pixels; valid: (B, H, W) bool or None (every pixel). ``max_flow``: a pixel
    whose true flow has magnitude >= ``max_flow`` pixels is not counted either (the paper code's ``FlowLoss``,
    BIT-Vision/EventPretrain ``trainer/finetune_flow/flow_loss.py:11-17``, cut 400; None counts every magnitude).
    The mean over components, not their sum per pixel, is theirs (``(predict[valid] - target[valid]).abs().mean()``).
    The target at an uncounted pixel is never used, so NaN or inf there reach neither the loss nor the gradient.
    Returns a scalar; 0 (keeping the graph) when no pixel counts.
    """
    if pred.ndim != 4 or pred.shape[1] != 2 or pred.shape != target.shape:
        raise ValueError(f"expected pred and target (B, 2, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}")
    if valid is None:
        valid = torch.ones(pred.shape[0], *pred.shape[2:], dtype=torch.bool, device=pred.device)
    if valid.dtype != torch.bool or valid.shape != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(
            f"valid must be bool (B, H, W) = {(pred.shape[0], *pred.shape[2:])}, got {valid.dtype} {tuple(valid.shape)}"
        )
    # Uncounted pixels take the prediction as target: zero error and zero gradient, whatever the target holds there.
    target = torch.where(valid.unsqueeze(1), target, pred.detach()).float()
    if max_flow is not None:
        valid = valid & (torch.linalg.vector_norm(target, dim=1) < max_flow)
    error = (pred.float() - target).abs().sum(dim=1)
    return (error * valid).sum() / (2 * valid.sum()).clamp_min(1)
