"""Every registered method against the one contract of ``cvad.models.base.AnomalyModel``.

Each case fits two built-in tasks (hex nuts, then brick) on small images with a short budget, then
checks what the protocol, the accounting and the exporters rely on: output shapes, scores that
do not depend on batch-mates, a forward that changes nothing, seeds, divergence, stored state
held as registered tensors, GFLOPs that count every op, a saved detector that loads back the
same, and a whole path that exports to ONNX.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from cvad.backbones.weights import RandomWeightsWarning
from cvad.config import ConfigError, validate_config
from cvad.detector import Detector, detector_bytes, load_detector
from cvad.efficiency import count_gflops, memory_footprint
from cvad.export import export_detector
from cvad.models import METHODS, AnomalyModel
from cvad.models.components.training import TrainingDivergedError, TrainingParams
from support import CNN, SIZE, VIT, as_float, build, builtin_images, task_of

# (case id, method, backbone, params): every registered method, plus the variants that store per-task state.
CASES = [
    ("padim", "padim", CNN, {"n_features": 24}),
    ("padim-multimodal", "padim", CNN, {"n_features": 24, "continual": "multimodal", "covariance": "diagonal"}),
    ("patchcore", "patchcore", CNN, {"bank_size": 200}),
    ("patchcore-cl", "patchcore", CNN, {"continual": "cl", "bank_size": 200}),
    ("patchcore-cl++", "patchcore", CNN, {"continual": "cl++", "bank_size": 200}),
    ("stfpm", "stfpm", CNN, {"steps": 3}),
    ("paste", "paste", CNN, {"steps": 3}),
    ("simplenet", "simplenet", CNN, {"steps": 3}),
    ("cfa", "cfa", CNN, {"steps": 3}),
    ("dinomaly", "dinomaly", VIT, {"steps": 3, "decoder_blocks": 2, "decoder_groups": [[1], [0]]}),
]
IDS = [case[0] for case in CASES]
TRAINED = [case for case in CASES if issubclass(METHODS.get(case[1]).Params, TrainingParams)]


def test_every_registered_method_has_a_case():
    assert {case[1] for case in CASES} == set(METHODS.names())


def fitted(method: str, backbone: str, params: dict, seed: int = 0) -> AnomalyModel:
    """The model after two tasks, as a run builds and trains it (global RNG seeded as a trial seeds it)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build(
            method, backbone, seed=seed, weights="random" if backbone == VIT else "imagenet", tasks=2, **params
        )
    for index, category in enumerate(("hex_nut", "brick")):
        model.fit_task(task_of(builtin_images(4, category=category), index=index, name=category))
    return model.eval()


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request) -> tuple[tuple, AnomalyModel]:
    return request.param, fitted(*request.param[1:])


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    """Three unseen images: two nuts and a brick."""
    return as_float(torch.cat([builtin_images(6)[4:], builtin_images(5, category="brick")[4:]]))


def test_outputs_have_the_contract_shapes(case, queries):
    _, model = case
    with torch.no_grad():
        out = model(queries)
    assert out.image_scores.shape == (3,) and out.anomaly_maps.shape == (3, SIZE, SIZE)
    assert torch.isfinite(out.image_scores).all() and torch.isfinite(out.anomaly_maps).all()
    if out.routed_tasks is not None:  # the CL variants say which task's state scored each image
        assert out.routed_tasks.shape == (3,) and out.routed_tasks.dtype == torch.int64
        assert set(out.routed_tasks.tolist()) <= {0, 1}


def test_an_image_scores_the_same_whatever_its_batch(case, queries):
    _, model = case
    with torch.no_grad():
        together = model(queries)
        alone = [model(image.unsqueeze(0)) for image in queries]
    assert torch.allclose(together.image_scores, torch.cat([a.image_scores for a in alone]), rtol=1e-4, atol=1e-5)
    assert torch.allclose(together.anomaly_maps, torch.cat([a.anomaly_maps for a in alone]), rtol=1e-4, atol=1e-5)


def test_forward_changes_no_stored_state(case, queries):
    _, model = case
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        model(queries)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_everything_stored_is_a_registered_tensor(case):
    """``.to()`` and ``state_dict()`` then carry the whole fitted state: banks, Gaussians, prototypes, weights."""
    (_, method, *_), model = case
    registered = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    parts = model.stored_tensors()
    assert parts and all(parts.values())
    for part, tensors in parts.items():
        for tensor in tensors:
            assert tensor.untyped_storage().data_ptr() in registered, (
                f"{method}: a tensor of part {part!r} is not registered"
            )
    report = memory_footprint(parts)
    assert all(report.bytes_by_part[part] > 0 for part in parts)


def test_gflops_count_every_op(case):
    _, model = case
    report = count_gflops(model, SIZE)
    assert report.gflops > 0 and report.uncounted_ops == []


