"""Downstream metrics: top-k and per-class accuracy, segmentation scores from a confusion matrix (mIoU, mAcc, pixel
accuracy, as mmsegmentation computes them), and optical-flow AEE and outlier percentage (KITTI / DSEC / E-RAFT).

Every function takes tensors and returns tensors or Python numbers; accumulators sum exact counts over batches so
that dataset-level figures do not depend on how the data was batched. Accuracies and IoUs are fractions in [0, 1];
only the flow outlier figure is a percentage, as the flow literature reports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# A pixel is a flow outlier when its endpoint error exceeds both thresholds (KITTI 2015, DSEC, E-RAFT).
OUTLIER_PIXELS = 3.0
OUTLIER_RELATIVE = 0.05


# --- classification -------------------------------------------------------------------------------------------


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of samples whose label is among the ``k`` highest logits, as ``{"top1": ..., "top5": ...}``.

    logits: (N, C) float; labels: (N,) int in [0, C). A ``k`` larger than C counts as C (every sample correct);
    the key keeps the requested ``k``.

    Ties are broken by class index, as ``argmax`` breaks them: the label's rank is the number of classes with a
    larger logit plus the number of classes with an equal logit and a smaller index, and the sample is correct at
    ``k`` when that rank is below ``k``. So top-1 is exactly ``argmax(logits) == label`` and a constant predictor
    scores the frequency of class 0, never 100 %. (``torch.topk`` leaves its tie order unspecified.)
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    num_samples, num_classes = logits.shape
    if num_samples == 0:
        raise ValueError("top-k accuracy of an empty set of samples is undefined")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN; top-k accuracy would be meaningless")
    labels = labels.long()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    label_logit = logits.gather(1, labels[:, None])
    class_index = torch.arange(num_classes, device=logits.device)
    ahead = (logits > label_logit) | ((logits == label_logit) & (class_index < labels[:, None]))
    rank = ahead.sum(dim=1)
    return {f"top{k}": (rank < min(k, num_classes)).double().mean().item() for k in ks}


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """(C,) float64: recall of each class, TP / (TP + FN) = diagonal / row sum of ``confusion`` (C, C) with rows =
    true class; NaN for a class absent from the labels (empty row)."""
    confusion = _check_confusion(confusion).double()
    return confusion.diagonal() / confusion.sum(dim=1)


# --- confusion matrix and segmentation --------------------------------------------------------------------------


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class.

    pred, target: integer class indices of the same shape (e.g. (B, H, W) label maps or (N,) labels; take
    ``logits.argmax(1)`` first). Elements whose target equals ``ignore_index`` are left out, whatever their
    prediction. Any other value outside [0, C) raises ValueError: a silent drop would inflate the scores.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("pred and target must hold integer class indices (take logits.argmax(dim=1) first)")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, values in (("target", target), ("pred", pred)):
        if values.numel() and bool(((values < 0) | (values >= num_classes)).any()):
            raise ValueError(
                f"{name} holds class indices outside [0, {num_classes}) other than the ignore label "
                f"{ignore_index}: values in [{int(values.min())}, {int(values.max())}]"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates ``confusion_matrix`` over batches (on the CPU, int64, exact): ``update`` per batch, then
    ``compute`` for the (C, C) total."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index).cpu()

    def compute(self) -> Tensor:
        return self.matrix.clone()

    def reset(self) -> None:
        self.matrix.zero_()


def constant_prediction_confusion(counts: Tensor) -> Tensor:
    """The (C, C) confusion matrix (rows = true) of predicting the most frequent class of ``counts`` (C,) — the
    per-class target counts — for every sample or pixel: the best any constant prediction scores."""
    confusion = torch.zeros(len(counts), len(counts), dtype=torch.int64)
    confusion[:, int(counts.argmax())] = counts.to(torch.int64)
    return confusion


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of one confusion matrix. iou, accuracy: (C,) float64, NaN where undefined (see
    ``segmentation_scores``); miou, macc: their means over the defined classes; pixel_accuracy: correct / counted."""

    iou: Tensor
    accuracy: Tensor
    miou: float
    macc: float
    pixel_accuracy: float

    def as_dict(self) -> dict[str, float | list[float | None]]:
        """JSON-ready figures; an undefined per-class value becomes None (JSON has no NaN)."""
        return {
            "miou": self.miou,
            "macc": self.macc,
            "pixel_accuracy": self.pixel_accuracy,
            "iou_per_class": [None if math.isnan(v) else v for v in self.iou.tolist()],
            "acc_per_class": [None if math.isnan(v) else v for v in self.accuracy.tolist()],
        }


