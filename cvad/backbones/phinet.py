"""PhiNet (Paissan, Ancilotto & Farella, ACM TECS 2022) as a staged backbone.

The architecture follows micromind 0.2.1's ``PhiNet`` (the version moviad pins), including
its quirks, so that the ImageNet checkpoints trained with it load and give the same
outputs:

- stem: TF-style asymmetric zero padding, a 3x3 depthwise conv on the 3 input channels,
  a 1x1 conv, BatchNorm, activation;
- block 1 has no expansion conv and no squeeze-excite; blocks 2.. expand by
  ``t0 * beta * i / N + t0 * (N - i) / N`` (block i of N);
- stride-2 depthwise convs pad one pixel on every side;
- BatchNorm eps is 1e-3; channel counts are rounded with ``divisor``.

micromind itself is not a dependency: importing it pulls torchinfo, accelerate,
huggingface_hub, onnx and loguru.

The paper's benchmark (moviad) uses ``phinet_1.2_0.5_6_downsampling`` at 224x224:
alpha=1.2, beta=0.5, t0=6, 7 blocks, downsampling at blocks 4, 5, 7, divisor 8
(checkpoint ``moviad/backbones/phinet/new_phinet_divisor8_v2_downsampl.pt``, which is
micromind's ImageNet "v2" model). :func:`load_reference_state_dict` maps micromind's keys:

    _layers.1._layers.{0,1,2}           -> stem.{depthwise,pointwise,bn}
    _layers.{b+2}._layers.{k}           -> stages.{s}.{j}.{expand|depthwise|se|project}...
    classifier.2.*                      -> classifier.*

where micromind block ``b`` (0-based, ``_layers.0`` being the stem padding) is the ``j``-th
block of stage ``s``; :func:`reference_key_map` lists every pair.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvad.backbones.staged import StagedNetwork
from cvad.backbones.weights import load_renamed

__all__ = [
    "PHINET_VARIANTS",
    "PhiNet",
    "PhiNetVariant",
    "build_phinet",
    "expansion_factor",
    "load_reference_state_dict",
    "make_divisible",
    "reference_key_map",
]

BN_EPS = 1e-3
FIRST_CONV_FILTERS = 48  # fixed by the PhiNet design, scaled by alpha
BLOCK1_FILTERS = 24
BLOCK2_FILTERS = 48
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_divisible(value: float, divisor: int) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def expansion_factor(t_zero: float, beta: float, block_id: int, num_layers: int) -> float:
    """PhiNet's expansion schedule: from t0 at the first block linearly down to t0 * beta at the last."""
    # Same operation order as micromind, so that int() truncation of channel counts agrees.
    return (t_zero * beta) * block_id / num_layers + t_zero * (num_layers - block_id) / num_layers


@dataclass(frozen=True)
class PhiNetBlockSpec:
    in_channels: int
    out_channels: int
    stride: int
    expanded_channels: int | None  # None: no 1x1 expansion (block 1)
    squeeze_excite: bool
    residual: bool


@dataclass(frozen=True)
class PhiNetVariant:
    """A PhiNet configuration with ImageNet weights used by moviad."""

    name: str
    alpha: float
    beta: float
    t_zero: float
    num_layers: int = 7
    downsampling_layers: tuple[int, ...] = (5, 7)
    divisor: int = 8
    resolution: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    checkpoint: str = ""  # file name in moviad/backbones/phinet/

    def arguments(self) -> dict:
        return dict(
            alpha=self.alpha,
            beta=self.beta,
            t_zero=self.t_zero,
            num_layers=self.num_layers,
            downsampling_layers=self.downsampling_layers,
            divisor=self.divisor,
        )


# The configurations moviad loads (moviad/utilities/custom_feature_extractor_trimmed.py).
PHINET_VARIANTS: dict[str, PhiNetVariant] = {
    v.name: v
    for v in (
        PhiNetVariant(
            "phinet_1.2_0.5_6_downsampling", 1.2, 0.5, 6, 7, (4, 5, 7), checkpoint="new_phinet_divisor8_v2_downsampl.pt"
        ),
        PhiNetVariant("phinet_2.3_0.75_5", 2.3, 0.75, 5, 7, (5, 7), checkpoint="new_phinet_small_71.pth.tar"),
        PhiNetVariant(
            "phinet_0.8_0.75_8_downsampling", 0.8, 0.75, 8, 7, (4, 5, 7), checkpoint="new_phinet_divisor8_v3.pth.tar"
        ),
        PhiNetVariant("phinet_1.3_0.5_7_downsampling", 1.3, 0.5, 7, 7, (4, 5, 7), checkpoint="phinet_13057DS.pth.tar"),
        PhiNetVariant("phinet_0.9_0.5_4_downsampling", 0.9, 0.5, 4, 7, (4, 5, 7), checkpoint="phinet_09054DS.pth.tar"),
        PhiNetVariant(
            "phinet_0.9_0.5_4_downsampling_deep", 0.9, 0.5, 4, 9, (4, 5, 7), checkpoint="phinet_09054DSDE.pth.tar"
        ),
    )
}


