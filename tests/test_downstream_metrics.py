"""Downstream metrics against independent computations: confusion matrices and mIoU / mAcc by numpy loops,
flow errors by hand, top-k with ties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from evpretrain.downstream.metrics import (
    ConfusionMatrix,
    FlowMetrics,
    SegmentationMetrics,
    batch_scores,
    confusion_matrix,
    flow_errors,
    per_class_accuracy,
    segmentation_scores,
    topk_accuracy,
)

IGNORE = 255


def confusion_by_loops(pred, target, num_classes, ignore_index=IGNORE):
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t != ignore_index:
            matrix[t, p] += 1
    return matrix


def scores_by_loops(pred, target, num_classes, ignore_index=IGNORE):
    """Per-class IoU and accuracy straight from the label maps, NaN where the denominator is 0, and their nanmeans."""
    valid = target != ignore_index
    iou, acc = [], []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        acc.append(tp / (tp + fn) if tp + fn else math.nan)
    return np.array(iou), np.array(acc), np.nanmean(iou), np.nanmean(acc)


def label_maps(num_classes, shape=(2, 5, 7)):
    """(pred, target) int arrays; the target may hold the ignore label."""
    pred = hnp.arrays(np.int64, shape, elements=st.integers(0, num_classes - 1))
    target = hnp.arrays(np.int64, shape, elements=st.sampled_from([*range(num_classes), IGNORE]))
    return st.tuples(pred, target)


# --- confusion matrix and segmentation scores ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(maps=label_maps(4), split=st.integers(0, 2))
def test_confusion_matrix_matches_loops_and_accumulates_in_parts(maps, split):
    pred, target = maps
    expected = confusion_by_loops(pred, target, 4)
    once = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 4)
    assert once.dtype == torch.int64
    np.testing.assert_array_equal(once.numpy(), expected)
    accumulator = ConfusionMatrix(4)
    accumulator.update(torch.from_numpy(pred[:split]), torch.from_numpy(target[:split]))
    accumulator.update(torch.from_numpy(pred[split:]), torch.from_numpy(target[split:]))
    np.testing.assert_array_equal(accumulator.compute().numpy(), expected)


@settings(max_examples=60, deadline=None)
@given(maps=label_maps(5))
def test_miou_and_macc_match_loops_over_the_label_maps_and_stay_in_the_unit_interval(maps):
    pred, target = maps
    if np.all(target == IGNORE):
        with pytest.raises(ValueError, match="counts no pixel"):
            segmentation_scores(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5))
        return
    scores = segmentation_scores(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5))
    iou, acc, miou, macc = scores_by_loops(pred, target, 5)
    np.testing.assert_allclose(scores.iou.numpy(), iou, equal_nan=True)
    np.testing.assert_allclose(scores.accuracy.numpy(), acc, equal_nan=True)
    assert scores.miou == pytest.approx(miou) and scores.macc == pytest.approx(macc)
    valid = target != IGNORE
    assert scores.pixel_accuracy == pytest.approx(np.mean(pred[valid] == target[valid]))
    for value in (scores.miou, scores.macc, scores.pixel_accuracy):
        assert 0.0 <= value <= 1.0


def test_an_empty_class_and_ignored_pixels_are_left_out_as_mmsegmentation_does():
    # 4 classes. Class 2 is predicted only on an ignored pixel, class 3 never appears: both IoU NaN.
    target = torch.tensor([0, 0, 1, 1, IGNORE, 1])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    confusion = confusion_matrix(pred, target, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion)
    # IoU_0 = 1 / (1 + 1 + 1), IoU_1 = 2 / (2 + 1 + 1); acc_0 = 1 / 2, acc_1 = 2 / 3.
    np.testing.assert_allclose(scores.iou.numpy(), [1 / 3, 1 / 2, math.nan, math.nan], equal_nan=True)
    np.testing.assert_allclose(scores.accuracy.numpy(), [1 / 2, 2 / 3, math.nan, math.nan], equal_nan=True)
    assert scores.miou == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert scores.macc == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert scores.pixel_accuracy == pytest.approx(3 / 5)
    assert scores.as_dict()["iou_per_class"] == [pytest.approx(1 / 3), pytest.approx(1 / 2), None, None]


def test_a_class_predicted_but_never_true_counts_in_miou_with_zero_but_not_in_macc():
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 1, 1])
    scores = segmentation_scores(confusion_matrix(pred, target, 2))
    assert scores.iou.tolist() == [0.5, 0.0]
    assert scores.miou == pytest.approx(0.25)
    assert math.isnan(scores.accuracy[1]) and scores.macc == pytest.approx(0.5)


def test_a_perfect_prediction_scores_one():
    target = torch.tensor([[0, 1, 2], [2, IGNORE, 0]])
    scores = segmentation_scores(confusion_matrix(target.clamp(max=2), target, 3))
    assert (scores.miou, scores.macc, scores.pixel_accuracy) == (1.0, 1.0, 1.0)


def test_the_paper_scores_a_batch_over_all_classes_and_averages_the_batches():
    # 3 classes. Batch 1: true [0, 0, 1, 255], predicted [0, 1, 1, 2] -> IoU_0 = 1/2, IoU_1 = 1/2, IoU_2 = 0
    # (neither true nor predicted once the ignored pixel is out: 0 in the paper's mean, not left out) -> 1/3;
    # recall 1/2, 1, 0 -> 1/2. Batch 2: true [2, 2], predicted [2, 0] -> IoU_0 = 0, IoU_1 = 0 (absent), IoU_2 = 1/2
    # -> 1/6; recall 0, 0, 1/2 -> 1/6.
    metrics = SegmentationMetrics(3)
    metrics.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 0, 1, 255]]))
    metrics.update(torch.tensor([[2, 0]]), torch.tensor([[2, 2]]))
    metrics.update(torch.tensor([[1, 1]]), torch.tensor([[255, 255]]))  # every pixel ignored: left out
    assert batch_scores(torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]])) == pytest.approx((1 / 3, 1 / 2))
    scores = metrics.compute()
    assert scores["miou_batch_mean"] == pytest.approx((1 / 3 + 1 / 6) / 2)
    assert scores["macc_batch_mean"] == pytest.approx((1 / 2 + 1 / 6) / 2)
    # The dataset's confusion: true 0 -> [1, 1, 0], 1 -> [0, 1, 0], 2 -> [1, 0, 1]: IoU 1/3, 1/2, 1/2.
    assert scores["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert scores["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_indices_outside_the_classes_are_refused_rather_than_dropped():
    with pytest.raises(ValueError, match=r"pred holds class indices outside \[0, 3\)"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"target holds class indices outside \[0, 3\) other than the ignore label"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="argmax"):
        confusion_matrix(torch.rand(2), torch.tensor([0, 1]), 3)
    # Ignored targets are dropped whatever their prediction.
    assert confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, IGNORE]), 2).sum() == 1


def test_per_class_accuracy_is_nan_for_classes_absent_from_the_labels():
    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    np.testing.assert_allclose(per_class_accuracy(confusion).numpy(), [0.75, math.nan, 0.5], equal_nan=True)


# --- top-k -----------------------------------------------------------------------------------------------------


def test_topk_by_hand_with_ties_broken_by_class_index_and_k_clamped():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 2.0, 2.0, 1.0]])
    labels = torch.tensor([2, 0, 3, 2])
    # Ranks of the labels: 1 (3 > 2); 0 (tie, smallest index); 3 (three equal logits at smaller indices);
    # 1 (equal to class 1, which has the smaller index).
    assert topk_accuracy(logits, labels, ks=(1, 2, 3, 4, 10)) == {
        "top1": 0.25,
        "top2": 0.75,
        "top3": 0.75,
        "top4": 1.0,
        "top10": 1.0,
    }


@settings(max_examples=50, deadline=None)
@given(data=st.data(), num_classes=st.integers(1, 6), num_samples=st.integers(1, 12))
def test_top1_is_argmax_and_topk_counts_a_stable_descending_sort(data, num_classes, num_samples):
    # Small integer logits force ties.
    logits = data.draw(hnp.arrays(np.float32, (num_samples, num_classes), elements=st.integers(-2, 2)))
    labels = data.draw(hnp.arrays(np.int64, num_samples, elements=st.integers(0, num_classes - 1)))
    result = topk_accuracy(torch.from_numpy(logits), torch.from_numpy(labels), ks=(1, 3, 5))
    assert result["top1"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels))
    order = np.argsort(-logits, axis=1, kind="stable")  # descending, equal logits by class index
    rank = np.argmax(order == labels[:, None], axis=1)
    for k in (3, 5):
        assert result[f"top{k}"] == pytest.approx(np.mean(rank < k))


def test_topk_refuses_nan_logits_out_of_range_labels_and_empty_input():
    with pytest.raises(ValueError, match="NaN"):
        topk_accuracy(torch.tensor([[math.nan, 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        topk_accuracy(torch.zeros(1, 2), torch.tensor([2]))
    with pytest.raises(ValueError, match="empty"):
        topk_accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


# --- optical flow ----------------------------------------------------------------------------------------------


def flow_pixels(vectors):
    """(1, 2, 1, N) flow from a list of N (x, y) vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 2, 1, -1)


