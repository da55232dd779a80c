"""cvad.metrics against scikit-learn, batch accumulation, binned accuracy, continual summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve, roc_auc_score

from cvad.metrics import (
    ImageMetrics,
    PixelMetrics,
    f1_max,
    final_average,
    forgetting,
    forgetting_per_task,
    roc_auc,
)


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.zeros_like(denominator)
    np.divide(2 * precision * recall, denominator, out=f1, where=denominator > 0)
    return float(f1.max())


def random_case(seed: int, n: int, positive_rate: float, decimals: int | None, dtype=np.float64):
    """Scores where positives are shifted up; ``decimals`` rounds them to create ties."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < positive_rate
    labels[rng.integers(n)] = True  # at least one of each class
    labels[rng.integers(n)] = False
    if labels.all() or not labels.any():
        labels[0], labels[1] = True, False
    scores = rng.standard_normal(n) + 0.8 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores.astype(dtype), labels


CASES = [
    # (seed, n, positive rate, decimals)
    (0, 2000, 0.3, None),  # continuous
    (1, 2000, 0.3, 0),  # heavy ties: ~8 distinct values
    (2, 5000, 0.5, 1),  # many ties
    (3, 3000, 0.002, None),  # very imbalanced: a handful of positives
    (4, 3000, 0.995, 1),  # very imbalanced the other way, with ties
    (5, 2, 0.5, None),  # tiny
    (6, 5, 0.4, 0),  # tiny with ties
]


@pytest.mark.parametrize("seed,n,rate,decimals", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roc_auc_and_f1_max_equal_sklearn(seed, n, rate, decimals, dtype):
    scores, labels = random_case(seed, n, rate, decimals, dtype)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)


def test_all_scores_tied_gives_auroc_one_half_and_f1_of_predicting_all_positive():
    labels = np.array([1, 0, 0, 1, 0])
    scores = np.full(5, 0.7)
    assert roc_auc(scores, labels) == 0.5
    assert f1_max(scores, labels) == pytest.approx(2 * 2 / (2 * 2 + 3))


def test_hand_computed_values():
    # Sorted descending: 0.9(+) 0.8(-) 0.7(+) 0.6(+) 0.1(-): pairs won = 2 + 1 + 1 of 6.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    labels = np.array([True, False, True, True, False])
    assert roc_auc(scores, labels) == pytest.approx(4 / 6)
    # Threshold 0.6: TP 3, FP 1, FN 0 -> F1 = 6/7 beats threshold 0.9 (F1 = 2/4).
    assert f1_max(scores, labels) == pytest.approx(6 / 7)


def test_torch_inputs_of_any_float_dtype_and_shape():
    scores, labels = random_case(7, 1200, 0.2, 2, np.float32)
    expected = roc_auc_score(labels, scores)
    as_maps = torch.from_numpy(scores).reshape(3, 20, 20)
    assert roc_auc(as_maps, torch.from_numpy(labels).reshape(3, 20, 20)) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(as_maps, torch.from_numpy(labels.astype(np.int64)).reshape(3, 20, 20)) == pytest.approx(
        expected, abs=1e-12
    )
    # Half precision is widened to float32; the result equals sklearn on the rounded scores.
    half = torch.from_numpy(scores).half()
    assert roc_auc(half, labels) == pytest.approx(roc_auc_score(labels, half.float().numpy()), abs=1e-12)


