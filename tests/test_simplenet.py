"""SimpleNet: the discriminator learns, the noise is seeded, everything deployed is counted."""

from __future__ import annotations

import pytest
import torch

import support
from cvad.efficiency import count_gflops, memory_footprint
from support import SIZE, task_of


def build(seed: int = 0, **params):
    return support.build("simplenet", seed=seed, **params)


def trained(nuts, seed: int = 0, **params):
    torch.manual_seed(0)
    model = build(seed=seed, **params)
    model.fit_task(task_of(nuts))
    return model


def test_training_lowers_the_truncated_l1_loss(nuts):
    model = trained(nuts, epochs=6)
    (history,) = model.loss_history
    assert history[-1] < 0.85 * history[0], history


def test_truncated_l1_is_zero_once_both_sides_clear_the_margin():
    model = build(threshold=0.5)
    clear = model.truncated_l1(torch.tensor([0.6, 2.0]), torch.tensor([-0.7, -3.0]))
    assert clear == 0
    # An undecided normal feature costs the margin; a fake scored as normal costs margin + score.
    assert model.truncated_l1(torch.tensor([0.0]), torch.tensor([-1.0])) == pytest.approx(0.5)
    assert model.truncated_l1(torch.tensor([1.0]), torch.tensor([0.25])) == pytest.approx(0.75)
    assert build(threshold=1.0).truncated_l1(torch.tensor([0.6]), torch.tensor([-3.0])) == pytest.approx(0.4)


def test_maps_scores_memory_and_gflops(nuts):
    model = trained(nuts, epochs=1)
    with torch.no_grad():
        out = model(nuts[:2].float() / 255)
    assert out.anomaly_maps.shape == (2, SIZE, SIZE)
    assert torch.equal(out.image_scores, out.anomaly_maps.flatten(1).amax(dim=1))
    memory = memory_footprint(model.stored_tensors())
    assert set(memory.breakdown_mb) == {"backbone", "adaptor", "discriminator", "map_head"}
    dim = sum(model.backbone.channels)
    assert memory.bytes_by_part["adaptor"] == 4 * (dim * dim + dim)
    flops = count_gflops(model, SIZE)
    assert flops.gflops > 0 and flops.uncounted_ops == []