def test_flow_errors_by_hand_with_strict_outlier_thresholds_and_invalid_pixels_ignored():
    target = flow_pixels([(100, 0), (100, 0), (0, 0), (10, 0), (math.nan, 1), (0, 0)])
    pred = flow_pixels([(103, 0), (100, 3.5), (3, 4), (14, 0), (0, 0), (1e6, 0)])
    valid = torch.tensor([[[True, True, True, True, False, False]]])
    # Errors 3 (not > 3), 3.5 (> 3 but not > 5 % of 100), 5 (> 3 and > 0), 4 (> 3 and > 0.5).
    sums = flow_errors(pred, target, valid)
    assert (sums.endpoint_error_sum, sums.outlier_count, sums.valid_pixels) == (15.5, 2, 4)
    metrics = FlowMetrics()
    metrics.update(pred, target, valid)
    scores = metrics.compute()
    for reduction in ("batch_mean", "pixel_mean", "dense_pixel_mean"):  # one batch, every valid pixel with events
        assert scores[f"aee_{reduction}"] == pytest.approx(15.5 / 4) and scores[f"outlier_pct_{reduction}"] == 50.0
    assert scores["valid_pixels"] == scores["event_pixels"] == 4


def test_aee_is_the_mean_over_all_valid_pixels_of_the_dataset_not_of_per_sample_means():
    metrics = FlowMetrics()
    sparse_target = torch.zeros(1, 2, 2, 2)
    metrics.update(sparse_target + 10.0, sparse_target, torch.tensor([[[True, False], [False, False]]]))
    metrics.update(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool))
    # One pixel with error 10 * sqrt(2), four with 0: the dataset mean is 10 * sqrt(2) / 5 (per-sample: / 2).
    assert metrics.compute()["aee_pixel_mean"] == pytest.approx(10 * math.sqrt(2) / 5)
    assert metrics.compute()["aee_batch_mean"] == pytest.approx(10 * math.sqrt(2) / 2)
    assert metrics.compute()["valid_pixels"] == 5


