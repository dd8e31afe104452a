"""Pre-training losses: masked reconstruction (stage 1) and token-level InfoNCE (stages 2 and 3)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def masked_reconstruction_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, *, normalize_target: bool = True
) -> torch.Tensor:
    """MSE on the masked patches (MAE's loss).

    pred, target_patches: (B, N, P) patch values; mask: (B, N) bool, True = masked (the loss counts only those; with
    no masked patch every patch counts). ``normalize_target``: each target patch to zero mean, unit variance.
    """
    target = target_patches.float()
    if normalize_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    weights = torch.where(mask.any(), mask.float(), 1.0)  # branchless: no graph break under torch.compile
    return (per_patch * weights).sum() / weights.sum()


class TokenInfoNCE(nn.Module):
    """Token-level InfoNCE: a student token's positive is the teacher token at the same position.

    Negatives: a queue per position of the last ``queue_length`` teacher tokens (MoCo-style, the paper's default
    length 1024), or, with ``queue_length=0``, the other images' teacher tokens at that position in the batch,
    gathered across ranks. ``forward`` returns the per-token loss (B, N) so that stage 3 can weight tokens by the
    value of their region.

    False negatives: the teacher is frozen and its tokens cached, so a sample's key is the same every epoch, and a
    queue longer than the dataset (the demo: 1024 > 600 samples) or spanning an epoch boundary holds the positive's
    own key as a negative; the loss then rises as training goes on. With ``exclude_same_sample`` and ``ids`` (B,)
    (the samples' dataset indices), queue entries of the same sample are left out of its negatives (ours; the
    paper's code keeps them, model/pretrain/pr_hub_model.py:144-168).

    ``enqueue``: ``gathered`` puts every rank's keys into the queue (MoCo's); ``local`` this rank's only (the paper's,
    pr_hub_model.py:166, no gather). Under DDP the queue is a buffer that rank 0 broadcasts at each forward, so with
    ``local`` the queue holds rank 0's keys only and turns over world-size times slower.

    When the enqueue happens: the keys are gathered in ``forward`` and written into the queue once the backward pass
    has used the queue (a hook on the normalised student tokens' gradient, which needs it), so that the negatives need
    no copy of the queue (theirs and MoCo's clone it, pr_hub_model.py:153: 308 MB per step for ViT-S/16) and the
    losses and weights are those of an enqueue in ``forward``. A training step's queue is thus updated before the
    optimizer step and any checkpoint after it. A forward without gradients (frozen student, ``torch.no_grad``)
    enqueues at once; a training forward whose loss never runs backward enqueues nothing.
    """

    def __init__(
        self,
        dim: int,
        num_positions: int,
        queue_length: int = 1024,
        temperature: float = 0.07,
        *,
        exclude_same_sample: bool = True,
        enqueue: str = "gathered",
    ):
        super().__init__()
        if enqueue not in ("gathered", "local"):
            raise ValueError(f"enqueue must be 'gathered' or 'local', got {enqueue!r}")
        self.temperature = temperature
        self.queue_length = queue_length
        self.exclude_same_sample = exclude_same_sample
        self.enqueue = enqueue
        if queue_length > 0:
            queue = F.normalize(torch.randn(dim, num_positions, queue_length), dim=0)
            self.register_buffer("queue", queue)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_ids", torch.full((queue_length,), -1, dtype=torch.long))  # -1: no sample

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """student, teacher: (B, N, D); ids: (B,) sample indices or None -> per-token cross-entropy (B, N)."""
        q = F.normalize(student.float(), dim=-1)
        k = F.normalize(teacher.float(), dim=-1)
        if self.queue_length > 0:
            positive = torch.einsum("bnc,bnc->bn", q, k).unsqueeze(-1)
            negative = torch.einsum("bnc,cnk->bnk", q, self.queue)  # autograd keeps the queue itself: no copy
            if ids is not None and self.exclude_same_sample:
                same_sample = ids.view(-1, 1) == self.queue_ids.view(1, -1)  # (B, K)
                negative = negative.masked_fill(same_sample.unsqueeze(1), float("-inf"))
            logits = torch.cat([positive, negative], dim=-1) / self.temperature
            labels = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
            if self.training:
                ids = ids if ids is not None else torch.full((k.shape[0],), -1, device=k.device)
                gather = _gather if self.enqueue == "gathered" else _local
                keys, key_ids = gather(k.detach()), gather(ids).view(-1)  # the collective stays in the forward
                if q.requires_grad:
                    # The backward pass reads the queue once, to reach q's gradient: write it in place after that.
                    q.register_hook(lambda grad: self._enqueue(keys, key_ids))
                else:
                    self._enqueue(keys, key_ids)
        else:
            keys = _gather_with_grad(k)
            logits = torch.einsum("bnc,mnc->bnm", q, keys) / self.temperature
            offset = dist.get_rank() * q.shape[0] if _distributed() else 0
            labels = (torch.arange(q.shape[0], device=q.device) + offset).unsqueeze(-1).expand(-1, q.shape[1])
        return F.cross_entropy(logits.permute(0, 2, 1), labels, reduction="none")

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        # keys (B_all, N, D), ids (B_all,) -> queue slots [ptr, ptr + B_all) modulo the length, at every position.
        count = keys.shape[0]
        slots = (self.queue_ptr + torch.arange(count, device=keys.device)) % self.queue_length
        self.queue[:, :, slots] = keys.permute(2, 1, 0).to(self.queue.dtype)
        self.queue_ids[slots] = ids.to(self.queue_ids.dtype)
        self.queue_ptr.copy_((self.queue_ptr + count) % self.queue_length)


def weighted_token_mean(per_token: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-token loss (B, N), weighted by ``weights`` (B, N) >= 0 when given."""
    if weights is None:
        return per_token.mean()
    weights = weights.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1e-12)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@torch.no_grad()
def _gather(tensor: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated; the local slice keeps its gradient (the others are constants)."""
    if not _distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)
