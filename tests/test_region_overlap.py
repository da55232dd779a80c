"""cvad.region_overlap against a plain loop-by-threshold reference, known values, accumulation, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from cvad.region_overlap import RegionOverlap, aupro


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float | None:
    """The definition, one threshold at a time: per-region overlaps and FPR, then the clipped trapezoid."""
    regions, normal_scores = [], []
    for image, mask in zip(maps, masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [image[labels == k] for k in range(1, count + 1)]
        normal_scores.append(image[~mask])
    normal = np.concatenate(normal_scores)
    if not regions or normal.size == 0:
        return None
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= threshold))
        pros.append(np.mean([np.mean(region >= threshold) for region in regions]))
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_case(seed: int, decimals: int | None, num_images: int = 6, height: int = 20, width: int = 24):
    """Maps shifted up on defects; masks of blobs of several sizes and diagonal chains; some good images."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_images, height, width), dtype=bool)
    for image in range(num_images):
        if image % 3 == 2:
            continue  # a good image
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, height - 6), rng.integers(0, width - 6)
            masks[image, top : top + rng.integers(1, 7), left : left + rng.integers(1, 7)] = True
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        masks[image, top + np.arange(4), left + np.arange(4)] = True  # one region only if 8-connected
    maps = rng.standard_normal(masks.shape) + 1.2 * masks
    return (np.round(maps, decimals) if decimals is not None else maps), masks


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(seed, decimals, fpr_limit):
    maps, masks = random_case(seed, decimals)
    expected = reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-12)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_regions_are_8_connected():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True  # (1, 2) touches (0, 1) diagonally only
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 2] = 1.0
    # One region of 3 pixels: PRO 1/3 at FPR 0, then (1, 1). Two 4-connected regions would give PRO 1/2.
    assert aupro(maps, masks) == pytest.approx((0.3 / 3 + (2 / 3) * 0.3**2 / 2) / 0.3, abs=1e-12)


def test_known_values():
    _, masks = random_case(3, None)
    assert aupro(masks.astype(np.float64), masks) == pytest.approx(1.0, abs=1e-12)  # (0, 0) -> (0, 1) -> (1, 1)
    assert aupro((~masks).astype(np.float64), masks) == pytest.approx(0.0, abs=1e-12)  # (0, 0) -> (1, 0) -> (1, 1)
    # All pixels tied: one segment (0, 0) -> (1, 1), PRO = FPR, area up to 0.3 is 0.3²/2 = 0.045, AUPRO 0.15.
    assert aupro(np.full(masks.shape, 0.7), masks) == pytest.approx(0.15, abs=1e-12)
    assert aupro(np.full(masks.shape, 0.7), masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_every_region_weighs_the_same():
    masks = np.zeros((1, 32, 32), dtype=bool)
    masks[0, 0, 0] = True  # tiny region, found at FPR 0
    masks[0, 10:20, 10:20] = True  # big region, found only at the last threshold
    maps = np.random.default_rng(0).uniform(0.1, 0.9, masks.shape)  # normal pixels in between
    maps[0, 0, 0], maps[0, 10:20, 10:20] = 1.0, 0.0
    # PRO stays 0.5 while FPR goes from 0 to 1, whereas pixel recall would stay 1/101.
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.01) == pytest.approx(0.5, abs=1e-12)


def test_accumulating_equals_one_shot():
    maps, masks = random_case(4, 2, num_images=9)
    maps, masks = torch.from_numpy(maps).float(), torch.from_numpy(masks)
    metric = RegionOverlap()
    for start, stop in [(0, 1), (1, 5), (5, 9)]:
        metric.update(maps[start:stop], masks[start:stop])
    expected = aupro(maps, masks)
    assert metric.compute() == {"pixel_aupro": pytest.approx(expected, abs=1e-12)}
    assert metric.compute() == {"pixel_aupro": pytest.approx(expected, abs=1e-12)}  # computing twice is harmless
    metric.update(maps[:2], masks[:2])  # and so is updating after a compute
    twice_seen = aupro(torch.cat([maps, maps[:2]]), torch.cat([masks, masks[:2]]))
    assert metric.compute()["pixel_aupro"] == pytest.approx(twice_seen, abs=1e-12)

    limited = RegionOverlap(fpr_limit=0.1)
    limited.update(maps, masks)
    assert limited.compute()["pixel_aupro"] == pytest.approx(aupro(maps, masks, fpr_limit=0.1), abs=1e-12)


def test_none_without_regions_or_normal_pixels():
    maps = torch.rand(2, 8, 8)
    assert aupro(maps, torch.zeros(2, 8, 8, dtype=torch.bool)) is None
    assert aupro(maps, torch.ones(2, 8, 8, dtype=torch.bool)) is None
    metric = RegionOverlap()
    metric.update(maps, torch.zeros(2, 8, 8, dtype=torch.bool))
    assert metric.compute() == {"pixel_aupro": None}


def test_bad_input_raises():
    maps, masks = torch.rand(2, 8, 8), torch.rand(2, 8, 8) > 0.5
    metric = RegionOverlap()
    with pytest.raises(ValueError, match="no batch was added"):
        metric.compute()
    with pytest.raises(ValueError, match="same shape"):
        metric.update(maps, masks[:, :, :7])
    with pytest.raises(ValueError, match="same shape"):
        aupro(maps[0], masks[0])
    with pytest.raises(ValueError, match="must be bool"):
        metric.update(maps, masks.to(torch.uint8))
    for bad in (float("nan"), float("inf")):
        broken = maps.clone()
        broken[1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            metric.update(broken, masks)
        with pytest.raises(ValueError, match="NaN or infinite"):
            aupro(broken, masks)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5, float("nan")])
def test_fpr_limit_outside_unit_interval_raises(fpr_limit):
    maps, masks = torch.rand(1, 4, 4), torch.rand(1, 4, 4) > 0.5
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit)
    with pytest.raises(ValueError, match="fpr_limit"):
        RegionOverlap(fpr_limit)