def test_flow_scores_count_only_pixels_with_events_and_the_paper_averages_batches():
    # Batch 1: two samples of 1 x 3 pixels. Errors (pred 0): sample a: 5 (3, 4), 10 (6, 8), 1 (1, 0); sample b: 4,
    # 2, 0. Valid: all but b's last; events: not at a's second pixel nor b's first.
    target1 = torch.tensor([[[[3.0, 6.0, 1.0]], [[4.0, 8.0, 0.0]]], [[[0.0, 2.0, 0.0]], [[4.0, 0.0, 0.0]]]])
    valid1 = torch.tensor([[[True, True, True]], [[True, True, False]]])
    events1 = torch.tensor([[[True, False, True]], [[False, True, True]]])
    # Scored: a's 5 and 1, b's 2 -> batch AEE 8 / 3; outliers (> 3 px and > 5 %): 5 -> 1 of 3.
    # Batch 2: one sample, errors 12 (12, 0) with events, 30 without: batch AEE 12, outliers 1 of 1.
    target2 = torch.tensor([[[[12.0, 30.0]], [[0.0, 0.0]]]])
    valid2 = torch.ones(1, 1, 2, dtype=torch.bool)
    events2 = torch.tensor([[[True, False]]])
    metrics = FlowMetrics()
    metrics.update(torch.zeros_like(target1), target1, valid1, events1)
    metrics.update(torch.zeros_like(target2), target2, valid2, events2)
    scores = metrics.compute()
    assert scores["aee_batch_mean"] == pytest.approx((8 / 3 + 12) / 2)  # the paper's: 7.333
    assert scores["aee_pixel_mean"] == pytest.approx((5 + 1 + 2 + 12) / 4)  # 5.0
    assert scores["outlier_pct_batch_mean"] == pytest.approx((100 / 3 + 100) / 2)
    assert scores["outlier_pct_pixel_mean"] == pytest.approx(100 * 2 / 4)
    # Every valid pixel: 5, 10, 1, 4, 2 and 12, 30; outliers 5, 10, 4, 12, 30.
    assert scores["aee_dense_pixel_mean"] == pytest.approx(64 / 7)
    assert scores["outlier_pct_dense_pixel_mean"] == pytest.approx(100 * 5 / 7)
    assert (scores["event_pixels"], scores["valid_pixels"]) == (4, 7)


