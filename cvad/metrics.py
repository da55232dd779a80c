"""Detection metrics (F1-max, ROC-AUC, at a calibrated threshold), their names, and the continual summaries.

Exact computation never sorts (score, label) pairs together. Scores are split by label,
each class is sorted on its own (a value-only sort, much faster than an argsort), and
every count the metrics need comes from binary searches of the positive scores into the
sorted negatives:

- ROC-AUC is the Mann-Whitney statistic: the share of (positive, negative) pairs the
  positive wins, a tie counting one half. That is exactly the trapezoidal area under the
  ROC curve that ``sklearn.metrics.roc_auc_score`` integrates, ties included, and it is
  summed in integers, so it is exact.
- F1-max: lowering the threshold between two positive scores only adds false positives,
  so the best threshold is always one of the positive scores. F1 is evaluated there,
  with TP = #positives >= t and FP = #negatives >= t (predict positive when score >= t),
  i.e. at every distinct score value that can win.

Searches run over chunks of positives, so no temporary is ever as large as the input.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # torch is not imported here: the metric names and summaries serve `cvad recommend` and the dashboard
    import torch

    ArrayLike = torch.Tensor | np.ndarray

# What one evaluation of one task yields: the entries of the task x task matrices R[t][j]. The threshold-free ones
# (F1-max picks its threshold on the test labels, an oracle; AUPRO from cvad.region_overlap), then the decisions at
# the thresholds calibrated on held-out good images (cvad.continual.calibration), which a device can make.
THRESHOLD_FREE_METRICS = ("image_f1", "image_auroc", "pixel_f1", "pixel_auroc", "pixel_aupro")
CALIBRATED_METRICS = ("image_f1_calibrated", "image_precision", "image_recall", "image_fpr", "pixel_f1_calibrated")
DETECTION_METRICS = (*THRESHOLD_FREE_METRICS, *CALIBRATED_METRICS)
LOWER_IS_BETTER = ("image_fpr",)
# What a recommendation may maximise.
QUALITY_METRICS = tuple(metric for metric in DETECTION_METRICS if metric not in LOWER_IS_BETTER)
# Every matrix a run records; routing_accuracy only for methods that pick each image's task themselves.
METRICS = (*DETECTION_METRICS, "routing_accuracy")
# forgetting(R) of these matrices, kept in the result record's "final" as forgetting_<metric>.
FORGETTING_OF = ("pixel_f1", "image_f1")
FORGETTING_METRICS = tuple(f"forgetting_{metric}" for metric in FORGETTING_OF)
METRIC_LABELS = {
    "image_f1": "image F1",
    "image_auroc": "image ROC-AUC",
    "pixel_f1": "pixel F1",
    "pixel_auroc": "pixel ROC-AUC",
    "pixel_aupro": "pixel AUPRO (FPR <= 0.3)",
    "image_f1_calibrated": "image F1 at the calibrated threshold",
    "image_precision": "image precision at the calibrated threshold",
    "image_recall": "image recall at the calibrated threshold",
    "image_fpr": "image false-positive rate at the calibrated threshold",
    "pixel_f1_calibrated": "pixel F1 at the calibrated threshold",
    "routing_accuracy": "routing accuracy",
}

# Positives processed per binary-search chunk: bounds compute()'s temporaries to ~40 MB.
_SEARCH_CHUNK = 1 << 20


def _is_tensor(value: object) -> bool:
    """A torch tensor (one can only exist once torch is imported, so this never imports it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


# ----------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------


def _scores_to_numpy(scores: ArrayLike | list, where: str, dtype: np.dtype | None) -> np.ndarray:
    """Flat floating-point array of ``scores`` (no copy when already right); raises on NaN/inf.

    ``dtype=None`` keeps float32/float64 as given (other types become float32 if they are
    half precision, float64 otherwise); a dtype forces it.
    """
    if _is_tensor(scores):
        import torch

        scores = scores.detach()
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        array = scores.cpu().numpy()
    else:
        array = np.asarray(scores)
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{where}: scores must be numeric, got dtype {array.dtype}.")
    if dtype is None:
        dtype = (
            array.dtype
            if array.dtype in (np.float32, np.float64)
            else (np.float32 if array.dtype == np.float16 else np.float64)
        )
    array = np.ascontiguousarray(array, dtype=dtype).reshape(-1)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise ValueError(
            f"{where}: {bad} of {array.size} anomaly scores are NaN or infinite: the model "
            "produced non-finite scores. Check the model (diverged training, a zero variance, "
            "a division by zero) before computing metrics."
        )
    return array


def _labels_to_numpy(labels: ArrayLike | list, where: str, *, require_bool: bool) -> np.ndarray:
    """Flat bool array; integer/float labels must be exactly 0 or 1 unless bool is required."""
    array = labels.detach().cpu().numpy() if _is_tensor(labels) else np.asarray(labels)
    if array.dtype == np.bool_:
        return array.reshape(-1)
    if require_bool:
        raise ValueError(
            f"{where}: masks must be bool tensors (got {array.dtype}); pass `mask > 0` "
            "so that it is explicit which pixels count as defective."
        )
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{where}: labels must be bool or 0/1 numbers, got dtype {array.dtype}.")
    flat = array.reshape(-1)
    if not np.isin(flat, (0, 1)).all():
        odd = np.unique(flat[~np.isin(flat, (0, 1))])[:5]
        raise ValueError(f"{where}: labels must be 0 or 1 (1 = defective), found values {odd.tolist()}.")
    return flat.astype(bool)


def _split_by_label(scores: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(negative scores, positive scores), both fresh copies the caller may sort in place."""
    if scores.shape != labels.shape:
        raise ValueError(f"{where}: {scores.size} scores but {labels.size} labels; they must match one to one.")
    return scores[~labels], scores[labels]


# ----------------------------------------------------------------------------------
# Exact metrics from class-wise sorted scores
# ----------------------------------------------------------------------------------


def _auroc_from_sorted(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """Mann-Whitney AUROC from ascending-sorted negatives; None unless both classes occur."""
    n_pos, n_neg = positives.size, negatives.size
    if n_pos == 0 or n_neg == 0:
        return None
    # Per positive: 2·(#negatives below) + (#negatives tied) = below + (below or tied).
    twice_wins = 0
    for start in range(0, n_pos, _SEARCH_CHUNK):
        chunk = positives[start : start + _SEARCH_CHUNK]
        twice_wins += int(np.searchsorted(negatives, chunk, side="left").sum(dtype=np.int64))
        twice_wins += int(np.searchsorted(negatives, chunk, side="right").sum(dtype=np.int64))
    return twice_wins / (2 * n_pos * n_neg)


def _f1_max_from_sorted(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """Best F1 over thresholds at the positive scores; both inputs sorted ascending."""
    n_pos, n_neg = positives.size, negatives.size
    if n_pos == 0:
        return None
    best = 0.0
    for start in range(0, n_pos, _SEARCH_CHUNK):
        thresholds = positives[start : start + _SEARCH_CHUNK]
        true_pos = n_pos - np.searchsorted(positives, thresholds, side="left")
        false_pos = n_neg - np.searchsorted(negatives, thresholds, side="left")
        # F1 = 2TP / (2TP + FP + FN) with FN = P - TP.
        best = max(best, float((2.0 * true_pos / (true_pos + false_pos + n_pos)).max()))
    return best


def _scores_by_class(scores: ArrayLike, labels: ArrayLike, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked (negative scores, positive scores) for the one-shot functions."""
    checked_scores = _scores_to_numpy(scores, where, None)
    return _split_by_label(checked_scores, _labels_to_numpy(labels, where, require_bool=False), where)


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """Exact ROC-AUC (ties count one half, as in sklearn); None when only one class is present.

    ``labels``: bool, or numbers that are 0 (normal) or 1 (defective). Any shape; flattened.
    """
    negatives, positives = _scores_by_class(scores, labels, "roc_auc")
    negatives.sort()
    return _auroc_from_sorted(negatives, positives)


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """Best F1 over every threshold (positive when score >= threshold); None without positives."""
    negatives, positives = _scores_by_class(scores, labels, "f1_max")
    negatives.sort()
    positives.sort()
    return _f1_max_from_sorted(negatives, positives)


# ----------------------------------------------------------------------------------
# Accumulators
# ----------------------------------------------------------------------------------


class _ClassSplitScores:
    """Scores stored per class, batch by batch; merged and sorted once when metrics are read."""

    def __init__(self) -> None:
        self.negative_chunks: list[np.ndarray] = []
        self.positive_chunks: list[np.ndarray] = []

    def add(self, negatives: np.ndarray, positives: np.ndarray) -> None:
        self.negative_chunks.append(negatives)
        self.positive_chunks.append(positives)

    @property
    def count(self) -> int:
        return sum(c.size for c in self.negative_chunks) + sum(c.size for c in self.positive_chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.negative_chunks) + sum(c.nbytes for c in self.positive_chunks)

    @staticmethod
    def _merged_sorted(chunks: list[np.ndarray]) -> np.ndarray:
        """One sorted array replaces the chunks (so a second compute costs only the sort)."""
        merged = np.concatenate(chunks) if len(chunks) != 1 else chunks[0]
        chunks.clear()
        merged.sort()
        chunks.append(merged)
        return merged

    def metrics(self) -> tuple[float | None, float | None]:
        """(F1-max, ROC-AUC), exact."""
        negatives = self._merged_sorted(self.negative_chunks)
        positives = self._merged_sorted(self.positive_chunks)
        return _f1_max_from_sorted(negatives, positives), _auroc_from_sorted(negatives, positives)


class _FloatBitHistogram:
    """Counts of positives and negatives over score bins that need no score range.

    A float32's bit pattern, read as an integer with the sign handled, is monotone in the
    value. Keeping its top ``9 + mantissa_bits`` bits (sign, exponent, leading mantissa
    bits) gives bins whose width is 2**-mantissa_bits relative to the score, from 1e-38
    to 3e38 and on both sides of zero, so no range has to be guessed before the first
    batch and nothing is ever rebinned.
    """

    def __init__(self, mantissa_bits: int) -> None:
        if not 0 <= mantissa_bits <= 14:
            raise ValueError(f"PixelMetrics: mantissa_bits must be in 0..14 (2**(9+bits) bins), got {mantissa_bits}.")
        self.shift = 23 - mantissa_bits
        self.num_bins = 1 << (9 + mantissa_bits)
        self.offset = self.num_bins // 2  # bins of negative scores come first
        self.negative_counts = np.zeros(self.num_bins, dtype=np.int64)
        self.positive_counts = np.zeros(self.num_bins, dtype=np.int64)

    def bin_of(self, scores: np.ndarray) -> np.ndarray:
        """Bin index of each float32 score; monotone non-decreasing in the score."""
        bits = (scores + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0
        ordered = np.where(bits >= 0, bits, bits ^ np.int32(0x7FFFFFFF))
        return (ordered >> self.shift) + self.offset

    def _count_into(self, counts: np.ndarray, scores: np.ndarray) -> None:
        if scores.size == 0:
            return
        bins = self.bin_of(scores)
        low = int(bins.min())
        histogram = np.bincount(bins - low)
        counts[low : low + histogram.size] += histogram

    def add(self, negatives: np.ndarray, positives: np.ndarray) -> None:
        self._count_into(self.negative_counts, negatives)
        self._count_into(self.positive_counts, positives)

    @property
    def count(self) -> int:
        return int(self.negative_counts.sum() + self.positive_counts.sum())

    @property
    def nbytes(self) -> int:
        return self.negative_counts.nbytes + self.positive_counts.nbytes

    def metrics(self) -> tuple[float | None, float | None]:
        """(F1-max, ROC-AUC) with every bin treated as one tied score value."""
        n_pos, n_neg = int(self.positive_counts.sum()), int(self.negative_counts.sum())
        negatives_below = np.cumsum(self.negative_counts) - self.negative_counts
        auroc = None
        if n_pos and n_neg:
            twice_wins = int((self.positive_counts * (2 * negatives_below + self.negative_counts)).sum())
            auroc = twice_wins / (2 * n_pos * n_neg)
        f1 = None
        if n_pos:
            occupied = self.positive_counts > 0
            positives_below = (np.cumsum(self.positive_counts) - self.positive_counts)[occupied]
            true_pos = n_pos - positives_below
            false_pos = n_neg - negatives_below[occupied]
            f1 = float((2.0 * true_pos / (true_pos + false_pos + n_pos)).max())
        return f1, auroc


class PixelMetrics:
    """Accumulates pixel scores and masks batch by batch for ONE task's test set, then gives
    pixel F1-max and ROC-AUC.

    ``method="exact"`` (default): scores are kept as float32, split by mask value, so a
    pixel costs 4 bytes (a 10 M-pixel MVTec category: 40 MB). ``compute()`` merges the
    batches (one more transient 4 B/pixel while merging) and sorts each class in place;
    results equal sklearn's ``roc_auc_score`` / ``precision_recall_curve`` on the same
    float32 scores. 10 M pixels: ~0.2 s (3 % defective) to ~1 s (50 %) on 2 CPU cores.
    It is the default because one task's test set is small enough (MVTec/VisA categories
    at 224-256 px: at most ~10-15 M pixels, i.e. ≤ 60 MB, ≤ 120 MB while merging).

    ``method="binned"``: constant memory, 2 · 8 · 2**(9 + mantissa_bits) bytes (16 MiB at
    the default 11 bits), whatever the number of pixels. Bins follow the float32 bit
    pattern (see ``_FloatBitHistogram``): each is 2**-11 ≈ 5e-4 wide relative to the
    score, needs no range and is never rebinned. Scores within one bin count as ties, so
    AUROC moves by at most half the share of (positive, negative) pairs that share a bin,
    and F1 is evaluated only at bin edges (never above the exact F1-max). On continuous
    random scores both stay within 1e-3 of exact (measured in tests/test_metrics.py);
    scores that take few distinct values give exactly the exact result. The resolution is
    relative, so it suits scores spread from near zero (distances, 1 - cosine); scores
    sitting on a large offset (e.g. 1000 + noise in [0, 1]) would need ``"exact"``.
    """

    def __init__(self, method: Literal["exact", "binned"] = "exact", mantissa_bits: int = 11) -> None:
        if method == "exact":
            self._state: _ClassSplitScores | _FloatBitHistogram = _ClassSplitScores()
        elif method == "binned":
            self._state = _FloatBitHistogram(mantissa_bits)
        else:
            raise ValueError(f"PixelMetrics: method must be 'exact' or 'binned', got {method!r}.")
        self.method = method

    def update(self, anomaly_maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch: anomaly maps [B,H,W] (any float dtype, any device), masks [B,H,W] bool."""
        if anomaly_maps.ndim != 3 or tuple(anomaly_maps.shape) != tuple(masks.shape):
            raise ValueError(
                "PixelMetrics.update: anomaly_maps and masks must both be [B,H,W] with the same "
                f"shape, got {tuple(anomaly_maps.shape)} and {tuple(masks.shape)}."
            )
        scores = _scores_to_numpy(anomaly_maps, "PixelMetrics.update", np.float32)
        labels = _labels_to_numpy(masks, "PixelMetrics.update", require_bool=True)
        self._state.add(*_split_by_label(scores, labels, "PixelMetrics.update"))

    @property
    def num_pixels(self) -> int:
        return self._state.count

    @property
    def nbytes(self) -> int:
        """Bytes the accumulated state holds now (excluding compute()'s transients)."""
        return self._state.nbytes

    def compute(self) -> dict[str, float | None]:
        """{"pixel_f1", "pixel_auroc"}; a value is None where it is undefined (one class only)."""
        if self.num_pixels == 0:
            raise ValueError("PixelMetrics.compute: no pixels were added; call update() with the test batches first.")
        f1, auroc = self._state.metrics()
        return {"pixel_f1": f1, "pixel_auroc": auroc}


class ImageMetrics:
    """Accumulates image scores and labels for ONE task's test set; exact image F1-max and ROC-AUC.

    Scores are kept as float64 (exact for float32 inputs: no ties are created); labels are
    bool or 0/1 numbers.
    """

    def __init__(self) -> None:
        self._state = _ClassSplitScores()

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: scores [B], labels [B] (1 = defective)."""
        if scores.ndim != 1 or tuple(scores.shape) != tuple(labels.shape):
            raise ValueError(
                "ImageMetrics.update: scores and labels must both be [B], got "
                f"{tuple(scores.shape)} and {tuple(labels.shape)}."
            )
        values = _scores_to_numpy(scores, "ImageMetrics.update", np.float64)
        flags = _labels_to_numpy(labels, "ImageMetrics.update", require_bool=False)
        self._state.add(*_split_by_label(values, flags, "ImageMetrics.update"))

    @property
    def num_images(self) -> int:
        return self._state.count

    def compute(self) -> dict[str, float | None]:
        """{"image_f1", "image_auroc"}; a value is None where it is undefined (one class only)."""
        if self.num_images == 0:
            raise ValueError("ImageMetrics.compute: no images were added; call update() with the test batches first.")
        f1, auroc = self._state.metrics()
        return {"image_f1": f1, "image_auroc": auroc}


class ThresholdCounts:
    """Confusion counts of a device's decisions on ONE task's test set, images and pixels, and the metrics at them.

    Precision is 0 where nothing was flagged (sklearn's ``zero_division=0``); a rate is None where its
    denominator class is absent.
    """

    def __init__(self) -> None:
        self.images = np.zeros(4, dtype=np.int64)  # tp, fp, fn, tn
        self.pixels = np.zeros(3, dtype=np.int64)  # tp, fp, fn
        self.has_pixels = False

    @staticmethod
    def _counts(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
        tp = int(np.count_nonzero(predicted & actual))
        fp = int(np.count_nonzero(predicted & ~actual))
        fn = int(np.count_nonzero(~predicted & actual))
        return np.array([tp, fp, fn, predicted.size - tp - fp - fn], dtype=np.int64)

    def update(
        self, defect: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None, true_masks: torch.Tensor
    ) -> None:
        """Add a batch: decisions [B] bool and labels [B]; decided masks [B,H,W] bool (None: no pixel truth)."""
        actual = _labels_to_numpy(labels, "ThresholdCounts.update", require_bool=False)
        self.images += self._counts(defect.numpy().reshape(-1), actual)
        if masks is not None:
            truth = _labels_to_numpy(true_masks, "ThresholdCounts.update", require_bool=True)
            self.pixels += self._counts(masks.numpy().reshape(-1), truth)[:3]
            self.has_pixels = True

    def compute(self) -> dict[str, float | None]:
        """The ``CALIBRATED_METRICS``; empty when nothing was added (a detector without thresholds)."""
        tp, fp, fn, tn = (int(v) for v in self.images)
        if tp + fp + fn + tn == 0:
            return {}
        result = {
            "image_f1_calibrated": 2 * tp / (2 * tp + fp + fn) if tp + fn else None,
            "image_precision": tp / (tp + fp) if tp + fp else 0.0,
            "image_recall": tp / (tp + fn) if tp + fn else None,
            "image_fpr": fp / (fp + tn) if fp + tn else None,
        }
        ptp, pfp, pfn = (int(v) for v in self.pixels)
        result["pixel_f1_calibrated"] = 2 * ptp / (2 * ptp + pfp + pfn) if self.has_pixels and ptp + pfn else None
        return result


# ----------------------------------------------------------------------------------
# Continual summaries over R[t][j] (metric on task j after training task t)
# ----------------------------------------------------------------------------------


def _entry(matrix: list[list[float | None]], t: int, j: int) -> float | None:
    """R[t][j], None when missing (above the diagonal, or a row stored shorter)."""
    row = matrix[t]
    value = row[j] if j < len(row) else None
    if value is not None and not np.isfinite(value):
        raise ValueError(f"metric matrix entry R[{t}][{j}] is {value}; store None for undefined metrics, not NaN/inf.")
    return value


def final_average(matrix: list[list[float | None]]) -> float | None:
    """Mean of the last row, R[T][j] over the tasks where it is defined; None if none is."""
    if not matrix:
        return None
    last = len(matrix) - 1
    values = [v for j in range(len(matrix[last])) if (v := _entry(matrix, last, j)) is not None]
    return float(np.mean(values)) if values else None


def forgetting_per_task(matrix: list[list[float | None]]) -> list[float | None]:
    """F_j = max_{t<T} R[t][j] - R[T][j] for each task j < T (docs/methods.md section 1).

    None for a task whose R[T][j] or every earlier R[t][j] is undefined; empty if fewer than
    two tasks were trained.
    """
    last = len(matrix) - 1
    drops: list[float | None] = []
    for j in range(max(last, 0)):
        final = _entry(matrix, last, j)
        earlier = [v for t in range(last) if (v := _entry(matrix, t, j)) is not None]
        drops.append(max(earlier) - final if final is not None and earlier else None)
    return drops


def forgetting(matrix: list[list[float | None]]) -> float | None:
    """Mean of ``forgetting_per_task`` over the tasks where it is defined; None if none is."""
    drops = [d for d in forgetting_per_task(matrix) if d is not None]
    return float(np.mean(drops)) if drops else None