def test_single_class_is_undefined_not_one_half():
    scores = np.array([0.3, 0.1, 0.9])
    assert roc_auc(scores, np.zeros(3, dtype=bool)) is None
    assert roc_auc(scores, np.ones(3, dtype=bool)) is None
    assert f1_max(scores, np.zeros(3, dtype=bool)) is None
    # With only positives F1 is defined: predicting every image defective is perfect.
    assert f1_max(scores, np.ones(3, dtype=bool)) == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_rejected_everywhere(bad):
    scores = np.array([0.1, bad, 0.3, 0.4], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    for metric in (roc_auc, f1_max):
        with pytest.raises(ValueError, match="non-finite scores"):
            metric(scores, labels)
    with pytest.raises(ValueError, match="PixelMetrics.update.*non-finite scores"):
        PixelMetrics().update(torch.from_numpy(scores).reshape(1, 2, 2), torch.from_numpy(labels > 0).reshape(1, 2, 2))
    with pytest.raises(ValueError, match="ImageMetrics.update.*non-finite scores"):
        ImageMetrics().update(torch.from_numpy(scores), torch.from_numpy(labels))


def test_malformed_labels_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="must be 0 or 1.*255"):
        roc_auc(np.array([0.1, 0.2]), np.array([0, 255]))
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        f1_max(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="masks must be bool"):
        PixelMetrics().update(torch.rand(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B,H,W\]"):
        PixelMetrics().update(torch.rand(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        PixelMetrics().update(torch.rand(2, 4, 4), torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"must both be \[B\]"):
        ImageMetrics().update(torch.rand(3), torch.ones(4))
    with pytest.raises(ValueError, match="'exact' or 'binned'"):
        PixelMetrics(method="sampled")
    with pytest.raises(ValueError, match="mantissa_bits"):
        PixelMetrics(method="binned", mantissa_bits=20)
    with pytest.raises(ValueError, match="no pixels were added"):
        PixelMetrics().compute()
    with pytest.raises(ValueError, match="no images were added"):
        ImageMetrics().compute()


def smooth_anomaly_maps(seed: int, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blurred noise maps (spatially correlated, like real ones) raised inside rectangular defects."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, size, size, generator=generator)
    maps = F.avg_pool2d(noise, 7, stride=1, padding=3)[:, 0].abs()
    masks = torch.zeros(batch, size, size, dtype=torch.bool)
    for i in range(0, batch, 2):  # every other image is defective
        top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        masks[i, top : top + size // 4, left : left + size // 3] = True
    return maps + 0.25 * masks, masks


def test_pixel_metrics_batchwise_equals_one_shot_and_sklearn():
    maps, masks = smooth_anomaly_maps(seed=0, batch=12, size=48)
    accumulator = PixelMetrics()
    for start in (0, 5, 6, 11):  # uneven batches, one of a single image
        end = {0: 5, 5: 6, 6: 11, 11: 12}[start]
        accumulator.update(maps[start:end], masks[start:end])
    result = accumulator.compute()
    flat_scores, flat_labels = maps.numpy().ravel(), masks.numpy().ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=1e-12)
    assert result["pixel_f1"] == pytest.approx(sklearn_f1_max(flat_scores, flat_labels), abs=1e-12)
    assert result == {"pixel_f1": f1_max(maps, masks), "pixel_auroc": roc_auc(maps, masks)}
    assert accumulator.num_pixels == maps.numel()
    assert accumulator.nbytes == 4 * maps.numel()  # exact mode: one float32 per pixel


def test_pixel_metrics_compute_again_and_keep_accumulating():
    maps, masks = smooth_anomaly_maps(seed=1, batch=8, size=32)
    accumulator = PixelMetrics()
    accumulator.update(maps[:4], masks[:4])
    first_half = accumulator.compute()
    assert first_half == accumulator.compute()
    assert first_half["pixel_auroc"] == pytest.approx(roc_auc(maps[:4], masks[:4]), abs=1e-12)
    accumulator.update(maps[4:], masks[4:])
    assert accumulator.compute() == {"pixel_f1": f1_max(maps, masks), "pixel_auroc": roc_auc(maps, masks)}


def test_pixel_metrics_without_defective_pixels_are_undefined():
    maps, _ = smooth_anomaly_maps(seed=2, batch=2, size=16)
    for method in ("exact", "binned"):
        accumulator = PixelMetrics(method=method)
        accumulator.update(maps, torch.zeros(2, 16, 16, dtype=torch.bool))
        assert accumulator.compute() == {"pixel_f1": None, "pixel_auroc": None}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_pixel_metrics_stay_within_1e3_of_exact(seed):
    maps, masks = smooth_anomaly_maps(seed=seed, batch=16, size=64)
    exact, binned = PixelMetrics("exact"), PixelMetrics("binned")
    for start in range(0, 16, 4):
        exact.update(maps[start : start + 4], masks[start : start + 4])
        binned.update(maps[start : start + 4], masks[start : start + 4])
    exact_result, binned_result = exact.compute(), binned.compute()
    assert abs(binned_result["pixel_auroc"] - exact_result["pixel_auroc"]) < 1e-3
    assert abs(binned_result["pixel_f1"] - exact_result["pixel_f1"]) < 1e-3
    # Binned F1 is the exact F1 at bin edges, so it can only fall short of the exact maximum.
    assert binned_result["pixel_f1"] <= exact_result["pixel_f1"] + 1e-12
    assert binned.nbytes == 2 * 8 * 2**20  # constant, independent of the pixel count
    assert binned.num_pixels == maps.numel()


def test_binned_equals_exact_when_scores_take_few_values_across_zero():
    """Distinct values never share a bin here, including -0.0 / +0.0 and negatives."""
    rng = np.random.default_rng(3)
    values = np.array([-1e3, -3.0, -0.5, -0.0, 0.0, 1e-30, 0.5, 3.0, 1e6], dtype=np.float32)
    scores = torch.from_numpy(rng.choice(values, size=(6, 20, 20)))
    masks = torch.from_numpy(rng.random((6, 20, 20)) < 0.3 + 0.05 * scores.numpy().clip(-5, 5))
    exact, binned = PixelMetrics("exact"), PixelMetrics("binned")
    exact.update(scores, masks)
    binned.update(scores, masks)
    assert binned.compute() == pytest.approx(exact.compute(), abs=1e-15)
    flat = scores.numpy().ravel(), masks.numpy().ravel()
    assert exact.compute()["pixel_auroc"] == pytest.approx(roc_auc_score(flat[1], flat[0]), abs=1e-12)


def test_binned_bins_are_monotone_across_zero_even_when_coarse():
    """Positives from 16 up, negatives below: 16 starts a new exponent, hence a new bin at any
    resolution, so binned metrics are perfect exactly when the bins keep the score order."""
    scores = torch.linspace(-50, 50, 20001).reshape(1, 1, -1)
    defective = scores >= 16
    for labels, auroc in ((defective, 1.0), (~defective, 0.0)):  # the reversed labels rank worst
        binned = PixelMetrics("binned", mantissa_bits=0)
        binned.update(scores, labels)
        assert binned.compute()["pixel_auroc"] == auroc
    assert binned.compute()["pixel_f1"] == pytest.approx(f1_predicting_all_defective(labels))


def f1_predicting_all_defective(labels: torch.Tensor) -> float:
    """F1 of predicting everything defective: what a perfectly reversed ranking can reach."""
    positives = int(labels.sum())
    return 2 * positives / (positives + labels.numel())


def test_image_metrics_match_sklearn_with_integer_labels():
    scores, labels = random_case(8, 300, 0.6, 1)
    accumulator = ImageMetrics()
    for start in range(0, 300, 32):
        accumulator.update(
            torch.from_numpy(scores[start : start + 32]).float(),
            torch.from_numpy(labels[start : start + 32].astype(np.int64)),
        )
    result = accumulator.compute()
    scores32 = scores.astype(np.float32)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores32), abs=1e-12)
    assert result["image_f1"] == pytest.approx(sklearn_f1_max(scores32, labels), abs=1e-12)
    assert accumulator.num_images == 300


def test_image_metrics_single_class_task():
    accumulator = ImageMetrics()
    accumulator.update(torch.tensor([0.2, 0.4]), torch.tensor([0, 0]))
    assert accumulator.compute() == {"image_f1": None, "image_auroc": None}


# R[t][j]: metric on task j after training task t; None above the diagonal.
MATRIX = [
    [0.90, None, None],
    [0.80, 0.70, None],
    [0.60, 0.75, 0.50],
]


def test_final_average_is_mean_of_last_row():
    assert final_average(MATRIX) == pytest.approx((0.60 + 0.75 + 0.50) / 3)
    assert final_average([[0.4, None], [None, 0.8]]) == pytest.approx(0.8)  # undefined entries skipped
    assert final_average([[None]]) is None
    assert final_average([]) is None


def test_forgetting_uses_best_earlier_value_per_task():
    # Task 0: best before the end 0.90, final 0.60 -> 0.30. Task 1: best 0.70, final 0.75 -> -0.05.
    assert forgetting(MATRIX) == pytest.approx((0.30 + -0.05) / 2)
    # Ragged rows (no stored None) mean the same thing.
    assert forgetting([[0.90], [0.80, 0.70], [0.60, 0.75, 0.50]]) == pytest.approx(0.125)


def test_forgetting_skips_undefined_entries():
    matrix = [
        [None, None, None],  # task 0 has no masks: pixel metric undefined throughout
        [None, 0.70, None],
        [None, 0.40, 0.90],
    ]
    assert forgetting(matrix) == pytest.approx(0.30)
    assert forgetting([[0.5, None], [None, 0.6]]) is None  # task 0's final value undefined
    assert forgetting([[0.9]]) is None  # a single task cannot forget


def test_forgetting_per_task_is_what_forgetting_averages():
    assert forgetting_per_task(MATRIX) == pytest.approx([0.30, -0.05])  # the dashboard's bars
    assert forgetting_per_task([[None, None, None], [None, 0.70, None], [None, 0.40, 0.90]]) == [
        None,
        pytest.approx(0.30),
    ]
    assert forgetting_per_task([[0.9]]) == []
    assert forgetting_per_task([]) == []


def test_summaries_reject_nan_entries():
    with pytest.raises(ValueError, match=r"R\[1\]\[0\].*store None"):
        final_average([[0.5, None], [float("nan"), 0.4]])
    with pytest.raises(ValueError, match=r"R\[0\]\[0\]"):
        forgetting([[float("inf"), None], [0.5, 0.4]])
