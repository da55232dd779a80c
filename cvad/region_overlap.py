"""AUPRO: the area under the per-region-overlap (PRO) curve, as the MVTec AD evaluation reports it.

Pixel AUROC is dominated by large defects; PRO gives every defect region the same weight,
so a missed small scratch costs as much as a missed large stain.

- Regions: the 8-connected components of each image's bool mask (a region never spans images).
- At threshold t a pixel is predicted defective when score >= t.
- PRO(t) = mean over all regions r of the test set of |pixels of r with score >= t| / |r|.
- FPR(t) = share of the pixels outside every region (good images included) with score >= t.
- The curve has one point per distinct score (descending thresholds, tied pixels enter
  together) and starts at (0, 0). AUPRO = trapezoidal area under PRO over FPR in
  [0, fpr_limit], the curve interpolated linearly at fpr_limit, divided by fpr_limit.
- None when there is no defect region or no normal pixel.

Exact and vectorised: the pixels that can reach the curve below the limit are sorted by score
once. A normal pixel adds 1/N_normal to FPR and a pixel of region r adds 1/(R·|r|) to PRO, so
both curves are cumulative sums of those weights, read at the last pixel of each group of tied
scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cvad.metrics import _labels_to_numpy, _scores_to_numpy

if TYPE_CHECKING:  # like cvad.metrics: importing this module does not import torch
    from cvad.metrics import ArrayLike

# 8-connectivity within an image, none across the image axis: one ndimage.label call per batch.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def _check_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"AUPRO: fpr_limit must be in (0, 1], got {fpr_limit}.")
    return float(fpr_limit)


def _scores_and_regions(
    anomaly_maps: ArrayLike, masks: ArrayLike, where: str, dtype: np.dtype | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Checked flat scores, flat region id per pixel (int32, -1 for normal pixels), number of regions."""
    from scipy import ndimage

    shape, mask_shape = tuple(np.shape(anomaly_maps)), tuple(np.shape(masks))
    if len(shape) != 3 or shape != mask_shape:
        raise ValueError(
            f"{where}: anomaly maps and masks must both be [N, H, W] of the same shape, got {shape} and {mask_shape}."
        )
    scores = _scores_to_numpy(anomaly_maps, where, dtype)
    region_ids, num_regions = ndimage.label(
        _labels_to_numpy(masks, where, require_bool=True).reshape(shape), structure=_STRUCTURE, output=np.int32
    )
    region_ids -= 1  # ndimage numbers regions from 1 and marks background 0
    return scores, region_ids.reshape(-1), int(num_regions)


def _aupro(scores: np.ndarray, region_ids: np.ndarray, num_regions: int, fpr_limit: float) -> float | None:
    """Exact AUPRO from flat scores and region ids (see the module docstring)."""
    normal = region_ids < 0
    num_normal = int(np.count_nonzero(normal))
    if num_regions == 0 or num_normal == 0:
        return None
    # PRO weight per region, and 0 at index -1 so that normal pixels (id -1) pick up no weight.
    region_weight = np.append(1.0 / np.bincount(region_ids[~normal], minlength=num_regions), 0.0)
    # Only the curve up to its first point past the limit counts: the pixels scoring at least the score of the
    # normal pixel that takes FPR past it (one more for rounding) are its exact prefix; the rest need no sort.
    past_limit = int(np.floor(fpr_limit * num_normal)) + 2
    if past_limit <= num_normal:
        normal_scores = scores[normal]
        cut = np.partition(normal_scores, num_normal - past_limit)[num_normal - past_limit]
        keep = scores >= cut
        scores, region_ids = scores[keep], region_ids[keep]
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    sorted_ids = region_ids[order]
    del order
    last_of_tie = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1)
    fpr = np.cumsum(sorted_ids < 0, dtype=np.int64)[last_of_tie] / num_normal
    pro = np.cumsum(region_weight[sorted_ids])[last_of_tie] / num_regions
    fpr, pro = np.append(0.0, fpr), np.append(0.0, pro)
    # Points up to the limit, then the curve interpolated at the limit (fpr ends at 1 >= limit).
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if inside < fpr.size:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    else:
        pro_at_limit = pro[-1]
    x, y = np.append(fpr[:inside], fpr_limit), np.append(pro[:inside], pro_at_limit)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0 / fpr_limit)


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float | None:
    """AUPRO of float maps [N, H, W] against bool masks [N, H, W]; float64 maps are kept as float64."""
    fpr_limit = _check_limit(fpr_limit)
    return _aupro(*_scores_and_regions(anomaly_maps, masks, "aupro", None), fpr_limit)


class RegionOverlap:
    """Accumulates ONE task's test set batch by batch, then gives its AUPRO.

    Regions are labelled per image when a batch arrives; a pixel then costs 8 bytes (its
    float32 score and int32 region id), e.g. 80 MB for a 10 M-pixel MVTec category.
    """

    def __init__(self, fpr_limit: float = 0.3) -> None:
        self.fpr_limit = _check_limit(fpr_limit)
        self._scores: list[np.ndarray] = []
        self._region_ids: list[np.ndarray] = []
        self._num_regions = 0

    def update(self, anomaly_maps: ArrayLike, masks: ArrayLike) -> None:
        """Add a batch: float maps [B, H, W] and bool masks [B, H, W]."""
        scores, region_ids, num_regions = _scores_and_regions(
            anomaly_maps, masks, "RegionOverlap.update", np.dtype(np.float32)
        )
        region_ids[region_ids >= 0] += self._num_regions  # ids stay unique across batches
        self._scores.append(scores.copy())  # the scores may be a view of the caller's tensor
        self._region_ids.append(region_ids)
        self._num_regions += num_regions

    def compute(self) -> dict[str, float | None]:
        """{"pixel_aupro": AUPRO, or None without defect regions or without normal pixels}."""
        if not self._scores:
            raise ValueError("RegionOverlap.compute: no batch was added; call update() first.")
        # One merged array replaces the batches, so a second compute() does not copy again.
        self._scores[:] = [np.concatenate(self._scores)]
        self._region_ids[:] = [np.concatenate(self._region_ids)]
        return {"pixel_aupro": _aupro(self._scores[0], self._region_ids[0], self._num_regions, self.fpr_limit)}
