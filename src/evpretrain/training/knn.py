"""Weighted k-nearest-neighbour accuracy of a representation (DINO's ``eval_knn``), and a hook that tracks it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from evpretrain.training.distributed import to_device
from evpretrain.training.hooks import Hook, TrainState
from evpretrain.training.rng import preserved_rng

EmbedFn = Callable[[nn.Module, Any], torch.Tensor]


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    *,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of DINO's weighted kNN classifier.

    Features (N, D) are compared by cosine similarity; each test sample's ``k`` most similar training samples
    (all of them when there are fewer) vote for their labels with weight ``exp(similarity / temperature)``; the
    class with the largest total wins (ties: the smallest label). Labels (N,) are integers >= 0.
    """
    if train_labels.min() < 0 or test_labels.min() < 0:
        raise ValueError("kNN accuracy needs labels >= 0 (samples without a label, -1, must be left out)")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(train.device), dim=1)
    train_labels = train_labels.to(train.device)
    test_labels = test_labels.to(train.device)
    k = min(k, len(train))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test), chunk_size):
        similarity = test[start : start + chunk_size] @ train.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk_size]).sum())
    return correct / len(test)


class KnnMonitor(Hook):
    """Logs the weighted kNN top-1 of ``embed_fn``'s features every ``every_steps`` steps and at the last step.

    ``embed_fn(model, batch) -> (B, D)`` embeds a batch (on the device) with the bare model, in eval mode, without
    gradients and under the run's autocast; the labels are ``batch[label_key]`` (samples labelled -1 are left out).
    ``train_set`` is the labelled memory bank, ``val_set`` the queries: small subsets, embedded in full each time,
    on rank 0 only. ``batch_transform`` runs on each batch on the device before ``embed_fn``, as the training
    loop's (``PretrainBatchViews``).
    Every evaluation runs on RNG streams seeded with ``seed`` (a dataset that augments sees the same draws each
    time, so values compare across steps) and restores the run's streams after: training draws the same random
    numbers with the monitor or without it. Let ``every_steps`` be a multiple of ``log_every_steps``: the value is
    then logged at the step it was measured.
    """

    def __init__(
        self,
        embed_fn: EmbedFn,
        train_set: Dataset,
        val_set: Dataset,
        *,
        every_steps: int,
        batch_size: int = 64,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_transform: Callable[[Any], Any] | None = None,
        label_key: str = "label",
        k: int = 20,
        temperature: float = 0.07,
        name: str = "knn_top1",
        seed: int = 0,
    ):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.embed_fn = embed_fn
        self.train_set = train_set
        self.val_set = val_set
        self.every_steps = every_steps
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.batch_transform = batch_transform
        self.label_key = label_key
        self.k = k
        self.temperature = temperature
        self.name = name
        self.seed = seed

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        if state.is_main and (state.step % self.every_steps == 0 or state.step == state.stop_step):
            metrics[self.name] = self.evaluate(state.model, state.device, state.autocast)

    def evaluate(
        self,
        model: nn.Module,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> float:
        """kNN top-1 in [0, 1] of ``model``'s features of the validation set against the training set."""
        was_training = model.training
        model.eval()
        try:
            with preserved_rng(self.seed, cuda=device.type == "cuda"), torch.no_grad(), autocast():
                train_features, train_labels = self._embed(model, self.train_set, device)
                val_features, val_labels = self._embed(model, self.val_set, device)
        finally:
            model.train(was_training)
        train_labelled, val_labelled = train_labels >= 0, val_labels >= 0  # -1: no label
        if not train_labelled.any() or not val_labelled.any():
            raise ValueError(f"{type(self).__name__}: the training or the validation subset has no labelled sample")
        return knn_accuracy(
            train_features[train_labelled],
            train_labels[train_labelled],
            val_features[val_labelled],
            val_labels[val_labelled],
            self.k,
            self.temperature,
        )

    def _embed(self, model: nn.Module, dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn)
        features, labels = [], []
        for batch in loader:
            batch = to_device(batch, device)
            if self.batch_transform is not None:
                with torch.autocast(device.type, enabled=False):
                    batch = self.batch_transform(batch)
            features.append(self.embed_fn(model, batch).float())
            labels.append(torch.as_tensor(batch[self.label_key]))
        return torch.cat(features), torch.cat(labels).to(device)
