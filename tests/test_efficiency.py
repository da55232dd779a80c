"""Efficiency accounting: FLOP counts to the flop on small scorers, published figures on backbones."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from cvad.efficiency import BYTES_PER_MB, LatencyReport, count_gflops, measure_latency, memory_footprint
from cvad.models.base import AnomalyOutput

REPLAY_IMAGE_BYTES = 3 * 224 * 224


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ClassifierAsDetector(nn.Module):
    """A timm classifier behind the detector contract; slicing the outputs costs nothing."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model(name, pretrained=False)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        logits = self.net(images)
        return AnomalyOutput(image_scores=logits[:, 0], anomaly_maps=images[:, 0])


class Scorer(nn.Module):
    """Applies ``score`` to the images; its first output element is the image score (maps: a free slice)."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.score = score

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        scores = self.score(images)
        return AnomalyOutput(image_scores=scores.flatten(1)[:, 0], anomaly_maps=images[:, 0])


def _flops(report) -> float:
    return report.gmacs * 1e9


# --------------------------------------------------------------------------- backbones


@pytest.fixture(scope="module")
def deit() -> ClassifierAsDetector:
    return ClassifierAsDetector("deit_tiny_patch16_224")


def test_mobilenetv2_matches_published_cost_and_namedtuple_output_traces():
    detector = ClassifierAsDetector("mobilenetv2_100")
    report = count_gflops(detector, 224)
    assert 0.30 <= report.gmacs <= 0.32  # published: 300 M multiply-adds
    assert report.gflops == 2 * report.gmacs  # the paper's GFLOPs
    assert "batch_norm" not in report.by_operator  # every batch norm follows a convolution: folded into it
    assert report.uncounted_ops == []
    assert report.by_operator["conv"] == pytest.approx(0.2995, abs=5e-4)
    assert report.by_operator["hardtanh_"] > 0  # ReLU6 counted
    assert count_gflops(detector.net, 224).gmacs == pytest.approx(report.gmacs, rel=1e-12)


def test_deit_tiny_counts_attention(deit):
    report = count_gflops(deit, 224)
    assert 1.2 <= report.gmacs <= 1.3  # published: 1.3 GFLOPs (timm: 1.26 GMACs)
    assert report.uncounted_ops == []

    blocks, heads, tokens, head_dim = 12, 3, 197, 64
    rows = heads * tokens
    expected_attention = blocks * (rows * head_dim + 2 * rows * tokens * head_dim + 3 * rows * tokens)
    assert report.by_operator["scaled_dot_product_attention"] * 1e9 == pytest.approx(expected_attention)
    # Without the handle the fused attention would count zero, and DeiT would fall below its published cost.
    assert report.gmacs - report.by_operator["scaled_dot_product_attention"] < 1.2


def test_fused_and_explicit_attention_count_the_same(deit):
    fused = count_gflops(deit, 224)
    attention_layers = [module for module in deit.modules() if hasattr(module, "fused_attn")]
    assert len(attention_layers) == 12
    try:
        for layer in attention_layers:
            layer.fused_attn = False
        explicit = count_gflops(deit, 224)
    finally:
        for layer in attention_layers:
            layer.fused_attn = True
    assert "scaled_dot_product_attention" not in explicit.by_operator
    assert explicit.by_operator["softmax"] > 0
    assert explicit.uncounted_ops == []
    assert explicit.gmacs == pytest.approx(fused.gmacs, rel=1e-12)


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, torch.float32])
def test_sdpa_handle_equals_explicit_attention_with_masks(mask_dtype):
    """Rectangular attention (L != S, E != Ev) with no mask, a boolean mask or an additive mask."""
    batch, heads, queries, keys, key_dim, value_dim = 1, 2, 5, 7, 4, 6
    mask = None
    if mask_dtype is torch.bool:
        mask = torch.rand(queries, keys, generator=_generator()) > 0.3
    elif mask_dtype is torch.float32:
        mask = torch.randn(queries, keys, generator=_generator())

    def split(images: torch.Tensor):
        flat = images.flatten()
        query = flat[: batch * heads * queries * key_dim].reshape(batch, heads, queries, key_dim)
        key = flat[: batch * heads * keys * key_dim].reshape(batch, heads, keys, key_dim)
        value = flat[: batch * heads * keys * value_dim].reshape(batch, heads, keys, value_dim)
        return query, key, value

    def fused(images: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(*split(images), attn_mask=mask)

    def explicit(images: torch.Tensor) -> torch.Tensor:
        query, key, value = split(images)
        scores = (query * key_dim**-0.5) @ key.transpose(-2, -1)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        return scores.softmax(dim=-1) @ value

    image = torch.rand(1, 3, 8, 8, generator=_generator())
    torch.testing.assert_close(fused(image), explicit(image))
    fused_report, explicit_report = count_gflops(Scorer(fused), 8), count_gflops(Scorer(explicit), 8)
    assert fused_report.uncounted_ops == explicit_report.uncounted_ops == []

    rows = batch * heads * queries
    expected = (
        rows * key_dim + rows * keys * (key_dim + 3 + value_dim) + (rows * keys if mask_dtype is torch.float32 else 0)
    )
    assert fused_report.by_operator == pytest.approx({"scaled_dot_product_attention": expected / 1e9})
    # The explicit version also inverts the boolean mask (an elementwise op on L*S elements).
    inverted_mask = queries * keys if mask_dtype is torch.bool else 0
    assert _flops(explicit_report) == pytest.approx(expected + inverted_mask)


# --------------------------------------------------------------------------- scoring ops, to the flop


class NearestNeighbourScorer(nn.Module):
    """PatchCore's core: every pixel is a patch; score = distance to the nearest bank entry."""

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bank", bank)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        size = images.shape[-1]
        patches = images.flatten(2).transpose(1, 2)  # [B, S*S, 3]
        distances = torch.cdist(patches, self.bank.unsqueeze(0))  # [B, S*S, M]
        patch_scores = distances.min(dim=-1).values
        return AnomalyOutput(patch_scores.amax(dim=1), patch_scores.reshape(-1, size, size))


