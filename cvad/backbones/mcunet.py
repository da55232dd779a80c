"""MCUNet (Lin et al., NeurIPS 2020): the TinyNAS networks of mit-han-lab/mcunet, as staged backbones.

The paper's benchmark (and its code base, moviad) uses ``mcunet-in3``: the ImageNet model
that fits 320 kB SRAM and 1 MB Flash (``mcunet-320kb-1mb_imagenet``), fed 176x176 images.
Its layer table below is the official network config
(mit-han-lab/tinyml, ``mcunet/assets/configs/mcunet-320kb-1mb_imagenet.json``); the
mcunet package itself downloads that file at build time, so it cannot run offline.

Our module names differ from the original ProxylessNASNets ones because blocks are
grouped into stages (one stage per resolution, so a feature extractor can stop early);
:func:`load_reference_state_dict` loads the official checkpoint
(``https://hanlab.mit.edu/projects/tinyml/mcunet/release/mcunet-320kb-1mb_imagenet.pth``,
tensors under ``"state_dict"``) by renaming its keys:

    first_conv.{conv,bn}                                  -> stem.{conv,bn}
    blocks.{i}.mobile_inverted_conv.inverted_bottleneck.* -> stages.{s}.{j}.expand.*
    blocks.{i}.mobile_inverted_conv.depth_conv.*          -> stages.{s}.{j}.depthwise.*
    blocks.{i}.mobile_inverted_conv.point_linear.*        -> stages.{s}.{j}.project.*
    classifier.linear.*                                   -> classifier.*

where block ``i`` is the ``j``-th block of stage ``s``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cvad.backbones.staged import StagedNetwork
from cvad.backbones.weights import load_renamed

__all__ = [
    "MCUNET_VARIANTS",
    "InvertedResidualSpec",
    "MCUNet",
    "MCUNetVariant",
    "build_mcunet",
    "load_reference_state_dict",
    "reference_key_map",
]

BN_EPS = 1e-5  # the config's "bn": {"eps": 1e-05}


@dataclass(frozen=True)
class InvertedResidualSpec:
    """One MobileNetV2-style block: 1x1 expand (skipped when expand_ratio is 1), kxk depthwise, 1x1 project."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int

    @property
    def mid_channels(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def residual(self) -> bool:
        # The official configs put an identity shortcut exactly on these blocks.
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclass(frozen=True)
class MCUNetVariant:
    """A published MCUNet model: its layers and the input it was trained on."""

    name: str
    stem_channels: int
    blocks: tuple[InvertedResidualSpec, ...]
    resolution: int  # ImageNet training/evaluation resolution
    mean: tuple[float, float, float]  # input normalisation of the pretrained weights
    std: tuple[float, float, float]
    checkpoint_url: str


def _chain(stem_channels: int, table: Sequence[tuple[int, int, int, int]]) -> tuple[InvertedResidualSpec, ...]:
    """Blocks from (out_channels, kernel, stride, expand_ratio) rows, each fed by the previous one."""
    blocks, channels = [], stem_channels
    for out_channels, kernel, stride, expand in table:
        blocks.append(InvertedResidualSpec(channels, out_channels, kernel, stride, expand))
        channels = out_channels
    return tuple(blocks)


MCUNET_VARIANTS: dict[str, MCUNetVariant] = {
    "mcunet-in3": MCUNetVariant(
        name="mcunet-in3",
        stem_channels=16,
        # (out, kernel, stride, expand) of the 18 blocks of mcunet-320kb-1mb_imagenet.json
        blocks=_chain(
            16,
            [
                (8, 3, 1, 1),
                (16, 7, 2, 3),
                (16, 3, 1, 5),
                (16, 7, 1, 5),
                (16, 5, 1, 4),
                (24, 5, 2, 5),
                (24, 5, 1, 5),
                (24, 5, 1, 5),
                (40, 3, 2, 5),
                (40, 7, 1, 6),
                (40, 5, 1, 4),
                (48, 5, 1, 5),
                (48, 7, 1, 5),
                (48, 3, 1, 5),
                (96, 3, 2, 6),
                (96, 7, 1, 5),
                (96, 3, 1, 4),
                (160, 7, 1, 5),
            ],
        ),
        resolution=176,
        # mcunet's eval_torch.py normalises to [-1, 1]; moviad feeds ImageNet-normalised images instead.
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        checkpoint_url="https://hanlab.mit.edu/projects/tinyml/mcunet/release/mcunet-320kb-1mb_imagenet.pth",
    ),
}


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional ReLU6, with 'same' padding for odd kernels."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        if act:
            self.act = nn.ReLU6(inplace=True)


class InvertedResidual(nn.Module):
    """MBConv block; adds the input back when shape is unchanged."""

    def __init__(self, spec: InvertedResidualSpec) -> None:
        super().__init__()
        self.residual = spec.residual
        mid = spec.mid_channels
        self.expand = ConvBNAct(spec.in_channels, mid, 1) if spec.expand_ratio != 1 else None
        self.depthwise = ConvBNAct(mid, mid, spec.kernel_size, spec.stride, groups=mid)
        self.project = ConvBNAct(mid, spec.out_channels, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


def split_into_stages(blocks: Sequence[InvertedResidualSpec]) -> list[list[InvertedResidualSpec]]:
    """Group blocks by resolution: a new stage starts at every stride-2 block."""
    stages: list[list[InvertedResidualSpec]] = [[]]
    for spec in blocks:
        if spec.stride == 2 and stages[-1]:
            stages.append([])
        stages[-1].append(spec)
    return stages


class MCUNet(StagedNetwork):
    """Staged MCUNet: ``stem`` (3x3 stride-2 conv) then ``stages[s]`` of inverted residual blocks.

    With ``num_stages`` only the first stages are built (no classifier), for feature extraction.
    """

    def __init__(
        self,
        stem_channels: int,
        blocks: Sequence[InvertedResidualSpec],
        num_classes: int = 1000,
        num_stages: int | None = None,
    ) -> None:
        super().__init__()
        stage_specs = split_into_stages(blocks)
        if num_stages is not None and not 1 <= num_stages <= len(stage_specs):
            raise ValueError(
                f"num_stages={num_stages} is out of range: this MCUNet has {len(stage_specs)} stages "
                f"(give 1..{len(stage_specs)}, or None for the full classifier)"
            )
        built = stage_specs if num_stages is None else stage_specs[:num_stages]
        self.stem = ConvBNAct(3, stem_channels, 3, stride=2)
        self.stages = nn.ModuleList(nn.Sequential(*(InvertedResidual(spec) for spec in specs)) for specs in built)
        self.record_layout(built)
        self.classifier = nn.Linear(stage_specs[-1][-1].out_channels, num_classes) if num_stages is None else None
        self._init_weights()

    def _init_weights(self) -> None:
        # MobileNetV2's scheme: a from-scratch student (STFPM) trains well from it.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)


def build_mcunet(variant: str = "mcunet-in3", **kwargs) -> MCUNet:
    """A published MCUNet by model-zoo name; ``kwargs`` go to :class:`MCUNet` (num_classes, num_stages)."""
    try:
        spec = MCUNET_VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown MCUNet variant {variant!r}; choose one of: {', '.join(MCUNET_VARIANTS)}") from None
    return MCUNet(spec.stem_channels, spec.blocks, **kwargs)


_REFERENCE_LAYER_NAMES = {"expand": "inverted_bottleneck", "depthwise": "depth_conv", "project": "point_linear"}


def reference_key_map(model: MCUNet) -> dict[str, str]:
    """Our state-dict key -> the key of the same tensor in mit-han-lab's ProxylessNASNets."""
    mapping = {}
    block_index = {}  # (stage, position) -> index in the original flat ``blocks`` list
    for s, stage in enumerate(model.stages):
        for j in range(len(stage)):
            block_index[(s, j)] = len(block_index)
    for key in model.state_dict():
        parts = key.split(".")
        if parts[0] == "stem":
            mapping[key] = ".".join(["first_conv", *parts[1:]])
        elif parts[0] == "classifier":
            mapping[key] = ".".join(["classifier", "linear", *parts[1:]])
        else:  # stages.{s}.{j}.{layer}.{conv|bn}.{tensor}
            s, j, layer = int(parts[1]), int(parts[2]), parts[3]
            original = [
                f"blocks.{block_index[(s, j)]}",
                "mobile_inverted_conv",
                _REFERENCE_LAYER_NAMES[layer],
                *parts[4:],
            ]
            mapping[key] = ".".join(original)
    return mapping


def load_reference_state_dict(model: MCUNet, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an official MCUNet checkpoint (ProxylessNASNets key names) into ``model``.

    Every tensor the model needs must be present with its shape. Checkpoint tensors the
    model has no place for are an error for a full model (a different architecture) and
    are skipped for a truncated one (they belong to stages that were not built).
    ``num_batches_tracked`` counters may be absent (older PyTorch checkpoints).
    """
    load_renamed(
        model, state_dict, reference_key_map(model), truncated=model.classifier is None, origin="MCUNet checkpoint"
    )
