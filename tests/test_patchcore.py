"""PatchCore family: k-center maths, bank budgets, scoring, routing."""

from __future__ import annotations

import math

import pytest
import torch

from cvad.config import ConfigError, validate_config
from cvad.models.components.coreset import greedy_k_center, nearest
from support import SIZE, build, image_task


def brute_force_k_center(x: torch.Tensor, k: int, start: int) -> list[int]:
    chosen = [start]
    while len(chosen) < k:
        d = torch.cdist(x, x[chosen]).min(dim=1).values
        chosen.append(int(d.argmax()))
    return chosen


def test_k_center_is_farthest_first():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    order = greedy_k_center(x, 25, seed=4, projection_dim=None)
    assert order.tolist() == brute_force_k_center(x, 25, int(order[0]))


def test_k_center_stays_farthest_first_when_its_pool_runs_dry(monkeypatch):
    """A pool far smaller than the data forces every path: refills, partial refreshes, stale bounds."""
    import cvad.models.components.coreset as coreset

    monkeypatch.setattr(coreset, "K_CENTER_POOL", 16)
    monkeypatch.setattr(coreset, "K_CENTER_REFRESH", 4)
    generator = torch.Generator().manual_seed(3)
    centres = 4 * torch.randn(20, 8, generator=generator)  # clustered, as patch features are
    x = centres.repeat_interleave(100, dim=0) + torch.randn(2000, 8, generator=generator)
    order = greedy_k_center(x, 300, seed=5, projection_dim=None)
    assert order.tolist() == brute_force_k_center(x, 300, int(order[0]))
    assert len(set(order.tolist())) == 300


def test_prefix_property():
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(2))
    long = greedy_k_center(x, 300, seed=7)
    for k in (1, 10, 120):
        assert torch.equal(long[:k], greedy_k_center(x, k, seed=7))


def test_nearest_matches_cdist_in_blocks(monkeypatch):
    import cvad.models.components.coreset as coreset

    monkeypatch.setattr(coreset, "DISTANCE_BLOCK", 1000)  # force many blocks
    q, bank = torch.randn(700, 8), torch.randn(90, 8)
    dist, index = nearest(q, bank)
    full = torch.cdist(q, bank)
    assert torch.equal(index, full.argmin(dim=1))
    assert torch.allclose(dist, full.min(dim=1).values, atol=1e-4)


def patchcore(**params):
    return build("patchcore", **params)


def test_cl_bank_budget_after_each_task():
    budget = 301
    model = patchcore(continual="cl", bank_size=budget)
    for t in range(1, 4):
        model.fit_task(image_task(t - 1, 5, 50 * t))  # 5 images x 64 patches > 301
        sizes = [len(b) for b in model.banks]
        assert sum(sizes) <= budget
        assert sizes == [budget // t] * t


def test_cl_plus_plus_truncates_in_greedy_order_and_keeps_prototypes():
    model = patchcore(continual="cl++", bank_size=300)
    model.fit_task(image_task(0, 4, 20))
    first = model.banks[0].clone()
    model.fit_task(image_task(1, 4, 150))
    assert torch.equal(model.banks[0], first[:150])
    assert model.prototypes.shape[0] == 2


def test_image_score_reweighting_follows_the_formula():
    model = patchcore(num_neighbors=3)
    bank = torch.randn(50, 6)
    patches = torch.randn(2, 10, 6)
    patch_scores, image_scores = model.score_bank(patches, bank)
    for i in range(2):
        dists = torch.cdist(patches[i], bank)
        s = dists.min(dim=1).values
        star = int(s.argmax())
        m_hat = int(dists[star].argmin())
        neighbours = torch.cdist(bank[m_hat : m_hat + 1], bank)[0].topk(3, largest=False).indices
        d = torch.cdist(patches[i, star : star + 1], bank[neighbours])[0]
        expected = (1 - math.exp(d[0]) / torch.exp(d).sum()) * s[star]
        assert torch.allclose(patch_scores[i], s, atol=1e-5)
        assert image_scores[i] == pytest.approx(float(expected), rel=1e-4)


def test_cl_routes_by_the_lowest_image_score():
    model = patchcore(continual="cl", bank_size=400)
    for t in range(3):
        model.fit_task(image_task(t, 4, 80 * t))
    queries = torch.cat([next(iter(image_task(20 + t, 1, 80 * t).train)) for t in range(3)])
    out = model(queries)
    per_bank = torch.stack([model.score_bank(model.features(queries)[0], bank)[1] for bank in model.banks])
    assert torch.equal(out.routed_tasks, per_bank.argmin(dim=0))
    assert torch.equal(out.image_scores, per_bank.min(dim=0).values)
    assert out.routed_tasks.tolist() == [0, 1, 2]
    assert out.anomaly_maps.shape == (3, SIZE, SIZE)


def test_bank_ratio_only_for_refit():
    with pytest.raises(ConfigError, match="bank_ratio applies to continual 'refit' only"):
        validate_config({"model": {"name": "patchcore", "params": {"continual": "cl", "bank_ratio": 0.1}}})
    model = patchcore(bank_ratio=0.25, bank_size=None)
    model.fit_task(image_task(0, 4, 20))
    assert len(model.banks[0]) == int(0.25 * 4 * (SIZE // 8) ** 2)


def test_memory_accounting_matches_banks_and_prototypes():
    from cvad.efficiency import memory_footprint

    model = patchcore(continual="cl++", bank_size=300)
    for t in range(3):
        model.fit_task(image_task(t, 5, 60 * t))
    report = memory_footprint(model.stored_tensors())
    assert report.bytes_by_part["memory_bank"] == 3 * 100 * 128 * 4  # floor(300/3) vectors of 32+96 channels
    assert report.bytes_by_part["prototypes"] == 3 * 96 * (SIZE // 16) ** 2 * 4
