"""MCUNet and PhiNet against their published figures and their reference implementations.

Reference implementations (not installable here, run once at development time):
- MCUNet: mit-han-lab's ``ProxylessNASNets`` (mcunet 0.1.1 on PyPI) built from the official
  config mit-han-lab/tinyml ``mcunet/assets/configs/mcunet-320kb-1mb_imagenet.json``;
- PhiNet: ``micromind.networks.PhiNet`` of micromind 0.2.1 (the version moviad pins).
The golden numbers below were produced by those implementations with the deterministic
weights of :func:`synthetic_reference_weights`, so they check our architecture and our
checkpoint key mapping together. Real checkpoints cannot be downloaded here.
"""

from __future__ import annotations

import hashlib
import logging
import math
import zlib

import numpy as np
import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from cvad.backbones import mcunet as mcunet_module
from cvad.backbones import phinet as phinet_module
from cvad.backbones.mcunet import MCUNET_VARIANTS, build_mcunet
from cvad.backbones.phinet import PHINET_VARIANTS, PhiNet, build_phinet


class StageFeatures(torch.nn.Module):
    """Lets fvcore trace ``forward_stages`` of a truncated network."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.forward_stages(x)


def macs_by_operator(net: torch.nn.Module, resolution: int) -> dict[str, int]:
    """fvcore counts (one multiply-add = one flop) per operator, for one image."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    module = net if getattr(net, "classifier", None) is not None else StageFeatures(net)
    analysis = FlopCountAnalysis(module.eval(), torch.zeros(1, 3, resolution, resolution))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return dict(analysis.by_operator())


def parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def hashed_uniform(seed: int, count: int) -> np.ndarray:
    """``count`` uniform [0, 1) numbers from splitmix64: exact integer arithmetic, same on every machine."""
    with np.errstate(over="ignore"):
        z = (np.arange(count, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def synthetic_reference_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Deterministic pseudo-random tensors named in the ORIGINAL project's keys.

    Each value depends only on its original key and shape, so the same dict built from the
    reference model (at development time) and from our key map (here) is identical.
    """
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
            continue
        numel = math.prod(shape)
        centred = hashed_uniform(zlib.crc32(key.encode()) << 20, numel) - 0.5  # variance 1/12
        if key.endswith("running_var"):
            value = 1.0 + centred
        elif len(shape) == 1 and key.endswith("weight"):  # BN scale
            value = 1.0 + 0.4 * centred
        elif len(shape) == 1:  # BN shift, running mean, linear bias
            value = 0.2 * centred
        else:  # conv or linear weight: He-style variance 2 / fan_in keeps activations O(1)
            value = centred * (24.0 / (numel // shape[0])) ** 0.5
        state[key] = torch.from_numpy(value.astype(np.float32).reshape(shape))
    return state


def patterned_image(resolution: int) -> torch.Tensor:
    h = torch.arange(resolution, dtype=torch.float32).view(1, 1, -1, 1)
    w = torch.arange(resolution, dtype=torch.float32).view(1, 1, 1, -1)
    c = torch.arange(3, dtype=torch.float32).view(1, -1, 1, 1)
    return torch.sin(0.05 * h * (c + 1) + 0.07 * w) + 0.3 * torch.cos(0.11 * w * (c + 1))


def key_layout_digest(mapping: dict[str, str], own_shapes: dict[str, tuple[int, ...]]) -> str:
    """sha256 of the sorted 'original_key shape' lines: the original checkpoint's layout."""
    lines = sorted(f"{mapping[k]} {list(shape)}" for k, shape in own_shapes.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# MCUNet-in3 (mcunet-320kb-1mb_imagenet), the paper's MCUNet (moviad: "mcunet-in3", 176x176)
# ---------------------------------------------------------------------------------------

# mit-han-lab/mcunet README, ImageNet model zoo: mcunet-in3 has 81.8M MACs, 0.74M params, res 176.
MCUNET_IN3_PUBLISHED_MACS = 81.8e6
MCUNET_IN3_PUBLISHED_PARAMS = 0.74e6
# Exact counts of the reference ProxylessNASNets built from the official JSON config.
MCUNET_IN3_REFERENCE_PARAMS = 737_408
MCUNET_IN3_REFERENCE_CONV_MACS = 81_625_520  # fvcore 'conv' at 176x176
MCUNET_IN3_REFERENCE_LINEAR_MACS = 160_000  # 160 x 1000 classifier
MCUNET_IN3_REFERENCE_KEYS_SHA256 = "7599da22edcfccf4c1412e18d70d8844507cacf1ba445e43eb9b96e5a6345986"
# Outputs of the reference implementations for patterned_image(176), with the weights
# synthetic_reference_weights() of their own state-dict layout: the first 8 logits, and
# mean |x| of the maps after blocks 0, 4, 7, 13, 17 (our stage ends).
MCUNET_IN3_GOLDEN = (
    [-4.905886, -2.298163, -0.535425, 4.685935, -3.099015, -0.017524, 4.430629, 4.062767],
    [1.1728, 4.268166, 3.905951, 4.327198, 2.269381],
)


def test_mcunet_in3_parameters_match_model_zoo() -> None:
    net = build_mcunet("mcunet-in3")
    params = parameter_count(net)
    assert params == MCUNET_IN3_REFERENCE_PARAMS
    # the zoo's figure is rounded to 0.01M
    assert abs(params - MCUNET_IN3_PUBLISHED_PARAMS) <= 0.005e6


def test_mcunet_in3_macs_match_model_zoo_at_176() -> None:
    resolution = MCUNET_VARIANTS["mcunet-in3"].resolution
    assert resolution == 176
    ops = macs_by_operator(build_mcunet("mcunet-in3"), resolution)
    assert ops["conv"] == MCUNET_IN3_REFERENCE_CONV_MACS
    assert ops["linear"] == MCUNET_IN3_REFERENCE_LINEAR_MACS
    # Published MACs count convolutions and the classifier; BatchNorm is folded into the
    # convs on the microcontroller, while fvcore adds one flop per BN output element.
    published_style = ops["conv"] + ops["linear"]
    assert abs(published_style - MCUNET_IN3_PUBLISHED_MACS) <= 0.05e6  # figure rounded to 0.1M
    assert ops["batch_norm"] == 5_036_192


def test_mcunet_in3_stages_and_shapes() -> None:
    net = build_mcunet("mcunet-in3").eval()
    assert net.stage_channels == [8, 16, 24, 48, 160]
    assert net.stage_strides == [2, 4, 8, 16, 32]
    assert [len(stage) for stage in net.stages] == [1, 4, 3, 6, 4]  # the 18 blocks of the config
    with torch.no_grad():
        maps = net.forward_stages(torch.zeros(2, 3, 176, 176))
        logits = net(torch.zeros(2, 3, 176, 176))
    assert [tuple(m.shape) for m in maps] == [
        (2, 8, 88, 88),
        (2, 16, 44, 44),
        (2, 24, 22, 22),
        (2, 48, 11, 11),
        (2, 160, 6, 6),
    ]
    assert tuple(logits.shape) == (2, 1000)


# ---------------------------------------------------------------------------------------
# PhiNet
# ---------------------------------------------------------------------------------------

# micromind 0.2.1, PhiNet.get_complexity() docstring: PhiNet((3, 224, 224)) -- alpha=0.2,
# beta=1, t0=6, 7 blocks, downsampling at 5 and 7, divisor 1, no classifier --
# has {'MAC': 9817670, 'params': 30917}. That MAC figure comes from torchinfo, which adds
# 2 per BatchNorm channel (its weight and bias) to the convolution MACs.
PHINET_DEFAULT_PUBLISHED_MACS = 9_817_670
PHINET_DEFAULT_PUBLISHED_PARAMS = 30_917

# The paper's PhiNet, moviad's "phinet_1.2_0.5_6_downsampling" at 224x224. No publication
# gives its size; these are the counts of micromind 0.2.1's PhiNet built with moviad's
# arguments (include_top=True, num_classes=1000, divisor=8).
PHINET_PAPER_REFERENCE_PARAMS = 2_074_035
PHINET_PAPER_REFERENCE_CONV_MACS = 248_825_992
PHINET_PAPER_REFERENCE_LINEAR_MACS = 464_000
PHINET_PAPER_REFERENCE_KEYS_SHA256 = "c897dcf4e6d491d74baa4bdbb7ab43fac184d770df7ca7529bfef3e8ff8dab95"
# As MCUNET_IN3_GOLDEN, at 224; the maps after micromind's _layers 2, 4, 5, 6, 8, 9.
PHINET_PAPER_GOLDEN = (
    [-0.090812, 0.067403, 0.215954, 0.134164, 0.342963, 0.163559, 0.416815, 0.064789],
    [0.717793, 0.885387, 0.584796, 0.456618, 0.35395, 0.178395],
)


def test_phinet_default_config_matches_micromind_published_complexity() -> None:
    stages = PhiNet(alpha=0.2, beta=1.0, t_zero=6).stage_channels
    features = PhiNet(alpha=0.2, beta=1.0, t_zero=6, num_stages=len(stages))  # no classifier, like include_top=False
    assert parameter_count(features) == PHINET_DEFAULT_PUBLISHED_PARAMS
    ops = macs_by_operator(features, 224)
    bn_affine = sum(
        m.weight.numel() + m.bias.numel() for m in features.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    assert ops["conv"] + bn_affine == PHINET_DEFAULT_PUBLISHED_MACS


def test_phinet_paper_variant_size_matches_reference() -> None:
    net = build_phinet("phinet_1.2_0.5_6_downsampling")
    assert parameter_count(net) == PHINET_PAPER_REFERENCE_PARAMS
    ops = macs_by_operator(net, PHINET_VARIANTS["phinet_1.2_0.5_6_downsampling"].resolution)
    assert ops["conv"] == PHINET_PAPER_REFERENCE_CONV_MACS
    assert ops["linear"] == PHINET_PAPER_REFERENCE_LINEAR_MACS


def test_phinet_paper_variant_stages_and_shapes() -> None:
    net = build_phinet("phinet_1.2_0.5_6_downsampling").eval()
    assert net.stage_channels == [32, 32, 56, 112, 232, 464]
    assert net.stage_strides == [2, 4, 8, 16, 32, 64]
    # moviad's PaDiM embedding sizes (moviad/models/padim/padim.py) sum block widths:
    # blocks 1, 4, 5 -> 376 and blocks 3, 4, 5 -> 400; those blocks end our stages 0, 2, 3, 4.
    assert net.stage_channels[0] + net.stage_channels[3] + net.stage_channels[4] == 376
    assert net.stage_channels[2] + net.stage_channels[3] + net.stage_channels[4] == 400
    with torch.no_grad():
        maps = net.forward_stages(torch.zeros(1, 3, 224, 224))
        logits = net(torch.zeros(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (32, 112, 112),
        (32, 56, 56),
        (56, 28, 28),
        (112, 14, 14),
        (232, 7, 7),
        (464, 4, 4),
    ]
    assert tuple(logits.shape) == (1, 1000)


def test_phinet_all_moviad_variants_build_with_consistent_stages() -> None:
    for name in PHINET_VARIANTS:
        net = build_phinet(name)
        assert len(net.stage_channels) == len(net.stage_strides) == len(net.stages)
        assert net.stage_strides == sorted(set(net.stage_strides)), name
        assert net.classifier.in_features == net.stage_channels[-1]


# ---------------------------------------------------------------------------------------
# Checkpoint key mapping and truncation, both networks
# ---------------------------------------------------------------------------------------

NETWORKS = {
    "mcunet-in3": (build_mcunet, mcunet_module, 176, MCUNET_IN3_REFERENCE_KEYS_SHA256, MCUNET_IN3_GOLDEN),
    "phinet_1.2_0.5_6_downsampling": (
        build_phinet,
        phinet_module,
        224,
        PHINET_PAPER_REFERENCE_KEYS_SHA256,
        PHINET_PAPER_GOLDEN,
    ),
}


def reference_shapes(net: torch.nn.Module, module) -> dict[str, tuple[int, ...]]:
    mapping = module.reference_key_map(net)
    return {mapping[k]: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("variant", NETWORKS)
def test_key_map_reproduces_original_checkpoint_layout(variant: str) -> None:
    build, module, _, digest, _ = NETWORKS[variant]
    net = build(variant)
    mapping = module.reference_key_map(net)
    assert len(set(mapping.values())) == len(mapping)
    assert key_layout_digest(mapping, {k: tuple(v.shape) for k, v in net.state_dict().items()}) == digest


@pytest.mark.parametrize("variant", NETWORKS)
def test_reference_weights_give_reference_outputs(variant: str) -> None:
    build, module, resolution, _, golden = NETWORKS[variant]
    net = build(variant).eval()
    module.load_reference_state_dict(net, synthetic_reference_weights(reference_shapes(net, module)))
    golden_logits, golden_stage_means = golden
    image = patterned_image(resolution)
    with torch.no_grad():
        stage_means = [m.abs().mean().item() for m in net.forward_stages(image)]
        logits = net(image)
    assert stage_means == pytest.approx(golden_stage_means, rel=1e-4)
    torch.testing.assert_close(logits[0, :8], torch.tensor(golden_logits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", NETWORKS)
def test_state_dict_round_trips_through_original_names(variant: str) -> None:
    build, module, _, _, _ = NETWORKS[variant]
    torch.manual_seed(0)
    source = build(variant)
    mapping = module.reference_key_map(source)
    in_original_names = {mapping[k]: v for k, v in source.state_dict().items()}
    target = build(variant)
    module.load_reference_state_dict(target, in_original_names)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("variant", NETWORKS)
def test_load_reference_rejects_wrong_checkpoints(variant: str) -> None:
    build, module, _, _, _ = NETWORKS[variant]
    net = build(variant)
    state = synthetic_reference_weights(reference_shapes(net, module))
    first_weight = next(k for k in state if k.endswith("weight"))

    missing = {k: v for k, v in state.items() if k != first_weight}
    with pytest.raises(KeyError, match="lacks 1 of"):
        module.load_reference_state_dict(net, missing)

    extra = state | {"head.extra.weight": torch.zeros(3)}
    with pytest.raises(KeyError, match="no place for"):
        module.load_reference_state_dict(net, extra)

    reshaped = state | {first_weight: torch.zeros(1, 2, 3, 3)}
    with pytest.raises(ValueError, match="has shape"):
        module.load_reference_state_dict(net, reshaped)

    without_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    module.load_reference_state_dict(net, without_counters)  # older checkpoints lack them


@pytest.mark.parametrize("variant", NETWORKS)
def test_truncated_network_is_a_prefix_of_the_full_one(variant: str) -> None:
    build, module, resolution, _, _ = NETWORKS[variant]
    full = build(variant).eval()
    truncated = build(variant, num_stages=3).eval()
    assert truncated.stage_channels == full.stage_channels[:3]
    assert truncated.stage_strides == full.stage_strides[:3]
    assert truncated.classifier is None and len(truncated.stages) == 3
    # The registry copies weights by name: every truncated key must exist in the full model.
    own = truncated.state_dict()
    assert set(own) < set(full.state_dict())
    truncated.load_state_dict({k: v for k, v in full.state_dict().items() if k in own}, strict=True)
    image = patterned_image(resolution)
    with torch.no_grad():
        for got, want in zip(truncated.forward_stages(image), full.forward_stages(image)[:3], strict=True):
            assert torch.equal(got, want)
    # A full checkpoint loads into a truncated network (the unbuilt stages are skipped).
    module.load_reference_state_dict(truncated, synthetic_reference_weights(reference_shapes(full, module)))
    with pytest.raises(RuntimeError, match="no classifier"):
        truncated(image)


@pytest.mark.parametrize("variant", NETWORKS)
def test_bad_arguments_raise_clear_errors(variant: str) -> None:
    build, _, _, _, _ = NETWORKS[variant]
    stages = len(build(variant).stages)
    with pytest.raises(ValueError, match="num_stages=0 is out of range"):
        build(variant, num_stages=0)
    with pytest.raises(ValueError, match=f"num_stages={stages + 1} is out of range"):
        build(variant, num_stages=stages + 1)
    with pytest.raises(ValueError, match="unknown .* variant"):
        build(variant + "-typo")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        build(variant).forward_stages(torch.zeros(1, 1, 64, 64))


def test_phinet_rejects_impossible_downsampling_layers() -> None:
    with pytest.raises(ValueError, match=r"\[9\] are not block ids"):
        PhiNet(alpha=1.0, beta=1.0, t_zero=6, num_layers=7, downsampling_layers=(5, 9))