@pytest.mark.parametrize("params", [case[1:] for case in CASES], ids=IDS)
def test_same_seed_same_outputs(params, queries):
    a, b = fitted(*params), fitted(*params)
    with torch.no_grad():
        out_a, out_b = a(queries), b(queries)
    assert torch.equal(out_a.image_scores, out_b.image_scores) and torch.equal(out_a.anomaly_maps, out_b.anomaly_maps)


@pytest.mark.parametrize("params", [case[1:] for case in TRAINED], ids=[case[0] for case in TRAINED])
def test_the_seed_decides_what_is_learned(params, queries):
    models = [fitted(*params, seed=seed) for seed in (0, 1)]
    with torch.no_grad():
        assert not torch.equal(models[0](queries).image_scores, models[1](queries).image_scores)


@pytest.mark.parametrize("params", [case[1:] for case in TRAINED], ids=[case[0] for case in TRAINED])
def test_a_non_finite_loss_stops_training(params):
    method, backbone, extra = params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build(method, backbone, weights="random" if backbone == VIT else "imagenet", **extra)
    images = builtin_images(4)
    task = task_of(images)
    broken = as_float(images)
    broken[:, :, :8, :8] = float("nan")
    task.train = [as_float(images), broken]
    with pytest.raises(TrainingDivergedError, match=f"{method}: the training loss became nan"):
        model.fit_task(task)
    assert not model.training


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": {"name": "stfpm"}, "backbone": {"name": VIT}}, "not a convolutional network"),
        ({"model": {"name": "paste", "params": {"shared": 16}}}, "shares every feature level"),
        ({"model": {"name": "paste", "params": {"shared": "no.such.block"}}}, "model.params.shared"),
        ({"model": {"name": "dinomaly"}}, "needs a ViT encoder"),
        (
            {"model": {"name": "dinomaly"}, "backbone": {"name": VIT}, "dataset": {"image_size": 200}},
            "not a multiple of",
        ),
        ({"model": {"name": "padim", "params": {"layers": [4, 64]}}}, "model.params.layers"),
        (
            {
                "model": {"name": "patchcore", "params": {"continual": "cl", "bank_size": 3}},
                "dataset": {"tasks": ["a", "b", "c", "d"]},
            },
            "bank_size 3 cannot hold a bank for each of the stream's 4 tasks",
        ),
    ],
)
def test_impossible_setups_are_refused_at_validation(config, message):
    """Before any data is read or weights loaded: validation builds nothing but a weightless description."""
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


@pytest.mark.parametrize("method", METHODS.names())
def test_defaults_pass_the_setup_check(method):
    backbone = VIT if method == "dinomaly" else CNN
    validate_config({"model": {"name": method}, "backbone": {"name": backbone}})


def test_a_saved_detector_loads_back_to_the_same_outputs(case, queries, tmp_path):
    """``cvad.detector``: what fitting changed is stored, the frozen extractors are rebuilt from their weights."""
    (_, method, backbone, params), model = case
    config = run_config(method, backbone, params)
    path = tmp_path / "detector.pt"
    path.write_bytes(detector_bytes(model, config, ["hex_nut", "brick"]))
    loaded = load_detector(path).model
    assert not any(key.startswith("backbone.") for key in model.fitted_state())  # the frozen network stays out
    with torch.no_grad():
        before, after = model(queries), loaded(queries)
    assert torch.equal(before.image_scores, after.image_scores)
    assert torch.equal(before.anomaly_maps, after.anomaly_maps)


def test_the_whole_path_exports_to_onnx_and_matches(case, queries, tmp_path):
    """``cvad export``: backbone, heads, scoring and routing in one ONNX graph, checked in ONNX Runtime."""
    (_, method, backbone, params), model = case
    detector = Detector(model, run_config(method, backbone, params), ["hex_nut", "brick"])
    images = (queries * 255).round().to(torch.uint8)
    report = export_detector(detector, "onnx", tmp_path / "detector.onnx", images)
    assert report.max_abs_diff_scores <= report.tolerance_scores and report.max_abs_diff_maps <= report.tolerance_maps
    assert report.weights_bytes > 0 and report.file_bytes >= report.weights_bytes


def run_config(method: str, backbone: str, params: dict):
    """The run config ``fitted`` builds its model from (two built-in tasks of 4 training images, seed 0); its data
    is never generated, so it names no cache folder."""
    from support import tiny_config

    weights = "random" if backbone == VIT else "imagenet"
    return validate_config(
        tiny_config(
            None,
            dataset={"builtin": {"categories": ["hex_nut", "brick"], "train_per_category": 4}},
            model={"name": method, "params": params},
            backbone={"name": backbone, "weights": weights},
        )
    )
