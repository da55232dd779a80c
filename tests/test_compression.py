"""Compression (``compression`` config section): stored forms, what each method takes, and that every figure is the
compressed detector's.

Codecs are checked against independent computations (a per-column reconstruction bound, a brute-force
nearest centroid, the asymmetric PQ distance from a lookup table); models are checked to compute with
exactly what they store (a float32 model given the decoded state scores the same) and to count the stored
bytes; configs that a method cannot keep are refused before anything runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cvad.config import ConfigError, validate_config
from cvad.continual.replay import ReplayBuffer
from cvad.cost import price_config
from cvad.detector import DETECTOR_FILE, load_detector
from cvad.efficiency import memory_footprint
from cvad.export import export_detector, verification_images
from cvad.models.components.stored import Int8, ProductQuantizer, codec_for
from cvad.trial import run_trial
from support import as_float, build, builtin_images, image_task, tiny_config

PATCHCORE_CL = {"continual": "cl++", "bank_size": 60}


def features(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows whose columns have very different ranges and centres, as backbone descriptors do."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator) * torch.linspace(0.1, 5, dim) + torch.linspace(-3, 3, dim)


# -- codecs ---------------------------------------------------------------------------------------


def test_int8_columns_reconstruct_within_half_a_step_and_store_a_byte_per_value():
    x = features(50, 12)
    codec = Int8("column")
    parts = codec.encode(x)
    assert parts[""].dtype == torch.uint8 and parts[""].shape == (50, 12)
    step = (x.amax(0) - x.amin(0)) / 255
    assert torch.all((codec.decode(parts) - x).abs() <= step / 2 + 1e-5)
    assert memory_footprint({"bank": list(parts.values())}).total_bytes == 50 * 12 + 2 * 12 * 4


def test_int8_rows_have_a_scale_per_row():
    x = features(6, 40).T.contiguous()  # 40 rows of very different ranges
    codec = Int8("row")
    parts = codec.encode(x)
    assert parts["scale"].shape == (40,)
    step = (x.amax(1) - x.amin(1)) / 255
    assert torch.all((codec.decode(parts) - x).abs() <= (step / 2 + 1e-5).unsqueeze(1))


def test_rows_taken_from_stored_codes_decode_as_the_same_rows():
    x = features(30, 8)
    for codec in (codec_for("fp16"), Int8("column"), ProductQuantizer(4, 8)):
        parts = codec.encode(x, seed=1)
        rows = torch.tensor([3, 0, 17])
        assert torch.equal(codec.decode(codec.take(parts, rows)), codec.decode(parts)[rows])
        assert torch.equal(codec.decode(codec.take(parts, slice(0, 5))), codec.decode(parts)[:5])


def test_pq_codes_are_each_sub_vectors_nearest_centroid_and_distances_are_the_asymmetric_ones():
    x = features(200, 16)
    codec = ProductQuantizer(4, 16)
    parts = codec.encode(x, seed=0)
    codes, codebooks = parts[""], parts["codebooks"].float()
    assert codes.dtype == torch.uint8 and codes.shape == (200, 4) and parts["codebooks"].dtype == torch.float16
    for row in range(0, 200, 37):  # brute force, one sub-vector at a time
        for m in range(4):
            sub = x[row, 4 * m : 4 * m + 4]
            assert int(codes[row, m]) == int(((codebooks[m] - sub) ** 2).sum(1).argmin())
    query = features(1, 16, seed=5)[0]
    table = torch.stack([((codebooks[m] - query[4 * m : 4 * m + 4]) ** 2).sum(1) for m in range(4)])  # [M, K]
    adc = table.gather(1, codes.long().T).sum(0)  # the PQ distance of every row from the lookup table
    decoded = codec.decode(parts)
    assert torch.allclose(((decoded - query) ** 2).sum(1), adc, rtol=1e-5, atol=1e-5)


def test_pq_is_seeded_and_more_centroids_reconstruct_better():
    x = features(300, 16)
    a, b, c = (ProductQuantizer(4, 16).encode(x, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["codebooks"], c["codebooks"])
    errors = [((ProductQuantizer(4, k).decode(ProductQuantizer(4, k).encode(x)) - x) ** 2).mean() for k in (2, 8, 64)]
    assert errors[0] > errors[1] > errors[2]


def test_pq_refuses_features_that_do_not_split():
    with pytest.raises(ValueError, match="10 features do not split into 4"):
        ProductQuantizer(4, 8).encode(torch.zeros(20, 10))


# -- models ---------------------------------------------------------------------------------------


def fitted(name: str, compression: dict | None = None, tasks: int = 2, **params):
    torch.manual_seed(0)
    model = build(name, storage=compression, **params).eval()
    for index in range(tasks):
        model.fit_task(image_task(index, 4, 60 + 80 * index))
    return model


@pytest.mark.parametrize("memory", ["fp16", "int8", "pq"])
def test_patchcore_computes_with_exactly_the_banks_and_prototypes_it_stores(memory):
    compression = {"memory": memory} | ({"pq_subvectors": 8, "pq_centroids": 16} if memory == "pq" else {})
    compressed = fitted("patchcore", compression, **PATCHCORE_CL)
    plain = build("patchcore", **PATCHCORE_CL).eval()  # fp32, given the decoded state
    plain.banks.assign_stored([{"": bank.clone()} for bank in compressed.banks])
    plain.stored_prototypes.put({"": compressed.stored_prototypes.decoded()})
    images = as_float(builtin_images(3))
    with torch.no_grad():
        got, expected = compressed(images), plain(images)
    assert torch.allclose(got.image_scores, expected.image_scores, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.anomaly_maps, expected.anomaly_maps, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.routed_tasks, expected.routed_tasks)


def test_patchcore_bank_bytes_are_the_stored_codes_scales_and_codebooks():
    banks = {}
    for memory, extra in (("fp32", {}), ("int8", {}), ("pq", {"pq_subvectors": 8, "pq_centroids": 16})):
        model = fitted("patchcore", {"memory": memory, **extra}, **PATCHCORE_CL)
        rows = [model.banks.rows(i) for i in range(len(model.banks))]
        dim = model.banks[0].shape[1]
        banks[memory] = (memory_footprint(model.stored_tensors()).bytes_by_part["memory_bank"], rows, dim)
    _, rows, dim = banks["fp32"]
    assert banks["fp32"][0] == sum(rows) * dim * 4
    assert banks["int8"][0] == sum(rows) * dim + len(rows) * 2 * dim * 4  # codes + a scale and offset per feature
    assert banks["pq"][0] == sum(rows) * 8 + len(rows) * 16 * dim * 2  # 8 codes per row + fp16 codebooks per task


def test_a_compressed_fit_survives_its_fitted_state_and_fp32_keys_stay_as_they_were():
    compression = {"memory": "int8", "backbone": "int8"}
    model = fitted("patchcore", compression, **PATCHCORE_CL)
    again = build("patchcore", storage=compression, **PATCHCORE_CL).eval()
    again.load_fitted(model.fitted_state())
    images = as_float(builtin_images(2))
    with torch.no_grad():
        assert torch.equal(model(images).anomaly_maps, again(images).anomaly_maps)
    plain_keys = set(fitted("patchcore", **PATCHCORE_CL).fitted_state())
    assert {"banks.0", "banks.1", "prototypes"} <= plain_keys  # the keys detector files have always held
    assert not any("scale" in key for key in plain_keys)


def test_int8_backbone_stores_a_byte_per_weight_and_computes_with_the_dequantised_weights():
    plain = build("patchcore", **PATCHCORE_CL)
    small = build("patchcore", storage={"backbone": "int8"}, **PATCHCORE_CL)
    codes = [m._buffers["weight"] for m in small.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
    stored = memory_footprint(small.stored_tensors()).bytes_by_part["backbone"]
    assert stored < 0.4 * memory_footprint(plain.stored_tensors()).bytes_by_part["backbone"]
    conv_bytes = sum(c.numel() + 2 * 4 * len(c) for c in codes)  # codes + a scale and offset per output channel
    others = [t for name, t in small.backbone.named_parameters()]  # normalisation and biases, fp32
    others += [t for name, t in small.backbone.named_buffers() if not name.rpartition(".")[2].startswith("weight")]
    assert stored == conv_bytes + memory_footprint({"b": others}).total_bytes
    # A float32 network holding the decoded weights computes the very same features.
    for big, coded in zip(plain.backbone.modules(), small.backbone.modules()):
        if isinstance(big, torch.nn.Conv2d):
            big.weight.data.copy_(coded.weight)
    images = as_float(builtin_images(2))
    with torch.no_grad():
        for a, b in zip(plain.backbone(images), small.backbone(images)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_int8_backbone_features_stay_close_to_fp32():
    """Weight-only 8-bit codes move MobileNetV2's stride-8 and -16 features by about 2 % (cosine 0.98 measured);
    fp16 by 1e-5. What that does to the metrics is bench/compression.py's to measure."""
    images = as_float(builtin_images(2))
    with torch.no_grad():
        plain = build("patchcore", **PATCHCORE_CL).backbone(images)
        small = build("patchcore", storage={"backbone": "int8"}, **PATCHCORE_CL).backbone(images)
        half = build("patchcore", storage={"backbone": "fp16"}, **PATCHCORE_CL).backbone(images)
    for a, b, c in zip(plain, small, half):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.97
        assert torch.nn.functional.cosine_similarity(a.flatten(), c.flatten(), dim=0) > 0.9999


