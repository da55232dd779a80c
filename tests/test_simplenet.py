"""SimpleNet: the discriminator learns, the noise is seeded, everything deployed is counted."""

from __future__ import annotations

import pytest
import torch

from cvad.efficiency import count_gflops, memory_footprint
from cvad.models import build_model
from cvad.models.components.training import TrainingDivergedError
from test_dinomaly import task_of

SIZE = 64


def build(seed: int = 0, **params):
    return build_model("simplenet", params, backbone="mobilenetv2_100", weights="imagenet", image_size=SIZE, seed=seed)


def trained(nuts, seed: int = 0, **params):
    torch.manual_seed(0)
    model = build(seed=seed, **params)
    model.train()
    model.fit_task(task_of(nuts))
    return model.eval()


def test_training_lowers_the_truncated_l1_loss(nuts):
    model = trained(nuts, epochs=6)
    (history,) = model.loss_history
    assert history[-1] < 0.85 * history[0], history


def test_truncated_l1_is_zero_once_both_sides_clear_the_margin(nuts):
    model = build()
    th = model.params.threshold
    true_scores, fake_scores = torch.tensor([0.6, 2.0]), torch.tensor([-0.7, -3.0])
    loss = (th - true_scores).clamp(min=0).mean() + (th + fake_scores).clamp(min=0).mean()
    assert loss == 0
    assert (th - torch.tensor([0.0])).clamp(min=0) == th  # an undecided normal feature costs the margin


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


def test_noise_is_seeded(nuts):
    a, b, c = (trained(nuts[:4], seed=s, epochs=1) for s in (3, 3, 4))
    images = nuts[4:].float() / 255
    with torch.no_grad():
        assert torch.equal(a(images).image_scores, b(images).image_scores)
        assert not torch.equal(a(images).image_scores, c(images).image_scores)


def test_nan_loss_stops_training(nuts):
    model = build()
    bad = nuts[:4].float() / 255
    bad[:, :, :8, :8] = float("nan")
    task = task_of(nuts[:4])
    task.train = [bad]
    with pytest.raises(TrainingDivergedError):
        model.fit_task(task)