def phinet_blocks(
    alpha: float,
    beta: float,
    t_zero: float,
    num_layers: int,
    downsampling_layers: Sequence[int],
    divisor: int,
    squeeze_excite: bool,
    residuals: bool,
) -> tuple[int, list[PhiNetBlockSpec]]:
    """Stem width and the block list of a PhiNet, following micromind's construction."""

    def width(filters: float) -> int:
        return make_divisible(int(filters * alpha), divisor)

    def expanded(block_id: int, in_channels: int) -> int:
        return make_divisible(int(expansion_factor(t_zero, beta, block_id, num_layers) * in_channels), divisor)

    def block(in_ch: int, out_ch: int, stride: int, block_id: int | None) -> PhiNetBlockSpec:
        return PhiNetBlockSpec(
            in_channels=in_ch,
            out_channels=out_ch,
            stride=stride,
            expanded_channels=None if block_id is None else expanded(block_id, in_ch),
            squeeze_excite=squeeze_excite and block_id is not None,
            residual=residuals and stride == 1 and in_ch == out_ch,
        )

    stem = width(FIRST_CONV_FILTERS)
    b1, b2 = width(BLOCK1_FILTERS), width(BLOCK2_FILTERS)
    blocks = [block(stem, b1, 1, None), block(b1, b1, 2, 1), block(b1, b1, 1, 2), block(b1, b2, 2, 3)]
    filters, channels = BLOCK2_FILTERS, b2
    for block_id in range(4, num_layers + 1):
        stride = 1
        if block_id in downsampling_layers:
            filters, stride = filters * 2, 2
        blocks.append(block(channels, width(filters), stride, block_id))
        channels = width(filters)
    return stem, blocks


class TFSamePad(nn.Module):
    """Zero padding of TensorFlow's 'same' rule for a strided conv (the extra pixel goes right/bottom)."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def activation(h_swish: bool) -> nn.Module:
    return nn.Hardswish(inplace=True) if h_swish else nn.ReLU6(inplace=True)


class Stem(nn.Module):
    """micromind's SeparableConv2d input layer: depthwise 3x3 stride 2 on RGB, 1x1 conv, BN, activation."""

    def __init__(self, out_channels: int, h_swish: bool) -> None:
        super().__init__()
        self.pad = TFSamePad(3, 2)
        self.depthwise = nn.Conv2d(3, 3, 3, stride=2, groups=3, bias=False)
        self.pointwise = nn.Conv2d(3, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = activation(h_swish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pointwise(self.depthwise(self.pad(x)))))