def test_padim_fp16_halves_its_gaussians():
    plain = fitted("padim", n_features=16, covariance="diagonal")
    half = fitted("padim", {"memory": "fp16"}, n_features=16, covariance="diagonal")
    assert half.means.dtype == torch.float16 and half.shapes.dtype == torch.float16
    float_bytes = [(m.means.numel() + m.shapes.numel()) * m.means.element_size() for m in (plain, half)]
    assert float_bytes[1] * 2 == float_bytes[0]
    images = as_float(builtin_images(2))
    with torch.no_grad():
        assert torch.allclose(plain(images).image_scores, half(images).image_scores, rtol=2e-2)


def test_cfa_memory_in_int8():
    model = fitted("cfa", {"memory": "int8"}, tasks=1, steps=1)
    assert model.memory.dtype == torch.uint8
    assert (
        memory_footprint(model.stored_tensors()).bytes_by_part["memory_bank"]
        == model.memory.numel() + 2 * 4 * (model.memory.shape[1])
    )
    with torch.no_grad():
        assert torch.isfinite(model(as_float(builtin_images(1))).image_scores).all()


# -- what is refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"model": {"name": "padim"}, "compression": {"memory": "int8"}},
            "padim: compression.memory 'int8'.*fp32, fp16",
        ),
        ({"model": {"name": "stfpm"}, "compression": {"memory": "fp16"}}, "stfpm: compression.memory 'fp16'"),
        (
            {"model": {"name": "patchcore"}, "compression": {"memory": "pq", "pq_subvectors": 7}},
            "pq_subvectors 7 does not divide the 128 features.*4, 8, 16, 32, 64",
        ),
        ({"compression": {"replay": "jpeg"}}, "compression.replay 'jpeg' applies to strategy 'replay'"),
        ({"compression": {"backbone": "int4"}}, "compression.backbone"),
    ],
)
def test_what_a_method_cannot_keep_is_refused_at_validation(section, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config(None, **section))


