"""STFPM and PaSTe: the student learns the teacher, PaSTe shares and saves, training is safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import support
from cvad.config import ConfigError, validate_config
from cvad.efficiency import count_gflops, memory_footprint
from support import SIZE, task_of


def build(name: str = "stfpm", seed: int = 0, **params):
    return support.build(name, seed=seed, **params)


@pytest.mark.parametrize("name", ["stfpm", "paste"])
def test_training_lowers_the_loss_and_maps_have_the_input_size(name, nuts):
    model = build(name, epochs=4)
    model.fit_task(task_of(nuts))
    (history,) = model.loss_history
    assert history[-1] < 0.7 * history[0], history
    assert not model.training
    with torch.no_grad():
        out = model(nuts[:3].float() / 255)
    assert out.anomaly_maps.shape == (3, SIZE, SIZE)
    assert torch.equal(out.image_scores, out.anomaly_maps.flatten(1).amax(dim=1))


@pytest.mark.slow
def test_a_foreign_patch_scores_higher_after_training(nuts):
    model = build(epochs=25)
    model.fit_task(task_of(nuts))
    images = nuts[:4].float() / 255
    damaged = images.clone()
    damaged[:, :, 20:40, 20:40] = torch.linspace(0, 1, 20).view(1, 1, 1, 20)  # a gradient bar, nothing like a nut
    with torch.no_grad():
        normal, anomalous = model(images), model(damaged)
    # 2-3x apart here; float sums differ with the thread count, so the test asks for a clear margin.
    assert (anomalous.image_scores > 1.5 * normal.image_scores).all(), (normal.image_scores, anomalous.image_scores)


def test_paste_shares_the_first_layers_and_costs_less_than_stfpm():
    stfpm, paste = build("stfpm"), build("paste")
    assert paste.split > 0 and stfpm.split == 0
    assert len(paste.levels) == len(stfpm.levels) - 1  # the shared first level drops out of the loss
    mb = [memory_footprint(m.stored_tensors()).total_mb for m in (stfpm, paste)]
    gflops = [count_gflops(m, SIZE).gflops for m in (stfpm, paste)]
    assert 0 < mb[1] < mb[0] and 0 < gflops[1] < gflops[0]
    for model in (stfpm, paste):
        assert count_gflops(model, SIZE).uncounted_ops == []
    # The shared layers are the teacher's own modules, stored once, never copied into the student.
    shared = {id(p) for layer in paste.teacher_layers[: paste.split] for p in layer.parameters()}
    assert shared and not shared & {id(p) for p in paste.student.parameters()}


def test_student_starts_random_and_the_seed_decides(nuts):
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    teacher = dict(a.backbone.named_parameters())
    for (_name, p), q, _r in zip(a.student.named_parameters(), b.student.parameters(), c.student.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, r) for p, r in zip(a.student.parameters(), c.student.parameters()))
    first_conv = next(p for n, p in teacher.items() if p.ndim == 4)
    assert not torch.allclose(next(a.student.parameters()), first_conv)


def test_sum_combination_and_blur(nuts):
    model = build(combine="sum", blur_sigma=2.0).eval()
    with torch.no_grad():
        teacher, student = model.features(nuts[:2].float() / 255)
        distances = model.level_distances(teacher, student)
        expected = sum(F.interpolate(d.unsqueeze(1), size=(SIZE, SIZE), mode="bilinear").squeeze(1) for d in distances)
        assert torch.allclose(model(nuts[:2].float() / 255).anomaly_maps, model.blur(expected), atol=1e-5)
    assert "map_head" in model.stored_tensors()


def test_bad_settings_are_refused_at_validation():
    with pytest.raises(ConfigError, match="shares every feature level"):
        validate_config({"model": {"name": "paste", "params": {"shared": 16}}})
    with pytest.raises(ConfigError, match="not a convolutional network"):
        validate_config(
            {"model": {"name": "stfpm"}, "backbone": {"name": "deit_tiny_patch16_224", "weights": "random"}}
        )