class ConvBN(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        if act is not None:
            self.act = act


class SqueezeExcite(nn.Module):
    """Channel gate: global pool, 1x1 reduce, activation, 1x1 expand, sigmoid."""

    def __init__(self, channels: int, reduced: int, h_swish: bool) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=False)
        self.act = activation(h_swish)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(self.act(self.reduce(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(gate)


class PhiNetBlock(nn.Module):
    """Inverted residual block: [1x1 expand] -> dropout -> 3x3 depthwise -> [SE] -> 1x1 project."""

    def __init__(self, spec: PhiNetBlockSpec, divisor: int, h_swish: bool, dropout: float) -> None:
        super().__init__()
        self.residual = spec.residual
        mid = spec.expanded_channels or spec.in_channels
        self.expand = (
            ConvBN(spec.in_channels, mid, kernel_size=1, act=activation(h_swish)) if spec.expanded_channels else None
        )
        self.dropout = nn.Dropout2d(dropout)
        # micromind pads stride-2 depthwise convs by 1 on each side too (not TF 'same').
        self.depthwise = ConvBN(
            mid, mid, kernel_size=3, stride=spec.stride, padding=1, groups=mid, act=activation(h_swish)
        )
        self.se = (
            SqueezeExcite(mid, make_divisible(max(1, int(mid / 6)), divisor), h_swish) if spec.squeeze_excite else None
        )
        self.project = ConvBN(mid, spec.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.depthwise(self.dropout(y))
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y

    def reference_names(self) -> dict[str, str]:
        """Our sub-module paths -> micromind's indices inside ``PhiNetConvBlock._layers``."""
        # micromind's list: [conv, bn, act] if expanding, dropout, dw conv, bn, act, [se], conv, bn
        names, index = {}, 0
        if self.expand is not None:
            names.update({"expand.conv": "_layers.0", "expand.bn": "_layers.1"})
            index = 3
        names.update({"depthwise.conv": f"_layers.{index + 1}", "depthwise.bn": f"_layers.{index + 2}"})
        index += 4
        if self.se is not None:
            names.update({"se.reduce": f"_layers.{index}.se_conv", "se.expand": f"_layers.{index}.se_conv2"})
            index += 1
        names.update({"project.conv": f"_layers.{index}", "project.bn": f"_layers.{index + 1}"})
        return names


class PhiNet(StagedNetwork):
    """Staged PhiNet: ``stem`` then ``stages[s]`` (a stage ends where the next block halves the resolution).

    With ``num_stages`` only the first stages are built (no classifier), for feature extraction.
    ``bn_momentum`` uses PyTorch's convention; micromind sets 0.999, a Keras value that in
    PyTorch makes running statistics follow the last batch (only matters when training).
    """

    def __init__(
        self,
        alpha: float,
        beta: float,
        t_zero: float,
        num_layers: int = 7,
        downsampling_layers: Sequence[int] = (5, 7),
        divisor: int = 1,
        squeeze_excite: bool = True,
        h_swish: bool = True,
        residuals: bool = True,
        num_classes: int = 1000,
        num_stages: int | None = None,
        block_dropout: float = 0.05,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if num_layers < 4:
            raise ValueError(f"PhiNet needs num_layers >= 4 (its first 4 blocks are fixed), got {num_layers}")
        wrong = [layer for layer in downsampling_layers if not 4 <= layer <= num_layers]
        if wrong:
            raise ValueError(
                f"downsampling_layers {list(downsampling_layers)}: {wrong} "
                f"are not block ids of this PhiNet (4..{num_layers})"
            )
        stem_channels, blocks = phinet_blocks(
            alpha, beta, t_zero, num_layers, downsampling_layers, divisor, squeeze_excite, residuals
        )
        stage_specs: list[list[PhiNetBlockSpec]] = [[]]
        for spec in blocks:
            if spec.stride == 2 and stage_specs[-1]:
                stage_specs.append([])
            stage_specs[-1].append(spec)
        if num_stages is not None and not 1 <= num_stages <= len(stage_specs):
            raise ValueError(
                f"num_stages={num_stages} is out of range: this PhiNet has {len(stage_specs)} stages "
                f"(give 1..{len(stage_specs)}, or None for the full classifier)"
            )
        built = stage_specs if num_stages is None else stage_specs[:num_stages]
        self.stem = Stem(stem_channels, h_swish)
        self.stages = nn.ModuleList(
            nn.Sequential(*(PhiNetBlock(spec, divisor, h_swish, block_dropout) for spec in specs)) for specs in built
        )
        self.record_layout(built)
        self.classifier = nn.Linear(blocks[-1].out_channels, num_classes) if num_stages is None else None
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum


def build_phinet(variant: str = "phinet_1.2_0.5_6_downsampling", **kwargs) -> PhiNet:
    """A moviad PhiNet by name; ``kwargs`` go to :class:`PhiNet` (num_classes, num_stages, ...)."""
    try:
        spec = PHINET_VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown PhiNet variant {variant!r}; choose one of: {', '.join(PHINET_VARIANTS)}") from None
    return PhiNet(**(spec.arguments() | kwargs))


def reference_key_map(model: PhiNet) -> dict[str, str]:
    """Our state-dict key -> the key of the same tensor in micromind 0.2.1's PhiNet."""
    prefixes = {
        "stem.depthwise": "_layers.1._layers.0",
        "stem.pointwise": "_layers.1._layers.1",
        "stem.bn": "_layers.1._layers.2",
    }
    if model.classifier is not None:
        prefixes["classifier"] = "classifier.2"
    block_number = 2  # micromind's _layers: [0] stem padding, [1] stem conv, [2..] blocks
    for s, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            for ours, theirs in block.reference_names().items():
                prefixes[f"stages.{s}.{j}.{ours}"] = f"_layers.{block_number}.{theirs}"
            block_number += 1
    mapping = {}
    for key in model.state_dict():
        module, tensor = key.rsplit(".", 1)
        mapping[key] = f"{prefixes[module]}.{tensor}"
    return mapping


def load_reference_state_dict(model: PhiNet, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a micromind/moviad PhiNet checkpoint into ``model`` (see :func:`cvad.backbones.weights.load_renamed`)."""
    load_renamed(
        model, state_dict, reference_key_map(model), truncated=model.classifier is None, origin="PhiNet checkpoint"
    )
