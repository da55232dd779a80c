"""Dinomaly / Tiny-Dinomaly: ViT stages, the decoder's pieces, training, scoring, accounting, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import support
from cvad.backbones import FeatureExtractor, taps
from cvad.backbones.weights import RandomWeightsWarning
from cvad.efficiency import count_gflops, memory_footprint
from cvad.models.dinomaly import Dinomaly, LinearAttention
from support import SIZE, task_of
from support import VIT as TINY


@pytest.fixture(autouse=True)
def quiet_random_weights():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


def build(seed: int = 0, backbone: str = TINY, image_size: int = SIZE, **params) -> Dinomaly:
    torch.manual_seed(0)  # the random encoder comes from the global RNG, as a trial seeds it
    return support.build("dinomaly", backbone, seed=seed, image_size=image_size, weights="random", **params)


@pytest.fixture(scope="module")
def trained(nuts) -> Dinomaly:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build(epochs=6)
    model.fit_task(task_of(nuts))
    return model


def test_taps_list_every_vit_block():
    assert [(t.name, t.channels, t.stride) for t in taps(TINY)] == [(f"blocks.{i}", 192, 16) for i in range(12)]
    extractor = FeatureExtractor(TINY, ("blocks.2", "blocks.9"), "random")
    assert len(extractor.body.model.blocks) == 10  # truncated after the deepest requested block
    maps = extractor(torch.rand(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 14, 14)] * 2


def test_linear_attention_is_the_normalised_elu_kernel():
    torch.manual_seed(1)
    attention = LinearAttention(dim=12, heads=3)
    x = torch.randn(2, 5, 12)
    q, k, v = attention.qkv(x).view(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    weights = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)  # [B, heads, N, N], no softmax
    expected = (weights / weights.sum(-1, keepdim=True)) @ v
    expected = attention.proj(expected.transpose(1, 2).reshape(2, 5, 12))
    assert torch.allclose(attention(x), expected, atol=1e-5)


def test_hard_mining_damps_only_the_easiest_tokens():
    model = build(hard_mining_factor=0.1)
    torch.manual_seed(2)
    target = torch.randn(2, 10, 8)
    noise = torch.randn(2, 10, 8) * torch.linspace(0.01, 2.0, 20).view(2, 10, 1)  # error grows token by token
    grads = []
    for easy in (0.0, 0.5):
        recon = (target + noise).requires_grad_()
        model.loss([target], [recon * 1.0], easy).backward()
        grads.append(recon.grad)
    ratio = grads[1].norm(dim=-1) / grads[0].norm(dim=-1)
    distance = 1 - F.cosine_similarity(target, target + noise, dim=-1)
    easiest = distance.flatten().argsort()[:10]
    expected = torch.ones(20)
    expected[easiest] = 0.1
    assert torch.allclose(ratio.flatten(), expected, atol=1e-5)


def test_schedules_ramp_as_the_original():
    model = build(lr=2e-3, lr_warmup=0.1, lr_final_ratio=0.1, hard_mining_fraction=0.9, hard_mining_warmup=0.1)
    assert model.learning_rate(0, 100) == pytest.approx(2e-4)  # first of 10 warm-up steps
    assert model.learning_rate(10, 100) == pytest.approx(2e-3)  # peak after warm-up
    assert model.learning_rate(99, 100) == pytest.approx(2e-4, rel=0.01)  # cosine down to lr x 0.1
    assert model.easy_fraction(0, 100) == 0
    assert model.easy_fraction(5, 100) == pytest.approx(0.45)
    assert model.easy_fraction(60, 100) == pytest.approx(0.9)


def test_training_on_builtin_images_lowers_the_loss(trained):
    (history,) = trained.loss_history
    assert len(history) == 6
    assert history[-1] < 0.7 * history[0]
    assert not trained.training


def test_maps_and_scores(trained, nuts):
    images = nuts[:3].float() / 255
    with torch.no_grad():
        out = trained(images)
    assert out.anomaly_maps.shape == (3, SIZE, SIZE)
    assert out.image_scores.shape == (3,)
    flat = out.anomaly_maps.flatten(1)
    assert torch.isfinite(flat).all() and (flat >= -1e-6).all()
    assert (out.image_scores <= flat.amax(1) + 1e-6).all() and (out.image_scores >= flat.mean(1)).all()
    # A pasted foreign patch is reconstructed worse than the normal image around it.
    damaged = images.clone()
    damaged[:, :, 16:48, 16:48] = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = trained(damaged).anomaly_maps
    assert (maps[:, 24:40, 24:40].mean((1, 2)) > maps[:, :8, :].mean((1, 2))).all()


def test_memory_counts_every_stored_weight_once(trained):
    parts = trained.stored_tensors()
    report = memory_footprint(parts)
    assert set(report.breakdown_mb) == {"encoder", "bottleneck", "decoder", "map_head"}
    assert all(report.bytes_by_part[part] > 0 for part in ("encoder", "bottleneck", "decoder"))
    expected = sum(t.numel() * t.element_size() for t in [*trained.parameters(), *trained.buffers()])
    assert sum(report.bytes_by_part.values()) == expected
    # The encoder is stored only up to its deepest used block (9 of 0..11), at the input's patch grid.
    assert len(trained.vit.blocks) == 10 and trained.vit.pos_embed.shape == (1, 1 + 4 * 4, 192)


def test_gflops_count_the_whole_path(trained):
    report = count_gflops(trained, SIZE)
    assert report.gflops > 0
    assert report.uncounted_ops == []
    for op in ("scaled_dot_product_attention", "elu", "matmul", "cosine_similarity", "topk", "conv"):
        assert report.by_operator.get(op, 0) > 0, op  # encoder attention, decoder linear attention, scoring, blur


def test_random_encoder_is_flagged():
    assert build().weights.pretrained is False


def test_dinov2_registers_are_prefix_tokens():
    model = build(
        backbone="vit_small_patch14_reg4_dinov2", image_size=56, decoder_blocks=2, decoder_groups=((1,), (0,))
    )
    assert model.prefix_tokens == 5  # class token + 4 registers, carried through the decoder, not scored
    with torch.no_grad():
        out = model(torch.rand(2, 3, 56, 56))
    assert out.anomaly_maps.shape == (2, 56, 56)


def test_non_vit_backbone_is_refused():
    with pytest.raises(ValueError, match="needs a ViT encoder.*mobilenetv2_100.*deit_tiny_patch16_224"):
        build(backbone="mobilenetv2_100")


def test_layers_beyond_the_encoder_are_refused():
    with pytest.raises(ValueError, match="uses block 12, but deit_tiny_patch16_224 has 12 blocks"):
        build(encoder_groups=((2, 3), (11, 12)))


def test_image_size_must_fill_whole_patches():
    with pytest.raises(ValueError, match="image size 70 px is not a multiple of .* patch size 16 px.*e.g. 64"):
        build(image_size=70)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"decoder_groups": ((0, 1),)}, "decoder_groups has 1 groups but encoder_groups has 2"),
        ({"decoder_blocks": 4}, "uses decoder block 7, but decoder_blocks is 4"),
        ({"encoder_groups": ((2, 3), ())}, "group 2 is empty"),
        ({"encoder_groups": ((2, 2), (3,))}, "lists a layer twice"),
        ({"encoder_groups": ((-1, 2), (3,))}, "negative index"),
        ({"bottleneck_dropout": 1.0}, "bottleneck_dropout"),
    ],
)
def test_bad_params_are_refused(params, message):
    with pytest.raises(ValidationError, match=message):
        Dinomaly.Params(**params)


def test_paper_schedule_is_valid_params():
    params = Dinomaly.Params(**Dinomaly.PAPER_TRAINING)
    assert params.lr == 2e-3 and params.grad_clip == 0.1 and params.bottleneck_dropout == 0.2