def test_a_batch_without_a_pixel_with_events_is_left_out_of_the_batch_mean():
    metrics = FlowMetrics()
    target = torch.full((1, 2, 1, 2), 3.0)
    metrics.update(torch.zeros_like(target), target, None, torch.tensor([[[True, False]]]))
    metrics.update(torch.zeros_like(target), target, None, torch.zeros(1, 1, 2, dtype=torch.bool))
    assert metrics.compute()["aee_batch_mean"] == pytest.approx(3 * math.sqrt(2))
    assert metrics.compute()["valid_pixels"] == 4 and metrics.compute()["event_pixels"] == 1


def test_flow_metrics_refuse_to_report_without_valid_pixels():
    metrics = FlowMetrics()
    with pytest.raises(ValueError, match="no valid flow pixel with events"):
        metrics.compute()
    metrics.update(torch.ones(2, 2, 3, 3), torch.zeros(2, 2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no valid flow pixel with events"):
        metrics.compute()
    with pytest.raises(ValueError, match=r"valid must be bool \(B, H, W\)"):
        flow_errors(torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 3), torch.ones(2, 3, 3))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), split=st.integers(0, 3))
def test_flow_metrics_accumulated_in_parts_equal_all_at_once(seed, split):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 2, 4, 5, generator=generator) * 20
    pred = target + torch.randn(3, 2, 4, 5, generator=generator) * 4
    valid = torch.rand(3, 4, 5, generator=generator) > 0.3
    valid[0, 0, 0] = True
    whole, parts = FlowMetrics(), FlowMetrics()
    whole.update(pred, target, valid)
    parts.update(pred[:split], target[:split], valid[:split])
    parts.update(pred[split:], target[split:], valid[split:])
    a, b = whole.compute(), parts.compute()
    assert a["valid_pixels"] == b["valid_pixels"] == int(valid.sum())
    assert a["aee_pixel_mean"] == pytest.approx(b["aee_pixel_mean"], rel=1e-9)
    assert a["outlier_pct_pixel_mean"] == b["outlier_pct_pixel_mean"]
    assert 0.0 <= a["outlier_pct_pixel_mean"] <= 100.0
    error = (pred - target).norm(dim=1)[valid]
    assert a["aee_pixel_mean"] == pytest.approx(error.mean().item(), rel=1e-5)


def test_the_trivial_baselines_score_the_best_constant_prediction_and_zero_flow():
    from evpretrain.downstream.metrics import constant_prediction_confusion
    from evpretrain.downstream.run import trivial_baseline

    # Masks: 5 background pixels, 2 of class 1, 1 of class 2, one ignored. Predicting 0 everywhere:
    # IoU_0 = 5 / 8, IoU_1 = IoU_2 = 0; acc_0 = 1, acc_1 = acc_2 = 0; class 3 absent: left out.
    masks = torch.tensor([[[0, 0, 1], [0, 2, IGNORE]], [[0, 0, 1], [IGNORE, IGNORE, IGNORE]]])
    assert constant_prediction_confusion(torch.tensor([5, 2, 1, 0])).tolist() == [
        [5, 0, 0, 0],
        [2, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    loader = [{"mask": masks[:1]}, {"mask": masks[1:]}]  # batches as a DataLoader yields them
    segment = trivial_baseline("segment", loader, 4)
    assert segment["miou"] == pytest.approx(5 / 8 / 3) and segment["macc"] == pytest.approx(1 / 3)
    assert segment["name"].startswith("class 0 everywhere")
    classify = trivial_baseline("classify", [{"label": torch.tensor([2, 2, 1])}, {"label": torch.tensor([2])}], 3)
    assert classify["top1"] == pytest.approx(3 / 4) and classify["name"].startswith("class 2")
    # Zero flow: the error is the true magnitude. (3, 4) -> 5 px, an outlier; (0, 0) -> 0; invalid pixel left out.
    flow = torch.tensor([[[[3.0, 0.0, 9.0]], [[4.0, 0.0, 9.0]]]])  # (1, 2, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    zero = trivial_baseline("flow", [{"flow": flow, "valid": valid}], None)
    assert zero["name"] == "zero flow" and zero["aee_pixel_mean"] == pytest.approx(2.5)
    assert zero["outlier_pct_pixel_mean"] == 50.0
    # With the event mask of the samples: only the (0, 0) pixel has events.
    events = torch.tensor([[[False, True, True]]])
    zero = trivial_baseline("flow", [{"flow": flow, "valid": valid, "events": events}], None)
    assert zero["aee_pixel_mean"] == 0.0 and zero["aee_dense_pixel_mean"] == pytest.approx(2.5)