def test_cdist_and_min_counted_to_the_flop():
    size, bank_size, dim = 16, 50, 3
    scorer = NearestNeighbourScorer(torch.randn(bank_size, dim, generator=_generator()))
    report = count_gflops(scorer, size)
    patches = size * size
    expected = {"cdist": patches * bank_size * dim, "min": patches * bank_size, "amax": patches}
    assert report.uncounted_ops == []
    assert report.by_operator == pytest.approx({op: flops / 1e9 for op, flops in expected.items()})
    assert _flops(report) == pytest.approx(sum(expected.values()), abs=0.5)


class MahalanobisScorer(nn.Module):
    """PaDiM's score per pixel, with the Gaussian stored in one of four deployable forms."""

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor, form: str) -> None:
        super().__init__()
        self.form = form
        self.register_buffer("mean", mean)  # [P, D]
        stored = {
            "inverse": torch.linalg.inv(covariance),
            "cholesky_solve": torch.linalg.cholesky(covariance),
            "triangular": torch.linalg.cholesky(covariance),
            "solve": covariance,
        }[form]
        self.register_buffer("stored", stored)  # [P, D, D]

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        size = images.shape[-1]
        delta = images.flatten(2).transpose(1, 2) - self.mean  # [B, P, D]
        column = delta.unsqueeze(-1)  # [B, P, D, 1]
        if self.form == "inverse":
            squared = ((delta.unsqueeze(-2) @ self.stored).squeeze(-2) * delta).sum(-1)
        elif self.form == "cholesky_solve":
            squared = (torch.cholesky_solve(column, self.stored).squeeze(-1) * delta).sum(-1)
        elif self.form == "triangular":
            whitened = torch.linalg.solve_triangular(self.stored, column, upper=False).squeeze(-1)
            squared = (whitened * whitened).sum(-1)
        else:
            squared = (torch.linalg.solve(self.stored, column).squeeze(-1) * delta).sum(-1)
        distances = squared.sqrt()
        return AnomalyOutput(distances.amax(dim=1), distances.reshape(-1, size, size))


