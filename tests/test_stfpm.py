"""STFPM and PaSTe: the student learns the teacher, PaSTe shares and saves, training is safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvad.efficiency import count_gflops, memory_footprint
from cvad.models import build_model
from cvad.models.components.training import TrainingDivergedError
from test_dinomaly import task_of

SIZE = 64


def build(name: str = "stfpm", seed: int = 0, **params):
    return build_model(name, params, backbone="mobilenetv2_100", weights="imagenet", image_size=SIZE, seed=seed)


@pytest.mark.parametrize("name", ["stfpm", "paste"])
def test_training_lowers_the_loss_and_maps_have_the_input_size(name, nuts):
    model = build(name, epochs=4)
    model.train()
    model.fit_task(task_of(nuts))
    (history,) = model.loss_history
    assert history[-1] < 0.7 * history[0], history
    model.eval()
    with torch.no_grad():
        out = model(nuts[:3].float() / 255)
    assert out.anomaly_maps.shape == (3, SIZE, SIZE)
    assert torch.equal(out.image_scores, out.anomaly_maps.flatten(1).amax(dim=1))


def test_a_foreign_patch_scores_higher_after_training(nuts):
    model = build(epochs=25)
    model.train()
    model.fit_task(task_of(nuts))
    model.eval()
    images = nuts[:4].float() / 255
    damaged = images.clone()
    damaged[:, :, 20:40, 20:40] = torch.linspace(0, 1, 20).view(1, 1, 1, 20)  # a gradient bar, nothing like a nut
    with torch.no_grad():
        normal, anomalous = model(images), model(damaged)
    assert (anomalous.image_scores > normal.image_scores).all()


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
    for (name, p), q, r in zip(a.student.named_parameters(), b.student.parameters(), c.student.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, r) for p, r in zip(a.student.parameters(), c.student.parameters()))
    first_conv = next(p for n, p in teacher.items() if p.ndim == 4)
    assert not torch.allclose(next(a.student.parameters()), first_conv)


def test_same_seed_same_scores(nuts):
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build(epochs=1)
        model.train()
        model.fit_task(task_of(nuts[:4]))
        model.eval()
        with torch.no_grad():
            outputs.append(model(nuts[4:].float() / 255).image_scores)
    assert torch.equal(*outputs)


def test_sum_combination_and_blur(nuts):
    model = build(combine="sum", blur_sigma=2.0).eval()
    with torch.no_grad():
        teacher, student = model.features(nuts[:2].float() / 255)
        distances = model.level_distances(teacher, student)
        expected = sum(F.interpolate(d.unsqueeze(1), size=(SIZE, SIZE), mode="bilinear").squeeze(1) for d in distances)
        assert torch.allclose(model(nuts[:2].float() / 255).anomaly_maps, model.blur(expected), atol=1e-5)
    assert "map_head" in model.stored_tensors()


def test_nan_loss_stops_training(nuts):
    model = build()
    bad = nuts[:4].float() / 255
    bad[0, 0, 0, 0] = float("nan")
    task = task_of(nuts[:4])
    task.train = [bad]
    with pytest.raises(TrainingDivergedError, match="lower model.params.lr"):
        model.fit_task(task)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="shares every feature level"):
        build("paste", shared=16)
    with pytest.raises(ValueError, match="not a convolutional network"):
        build_model("stfpm", {}, backbone="deit_tiny_patch16_224", weights="random", image_size=SIZE, seed=0)