def segmentation_scores(confusion: Tensor) -> SegmentationScores:
    """IoU = TP / (TP + FP + FN) and accuracy = TP / (TP + FN) per class from ``confusion`` (C, C), rows = true.

    A class with a zero denominator gets NaN and is left out of the mean (mmsegmentation's nanmean): for IoU a
    class neither in the targets nor in the predictions, for accuracy a class absent from the targets (a class
    predicted but never true thus counts in mIoU with IoU 0, not in mAcc). Raises ValueError when the matrix
    counts no pixel at all.
    """
    confusion = _check_confusion(confusion).double()
    total = confusion.sum()
    if total == 0:
        raise ValueError("the confusion matrix counts no pixel (every target ignored, or nothing accumulated)")
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    iou = true_positive / union
    accuracy = per_class_accuracy(confusion)
    return SegmentationScores(
        iou=iou,
        accuracy=accuracy,
        miou=iou.nanmean().item(),
        macc=accuracy.nanmean().item(),
        pixel_accuracy=(true_positive.sum() / total).item(),
    )


def batch_scores(confusion: Tensor) -> tuple[float, float]:
    """(mIoU, mAcc) of ONE batch's ``confusion`` (C, C), rows = true, as the paper's code scores a batch
    (BIT-Vision/EventPretrain ``trainer/finetune_semseg/semseg_metric.py:20-35``): IoU and recall per class with a
    zero denominator counting as 0, not left out, and means over ALL C classes. A class neither labelled nor
    predicted in the batch thus pulls the batch's mIoU down; fractions in [0, 1] (theirs are percentages)."""
    confusion = _check_confusion(confusion).double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    iou = true_positive / union.clamp_min(1)
    recall = true_positive / confusion.sum(dim=1).clamp_min(1)
    return iou.mean().item(), recall.mean().item()