# -- replay ---------------------------------------------------------------------------------------


def test_a_jpeg_buffer_stores_jpeg_files_and_counts_their_bytes():
    images = builtin_images(6, size=96, category="grass")
    data = [{"image": image} for image in images]
    raw, jpeg = ReplayBuffer(4, 96, seed=0), ReplayBuffer(4, 96, seed=0, jpeg_quality=75)
    for buffer in (raw, jpeg):
        buffer.add_task(data)
    assert all(bytes(stored[:2].tolist()) == b"\xff\xd8" for stored in jpeg.stored)  # JPEG's start-of-image mark
    counted = memory_footprint({"replay_buffer": jpeg.stored}).total_bytes
    assert counted == sum(len(stored) for stored in jpeg.stored) < memory_footprint({"r": raw.stored}).total_bytes
    assert torch.equal(raw.task_ids, jpeg.task_ids)
    decoded = jpeg.images()
    assert decoded.shape == raw.images().shape and decoded.dtype == torch.uint8
    assert (decoded.float() - raw.images().float()).abs().mean() < 12  # the same images, a little degraded
    again = ReplayBuffer.from_state(jpeg.state(), 96, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again.stored, jpeg.stored))
    assert torch.equal(again[1]["image"], jpeg[1]["image"])


# -- runs -----------------------------------------------------------------------------------------


COMPRESSED_RUN = {
    "model": {"name": "patchcore", "params": {"continual": "cl++", "bank_size": 300}},
    "strategy": {"name": "replay", "replay_size": 4},
    "compression": {"memory": "pq", "pq_subvectors": 8, "pq_centroids": 16, "replay": "jpeg", "backbone": "int8"},
}


@pytest.mark.slow
def test_a_compressed_run_records_its_stored_bytes_and_its_detector_file_scores_the_same(builtin_cache, tmp_path):
    config = validate_config(tiny_config(builtin_cache, **COMPRESSED_RUN))
    record = run_trial(config, output_dir=tmp_path)
    parts = record.efficiency["memory_bytes_by_part"]
    detector = load_detector(tmp_path / DETECTOR_FILE)
    model = detector.model
    assert (
        parts
        == memory_footprint(
            model.stored_tensors()
            | {"replay_buffer": detector.replay.stored, "thresholds": detector.decision_rule().stored()}
        ).bytes_by_part
    )
    assert parts["replay_buffer"] == sum(len(stored) for stored in detector.replay.stored)
    assert record.efficiency["memory_bytes"] == sum(parts.values())
    # The price before training counts the same stored forms (JPEG replay at its raw size, and says so).
    priced = price_config(config)
    assert priced["memory_bytes_by_part"]["memory_bank"] == parts["memory_bank"]
    assert priced["memory_bytes_by_part"]["backbone"] == parts["backbone"]
    assert priced["replay_priced_raw"] is True
    assert priced["memory_bytes_by_part"]["replay_buffer"] == 4 * 3 * 64 * 64 > parts["replay_buffer"]
    # Its ONNX file stores the codes, not decoded floats: the stored tensors are memory_bytes less the replay buffer
    # (training data, not part of the file), give or take the graph's shape constants (int64).
    report = export_detector(detector, "onnx", tmp_path / "detector.onnx", verification_images(detector))
    stored = sum(n for dtype, n in report.weights_bytes_by_dtype.items() if dtype != "int64")
    assert report.weights_bytes_by_dtype["uint8"] > 0.5 * stored
    assert abs(stored - (record.efficiency["memory_bytes"] - parts["replay_buffer"])) < 0.01 * stored
    again = run_trial(config, output_dir=tmp_path / "again")
    assert again.matrices == record.matrices  # deterministic, k-means and JPEG included
    assert np.isfinite(record.final["pixel_f1"])
