"""CFA: hypersphere training, the memory rebuilt from what each task provides, bounded and counted."""

from __future__ import annotations

import pytest
import torch

import support
from cvad.efficiency import count_gflops, memory_footprint
from support import SIZE, task_of


def build(seed: int = 0, **params):
    return support.build("cfa", seed=seed, **params)


@pytest.fixture(scope="module")
def trained(nuts):
    model = build(epochs=6)
    model.fit_task(task_of(nuts))
    return model


def test_training_lowers_the_loss_and_flags_a_foreign_patch(trained, nuts):
    (history,) = trained.loss_history
    assert history[-1] < 0.8 * history[0], history
    images = nuts[:4].float() / 255
    damaged = images.clone()
    damaged[:, :, 20:40, 20:40] = torch.linspace(0, 1, 20).view(1, 1, 1, 20)
    with torch.no_grad():
        normal, anomalous = trained(images), trained(damaged)
    assert anomalous.anomaly_maps.shape == (4, SIZE, SIZE)
    assert (anomalous.image_scores > normal.image_scores).all()


def test_memory_is_rebuilt_from_each_task(nuts):
    model = build(epochs=1)
    model.fit_task(task_of(nuts[:4]))
    first = model.memory.clone()
    grid = (SIZE // 4) ** 2  # stride-4 grid positions
    assert first.shape == (grid, sum(model.backbone.channels))
    with torch.no_grad():
        features, _ = model.describe(model.backbone(nuts[4:].float() / 255))
    model.fit_task(task_of(nuts[4:]))  # the memory is built before the descriptor trains on it
    assert torch.allclose(model.memory, features.mean(dim=0), atol=1e-5)  # the per-position mean of that task
    assert not torch.allclose(model.memory, first)


def test_compression_bounds_the_memory_and_it_is_counted(nuts):
    model = build(epochs=1, compression=4)
    model.fit_task(task_of(nuts[:4]))
    assert len(model.memory) == (SIZE // 4) ** 2 // 4
    memory = memory_footprint(model.stored_tensors())
    assert memory.bytes_by_part["memory_bank"] == model.memory.numel() * 4
    flops = count_gflops(model, SIZE)
    assert flops.gflops > 0 and flops.uncounted_ops == []


def test_softmin_score_of_a_memory_entry_is_zero(trained):
    features = trained.memory[:5].unsqueeze(0)
    nearest = trained.nearest_distances(features, trained.params.k)
    assert torch.allclose(nearest[..., 0], torch.zeros(5), atol=1e-3)


def test_image_score_is_the_maximum_away_from_the_border(trained, nuts):
    """Zero padding makes the outermost features unlike any memory entry: the image score leaves them out."""
    with torch.no_grad():
        output = trained(nuts[:4].float() / 255)
    m = trained.params.score_margin
    assert m > 0
    inner = output.anomaly_maps[:, m:-m, m:-m].flatten(1).amax(dim=1)
    assert torch.equal(output.image_scores, inner)
