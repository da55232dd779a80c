"""PaDiM and its Gaussian statistics: exact merges, scoring maths, the continual variants."""

from __future__ import annotations

import pytest
import torch

from cvad.efficiency import memory_footprint
from cvad.models.components.gaussian import (
    GaussianAccumulator,
    mahalanobis_diagonal,
    mahalanobis_full,
    stats_from_whitening,
    uniform_average,
    whitening_factor,
)
from support import SIZE, build, image_task


def stats_of(x: torch.Tensor, diagonal: bool = False, batch: int = 7):
    acc = GaussianAccumulator(diagonal)
    for chunk in x.split(batch):
        acc.add(chunk)
    return acc.stats()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("diagonal", [False, True])
def test_merging_tasks_equals_one_fit_on_all_samples(diagonal):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(23, 5, 4, generator=g) * 2 + 3  # unequal sizes and shifted means
    b = torch.randn(61, 5, 4, generator=g) * 0.5 - 1
    merged = stats_of(a, diagonal).merge(stats_of(b, diagonal))
    single = stats_of(torch.cat([a, b]), diagonal)
    assert merged.count == single.count == 84
    assert relative_error(merged.mean, single.mean) < 1e-12
    assert relative_error(merged.cov, single.cov) < 1e-12
    # The earlier benchmark's uniform average is measurably wrong in exactly this case.
    averaged = uniform_average(stats_of(a, diagonal), stats_of(b, diagonal), old_tasks=1)
    assert relative_error(averaged.mean, single.mean) > 0.1
    assert relative_error(averaged.cov, single.cov) > 0.1


def test_accumulator_matches_torch_covariance():
    x = torch.randn(50, 3, 6, dtype=torch.float64) + 100  # a large offset must not cancel badly
    stats = stats_of(x)
    for p in range(3):
        expected = torch.cov(x[:, p].T, correction=0)
        assert torch.allclose(stats.cov[p], expected, rtol=1e-9, atol=1e-12)


def test_whitening_round_trip_and_mahalanobis():
    x = torch.randn(40, 2, 5, dtype=torch.float64)
    stats = stats_of(x)
    whitening = whitening_factor(stats, 0.01)
    assert torch.equal(whitening, whitening.tril())
    back = stats_from_whitening(stats.count, stats.mean, whitening, 0.01)
    assert relative_error(back.cov, stats.cov) < 1e-10
    query = torch.randn(3, 2, 5, dtype=torch.float64)
    precision = torch.linalg.inv(stats.unbiased_cov() + 0.01 * torch.eye(5, dtype=torch.float64))
    diff = query - stats.mean
    expected = torch.einsum("bpi,pij,bpj->bp", diff, precision, diff).sqrt()
    assert torch.allclose(mahalanobis_full(query, stats.mean, whitening), expected, rtol=1e-9)
    var = stats_of(x, diagonal=True).unbiased_cov()
    expected_diag = ((query - stats.mean) ** 2 / (var + 0.01)).sum(-1).sqrt()
    assert torch.allclose(mahalanobis_diagonal(query, stats.mean, var, 0.01), expected_diag)


def padim(**params):
    params.setdefault("n_features", 12)
    return build("padim", **params)


def test_unimodal_stream_equals_a_joint_fit_in_stored_float32():
    stream = padim(continual="unimodal")
    stream.fit_task(image_task(0, 6, 20))
    stream.fit_task(image_task(1, 11, 150))
    joint = padim(continual="refit")
    tasks = [image_task(0, 6, 20), image_task(1, 11, 150)]
    acc = GaussianAccumulator(diagonal=False)
    for task in tasks:
        for images in task.train:
            acc.add(joint.embed(images)[0])
    joint.store([acc.stats()])
    (a,), (b,) = stream.stored_modes(), joint.stored_modes()
    assert a.count == b.count == 17
    assert relative_error(a.mean, b.mean) < 1e-6
    assert relative_error(a.cov, b.cov) < 1e-6


def test_refit_forgets_and_multimodal_keeps_every_task():
    refit, multi = padim(continual="refit"), padim(continual="multimodal")
    for model in (refit, multi):
        model.fit_task(image_task(0, 5, 20))
        model.fit_task(image_task(1, 5, 150))
    assert refit.counts.tolist() == [5]
    assert multi.counts.tolist() == [5, 5]
    first_task_look = next(iter(image_task(7, 1, 20).train))  # a fresh image like task 0's
    # Anomalous for the model that forgot task 0, normal for the one that kept it.
    assert refit(first_task_look).image_scores > 1.2 * multi(first_task_look).image_scores
    # On the last task both keep the same Gaussian, and the minimum over modes can only be lower.
    last_task_look = next(iter(image_task(8, 1, 150).train))
    assert multi(last_task_look).image_scores <= refit(last_task_look).image_scores + 1e-4


def test_output_shapes_and_stored_memory_ordering():
    footprints = {}
    for covariance in ("full", "diagonal"):
        for continual in ("unimodal", "multimodal"):
            model = padim(covariance=covariance, continual=continual)
            for t in range(3):
                model.fit_task(image_task(t, 4, 40 * t))
            out = model(torch.rand(2, 3, SIZE, SIZE))
            assert out.image_scores.shape == (2,) and out.anomaly_maps.shape == (2, SIZE, SIZE)
            footprints[covariance, continual] = memory_footprint(model.stored_tensors()).breakdown_mb["gaussians"]
    assert footprints["diagonal", "unimodal"] < footprints["diagonal", "multimodal"]
    assert footprints["full", "unimodal"] < footprints["full", "multimodal"]
    assert footprints["diagonal", "multimodal"] < footprints["full", "unimodal"]


def test_scoring_before_any_task_is_an_error():
    with pytest.raises(RuntimeError, match="not been fitted"):
        padim()(torch.rand(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_memory_accounting_matches_the_stored_tensors(covariance):
    model = padim(covariance=covariance, continual="multimodal")
    for t in range(2):
        model.fit_task(image_task(t, 4, 60 * t))
    k, p, d = 2, (SIZE // 4) ** 2, 12
    shape_floats = p * d * d if covariance == "full" else p * d
    expected = k * 8 + k * p * d * 4 + k * shape_floats * 4 + d * 8  # counts, means, W or var, channel index
    report = memory_footprint(model.stored_tensors())
    assert report.bytes_by_part["gaussians"] == expected
    backbone = sum(t.numel() * t.element_size() for t in [*model.backbone.parameters(), *model.backbone.buffers()])
    assert report.bytes_by_part["backbone"] == backbone