def test_mahalanobis_forms_agree_and_are_counted_to_the_flop():
    size, dim = 8, 3
    positions = size * size
    mean = torch.rand(positions, dim, generator=_generator(1))
    factors = torch.randn(positions, dim, dim, generator=_generator(2))
    covariance = factors @ factors.transpose(-2, -1) + 0.01 * torch.eye(dim)
    solve_cost = {
        "inverse": positions * dim**2,
        "cholesky_solve": positions * dim**2,  # two triangular solves
        "triangular": positions * dim**2 / 2,
        "solve": positions * dim**3 / 3 + positions * dim**2,  # LU, then two triangular solves
    }
    image = torch.rand(1, 3, size, size, generator=_generator(3))
    reference = None
    for form, cost in solve_cost.items():
        scorer = MahalanobisScorer(mean, covariance, form)
        scores = scorer(image).image_scores
        reference = scores if reference is None else reference
        torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)

        report = count_gflops(scorer, size)
        # subtract the mean, solve, multiply and sum the quadratic form, square root, image max
        expected = positions * dim + cost + 2 * positions * dim + 2 * positions
        assert report.uncounted_ops == [], form
        assert _flops(report) == pytest.approx(expected, abs=0.5), form


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = math.ceil(2 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


BLUR = _gaussian_kernel(1.0)  # 5 taps


def _separable_blur(maps: torch.Tensor) -> torch.Tensor:
    taps = len(BLUR)
    padded = F.pad(maps, [taps // 2] * 4, mode="reflect")
    rows = F.conv2d(padded, BLUR.view(1, 1, 1, taps))
    return F.conv2d(rows, BLUR.view(1, 1, taps, 1))


@pytest.mark.parametrize(
    ("score", "size", "expected"),
    [
        (lambda x: F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False), 8, 4 * 3 * 32 * 32),
        # the row pass also runs over the padding rows: (16 + 4) x 16 outputs, then 16 x 16
        (lambda x: _separable_blur(x[:, :1]), 16, (20 * 16 + 16 * 16) * len(BLUR)),
        (lambda x: F.avg_pool2d(x, 3, stride=1, padding=1), 16, 9 * 3 * 16 * 16),
        (lambda x: x.softmax(dim=1), 16, 3 * 3 * 16 * 16),
        (lambda x: (x * 2 - 1).clamp(min=0), 16, 3 * 3 * 16 * 16),
        (lambda x: torch.einsum("bchw,dc->bdhw", x, torch.ones(5, 3)), 16, 5 * 3 * 16 * 16),
        (lambda x: x.flatten(1).topk(4, dim=1).values, 16, 3 * 16 * 16),
        # [1, 1, 3] @ [7, 3, 5]: the left operand broadcasts over 7 matrices (fvcore's handle counts 1)
        (lambda x: x.flatten(2)[:, :, :1].transpose(1, 2) @ torch.ones(7, 3, 5), 16, 7 * 5 * 3),
    ],
    ids=["bilinear", "gaussian-blur", "avg-pool", "softmax", "elementwise", "einsum", "topk", "broadcast-matmul"],
)
def test_resampling_blur_pooling_and_elementwise_counts(score, size, expected):
    report = count_gflops(Scorer(score), size)
    assert report.uncounted_ops == []
    assert _flops(report) == pytest.approx(expected, abs=0.5)


# --------------------------------------------------------------------------- whole detectors


class PatchKnnDetector(nn.Module):
    """Backbone plus PatchCore-style scoring: every stage of the path must be counted."""

    def __init__(self, bank_size: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = timm.create_model("mobilenetv2_100", pretrained=False, features_only=True, out_indices=(2, 3))
        channels = sum(self.backbone.feature_info.channels())
        self.register_buffer("bank", torch.randn(bank_size, channels, generator=_generator()))
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        low, high = self.backbone((images - self.pixel_mean) / self.pixel_std)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        embedding = F.avg_pool2d(torch.cat([low, high], dim=1), 3, stride=1, padding=1)
        batch, _, height, width = embedding.shape
        distances = torch.cdist(embedding.flatten(2).transpose(1, 2), self.bank.unsqueeze(0))
        nearest = distances.topk(3, dim=-1, largest=False).values  # [B, HW, 3]
        patch_scores = nearest[..., 0]
        worst = patch_scores.argmax(dim=1)
        weight = 1 - torch.softmax(nearest[torch.arange(batch), worst], dim=-1)[:, 0]
        maps = F.interpolate(patch_scores.reshape(batch, 1, height, width), size=images.shape[-2:], mode="bilinear")
        return AnomalyOutput(weight * patch_scores.amax(dim=1), _separable_blur(maps)[:, 0])


class TokenReconstructionDetector(nn.Module):
    """Dinomaly-like: ViT tokens of two blocks, a linear reconstruction, cosine distance map."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = nn.Linear(192, 192)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        shallow, deep = self.encoder.forward_intermediates(images, indices=[5, 11], intermediates_only=True)
        distance = 1 - F.cosine_similarity(shallow, self.decoder(deep.transpose(1, 3)).transpose(1, 3), dim=1)
        maps = F.interpolate(distance.unsqueeze(1), size=images.shape[-2:], mode="bilinear")
        return AnomalyOutput(maps.flatten(1).amax(dim=1), _separable_blur(maps)[:, 0])


def test_whole_cnn_detector_leaves_nothing_uncounted():
    detector = PatchKnnDetector()
    report = count_gflops(detector, 224)
    assert report.uncounted_ops == []
    for op in ["conv", "sub", "div", "upsample_bilinear2d", "avg_pool2d", "cdist", "topk", "argmax", "softmax", "amax"]:
        assert report.by_operator.get(op, 0) > 0, op
    grid = 28 * 28  # stride 8 at 224 px
    assert report.by_operator["cdist"] * 1e9 == pytest.approx(grid * 64 * (32 + 96))
    assert count_gflops(detector.backbone, 224).gmacs < report.gmacs


def test_whole_vit_detector_leaves_nothing_uncounted(deit):
    detector = TokenReconstructionDetector(deit.net)
    report = count_gflops(detector, 224)
    assert report.uncounted_ops == []
    assert report.by_operator["cosine_similarity"] * 1e9 == pytest.approx(3 * 192 * 14 * 14)
    assert report.by_operator["scaled_dot_product_attention"] > 0


def test_uncounted_ops_are_reported_without_warnings(caplog):
    def spectrum(images: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(images).abs()

    with caplog.at_level(logging.WARNING):
        report = count_gflops(Scorer(spectrum), 16)
    assert report.uncounted_ops == ["aten::fft_fft2"]
    assert report.by_operator == pytest.approx({"abs": 3 * 16 * 16 / 1e9})
    assert not [record for record in caplog.records if record.name.startswith("fvcore")]


class ModeRecorder(nn.Module):
    """Records the training flag its forward ran with; one child trains, the other is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Conv2d(3, 3, 1)
        self.frozen = nn.Conv2d(3, 3, 1).eval()
        self.seen: list[bool] = []

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        self.seen.append(self.training or self.trained.training)
        maps = self.frozen(self.trained(images))
        return AnomalyOutput(maps.flatten(1).amax(dim=1), maps[:, 0])


@pytest.mark.parametrize("measure", [count_gflops, measure_latency], ids=["gflops", "latency"])
def test_runs_in_eval_mode_and_restores_each_flag(measure):
    model = ModeRecorder()
    measure(model, 8)
    assert model.seen and not any(model.seen)
    assert model.training and model.trained.training and not model.frozen.training


def test_bad_image_size_is_rejected():
    with pytest.raises(ValueError, match="image_size"):
        count_gflops(ModeRecorder(), 0)


# --------------------------------------------------------------------------- memory


def test_memory_counts_bytes_by_dtype_in_binary_megabytes():
    replay = torch.zeros(40, 3, 224, 224, dtype=torch.uint8)
    report = memory_footprint(
        {"replay": [replay], "bank": [torch.zeros(100, 8)], "half": [torch.zeros(10, dtype=torch.float16)]}
    )
    assert report.bytes_by_part == {"replay": 40 * REPLAY_IMAGE_BYTES, "bank": 3200, "half": 20}
    assert BYTES_PER_MB == 2**20  # the paper's MB: its replay-100 and replay-40 rows differ by 8.61
    assert report.total_bytes == 40 * 150_528 + 3200 + 20
    assert report.total_mb == pytest.approx((40 * 150_528 + 3200 + 20) / 2**20)
    assert (100 - 40) * REPLAY_IMAGE_BYTES / BYTES_PER_MB == pytest.approx(8.61, abs=0.005)


def test_memory_counts_a_shared_tensor_once_in_the_first_part():
    teacher = nn.Linear(16, 16)
    student_head = nn.Linear(16, 4)
    shared = list(teacher.parameters())
    report = memory_footprint({"teacher": shared, "student": [*shared, *student_head.parameters(), *shared]})
    assert report.bytes_by_part == {"teacher": (16 * 16 + 16) * 4, "student": (16 * 4 + 4) * 4}


def test_memory_counts_the_storage_bytes_views_cover_once():
    bank = torch.arange(800, dtype=torch.float32).reshape(100, 8)
    report = memory_footprint(
        {
            "prefix": [bank[:50]],  # rows 0-49
            "overlap": [bank[25:75]],  # rows 50-74 are new
            "columns": [bank[:, :4]],  # half of rows 75-99 is new
            "whole": [bank.t(), bank.view(torch.uint8), bank],  # the other half of rows 75-99
            "broadcast": [torch.ones(4).expand(1000, 4)],  # 4 floats, however expanded
        }
    )
    assert report.bytes_by_part == {
        "prefix": 50 * 32,
        "overlap": 25 * 32,
        "columns": 25 * 16,
        "whole": 25 * 16,
        "broadcast": 16,
    }
    assert sum(report.bytes_by_part.values()) == bank.numel() * 4 + 16


def test_memory_rejects_malformed_parts():
    with pytest.raises(TypeError, match="part 'bank' must be a list"):
        memory_footprint({"bank": torch.zeros(3)})
    with pytest.raises(TypeError, match="part 'bank', item 1"):
        memory_footprint({"bank": [torch.zeros(3), 3.0]})


# --------------------------------------------------------------------------- latency


def test_latency_is_a_median_with_its_spread():
    latency = measure_latency(NearestNeighbourScorer(torch.randn(20, 3)), 16, warmup=1, repeats=5)
    assert math.isfinite(latency.median_ms) and latency.median_ms > 0 and latency.iqr_ms >= 0 and latency.runs == 5
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(NearestNeighbourScorer(torch.randn(20, 3)), 16, repeats=0)


def test_a_spread_that_says_the_machine_was_busy_is_flagged():
    assert not LatencyReport(median_ms=40.0, iqr_ms=2.0, runs=20).noisy
    busy = LatencyReport(median_ms=40.0, iqr_ms=30.0, runs=20)
    assert busy.noisy and busy.as_record()["latency_noisy"] is True


def test_batch_norm_is_free_after_a_convolution_only():
    """A deployed model folds a batch norm into the convolution before it; one on its own costs a
    multiply-add per element."""
    after_conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4)).eval()
    alone = torch.nn.Sequential(torch.nn.BatchNorm2d(3)).eval()
    assert count_gflops(after_conv, 8).gmacs * 1e9 == pytest.approx(8 * 8 * 4 * 3)  # the convolution's MACs only
    assert count_gflops(alone, 8).gmacs * 1e9 == pytest.approx(3 * 8 * 8)