class SegmentationMetrics:
    """Segmentation scores over an evaluation split, ``update(pred, target)`` a batch at a time (label maps (B, H,
    W)). ``compute`` gives the dataset-level scores of the summed confusion (``segmentation_scores``: ``miou``,
    ``macc``, ...) and the paper code's figures ``miou_batch_mean``, ``macc_batch_mean``: ``batch_scores`` of each
    batch, averaged over batches (its ``MetricLogger`` global average, ``ft_semseg_trainer.py:210-212,240-241``);
    these depend on the batch size and order. A batch whose pixels are all ignored is left out (theirs counts it
    as 0)."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.confusion = ConfusionMatrix(num_classes, ignore_index)
        self.batch_miou: list[float] = []
        self.batch_macc: list[float] = []

    def update(self, pred: Tensor, target: Tensor) -> None:
        batch = confusion_matrix(pred, target, self.confusion.num_classes, self.confusion.ignore_index).cpu()
        self.confusion.matrix += batch
        if batch.sum() > 0:
            miou, macc = batch_scores(batch)
            self.batch_miou.append(miou)
            self.batch_macc.append(macc)

    def compute(self) -> dict[str, Any]:
        matrix = self.confusion.compute()
        return {
            **segmentation_scores(matrix).as_dict(),
            "miou_batch_mean": math.fsum(self.batch_miou) / len(self.batch_miou),
            "macc_batch_mean": math.fsum(self.batch_macc) / len(self.batch_macc),
            "confusion": matrix.tolist(),
        }


def _check_confusion(confusion: Tensor) -> Tensor:
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"a confusion matrix is (C, C), got {tuple(confusion.shape)}")
    return confusion


# --- optical flow -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowErrorSums:
    """Additive sums over the valid pixels of a batch: endpoint errors (pixels), outlier count, valid count."""

    endpoint_error_sum: float
    outlier_count: int
    valid_pixels: int

    def __add__(self, other: FlowErrorSums) -> FlowErrorSums:
        return FlowErrorSums(
            self.endpoint_error_sum + other.endpoint_error_sum,
            self.outlier_count + other.outlier_count,
            self.valid_pixels + other.valid_pixels,
        )


def flow_errors(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> FlowErrorSums:
    """Endpoint-error sums of predicted flow against ground truth over the valid pixels of a batch.

    pred, target: (B, 2, H, W) flow in pixels, channel 0 = x (columns), 1 = y (rows); valid: (B, H, W) bool, or
    None for every pixel. Values at invalid pixels are never read (NaN there is fine). The endpoint error of a
    pixel is ``||pred - target||_2``; it is an outlier when the error is > 3 px AND > 5 % of ``||target||_2``
    (strictly: an error of exactly 3 px is not an outlier). A batch with no valid pixel gives zero sums.
    """
    if pred.ndim != 4 or pred.shape[1] != 2 or pred.shape != target.shape:
        raise ValueError(f"expected pred and target (B, 2, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}")
    if valid is None:
        valid = torch.ones(pred.shape[0], *pred.shape[2:], dtype=torch.bool, device=pred.device)
    if valid.dtype != torch.bool or valid.shape != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(
            f"valid must be bool (B, H, W) = {(pred.shape[0], *pred.shape[2:])}, got {valid.dtype} {tuple(valid.shape)}"
        )
    # (B, 2, H, W) -> (num_valid, 2): only valid pixels enter any arithmetic.
    pred_valid = pred.movedim(1, -1)[valid].float()
    target_valid = target.movedim(1, -1)[valid].float()
    error = torch.linalg.vector_norm(pred_valid - target_valid, dim=-1)
    magnitude = torch.linalg.vector_norm(target_valid, dim=-1)
    outlier = (error > OUTLIER_PIXELS) & (error > OUTLIER_RELATIVE * magnitude)
    return FlowErrorSums(error.double().sum().item(), int(outlier.sum()), error.numel())


class FlowMetrics:
    """Optical-flow metrics over an evaluation split, accumulated with ``update(pred, target, valid, events)`` a batch
    at a time. Three pixel sets and two reductions, each named in ``compute``'s result:

    - ``aee_batch_mean``, ``outlier_pct_batch_mean``: the paper code's figures (BIT-Vision/EventPretrain
      ``trainer/finetune_flow/ft_flow_trainer.py:198-203,230-231``, ``flow_metric.py``): pixels with valid ground
      truth AND events in the window, AEE and outlier % of each batch, then the plain mean over batches (its
      ``MetricLogger`` global average). They depend on the batch size and order; a batch without such a pixel is
      left out (theirs would average in a NaN).
    - ``aee_pixel_mean``, ``outlier_pct_pixel_mean``: the same pixels pooled over the split, each pixel weighing
      the same whatever the batching.
    - ``aee_dense_pixel_mean``, ``outlier_pct_dense_pixel_mean``: every pixel with valid ground truth, pooled (the
      paper code's commented-out "dense" figures).

    ``events`` None counts every valid pixel as having events. ``event_pixels`` and ``valid_pixels`` count the two
    sets. Raises ValueError when no scored pixel was seen, rather than return NaN.
    """

    def __init__(self) -> None:
        self.reset()

    def update(self, pred: Tensor, target: Tensor, valid: Tensor | None = None, events: Tensor | None = None) -> None:
        """pred, target (B, 2, H, W) pixels; valid, events (B, H, W) bool or None (every pixel)."""
        dense = flow_errors(pred, target, valid)
        self.dense = self.dense + dense
        if events is None:
            sparse = dense
        else:
            scored = events if valid is None else valid & events
            sparse = flow_errors(pred, target, scored)
        self.sparse = self.sparse + sparse
        if sparse.valid_pixels:
            self.batch_aee.append(sparse.endpoint_error_sum / sparse.valid_pixels)
            self.batch_outlier_pct.append(100.0 * sparse.outlier_count / sparse.valid_pixels)

    def compute(self) -> dict[str, float | int]:
        if self.sparse.valid_pixels == 0:
            raise ValueError(
                "no valid flow pixel with events was accumulated: AEE and outlier % are undefined "
                "(check the validity and event masks and that update() was called)"
            )
        return {
            "aee_batch_mean": math.fsum(self.batch_aee) / len(self.batch_aee),
            "outlier_pct_batch_mean": math.fsum(self.batch_outlier_pct) / len(self.batch_outlier_pct),
            "aee_pixel_mean": self.sparse.endpoint_error_sum / self.sparse.valid_pixels,
            "outlier_pct_pixel_mean": 100.0 * self.sparse.outlier_count / self.sparse.valid_pixels,
            "aee_dense_pixel_mean": self.dense.endpoint_error_sum / self.dense.valid_pixels,
            "outlier_pct_dense_pixel_mean": 100.0 * self.dense.outlier_count / self.dense.valid_pixels,
            "event_pixels": self.sparse.valid_pixels,
            "valid_pixels": self.dense.valid_pixels,
        }

    def reset(self) -> None:
        self.dense = FlowErrorSums(0.0, 0, 0)
        self.sparse = FlowErrorSums(0.0, 0, 0)
        self.batch_aee: list[float] = []
        self.batch_outlier_pct: list[float] = []
