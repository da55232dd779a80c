"""What cvad knows of its methods and backbones without building one: names, titles, where the code lives.

Imports no torch, timm or model: config validation, ``cvad recommend`` and the dashboard read it at
once. A method's entry names the class of its model (torch) and of its declaration (``cvad.methods``:
parameters, paper preset, setup checks; torch-free), each imported only when asked for. A backbone's
entry holds the facts validation needs before any weight exists: whether it is a ViT, and its taps
(every block a method can read, with channels and stride). ``cvad.models.METHODS`` and
``cvad.backbones.BACKBONES`` build what is named here; tests hold the two equal, taps included.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cvad.registry import Registry


def load(path: str) -> Any:
    """The object at ``"package.module:Name"``, importing its module now."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class MethodEntry:
    name: str  # config model.name
    title: str  # how tables, plots and recommendations name it
    model: str  # "module:Class" of its AnomalyModel (imports torch)
    spec: str  # "module:Class" of its torch-free declaration (a cvad.methods.base.MethodSpec)

    def model_class(self) -> type:
        return load(self.model)

    def spec_class(self) -> type:
        return load(self.spec)


@dataclass(frozen=True)
class Tap:
    """A block whose output a method can read: where it is, how wide and how coarse."""

    name: str  # e.g. "blocks.3.2" (timm EfficientNet family), "layer2.1" (ResNet), "stages.2.0" (MCUNet, PhiNet)
    channels: int
    stride: int  # input pixels per feature cell


Layers = tuple[int | str, ...]  # feature taps as methods take them: a stride, or a block name


@dataclass(frozen=True)
class BackboneEntry:
    name: str  # config backbone.name
    title: str
    is_vit: bool
    taps: tuple[Tap, ...]  # execution order; cvad.backbones.measure_taps computes them from the network


def cnn(layout: str, first: int, stem: tuple[int, int], *stages: tuple[int, tuple[int, ...]]) -> tuple[Tap, ...]:
    """A CNN's taps: the stem (channels, stride), then per stage (stride, channels of each block);
    ``layout`` names block j of stage i (numbered from ``first``)."""
    taps = [Tap("stem", *stem)]
    for i, (stride, widths) in enumerate(stages, first):
        taps += [Tap(layout.format(i, j), width, stride) for j, width in enumerate(widths)]
    return tuple(taps)


def vit(depth: int, width: int, patch: int) -> tuple[Tap, ...]:
    """A ViT's taps: its transformer blocks, all at the patch stride."""
    return tuple(Tap(f"blocks.{i}", width, patch) for i in range(depth))


METHODS: Registry[MethodEntry] = Registry("model")
BACKBONES: Registry[BackboneEntry] = Registry("backbone")

for _entry in (
    MethodEntry("padim", "PaDiM", "cvad.models.padim:PaDiM", "cvad.methods.padim:PaDiMSpec"),
    MethodEntry("patchcore", "PatchCore", "cvad.models.patchcore:PatchCore", "cvad.methods.patchcore:PatchCoreSpec"),
    MethodEntry("stfpm", "STFPM", "cvad.models.stfpm:STFPM", "cvad.methods.stfpm:STFPMSpec"),
    MethodEntry("paste", "PaSTe", "cvad.models.paste:PaSTe", "cvad.methods.paste:PaSTeSpec"),
    MethodEntry("simplenet", "SimpleNet", "cvad.models.simplenet:SimpleNet", "cvad.methods.simplenet:SimpleNetSpec"),
    MethodEntry("cfa", "CFA", "cvad.models.cfa:CFA", "cvad.methods.cfa:CFASpec"),
    MethodEntry("dinomaly", "Dinomaly", "cvad.models.dinomaly:Dinomaly", "cvad.methods.dinomaly:DinomalySpec"),
):
    METHODS.register(_entry.name)(_entry)

_EFFICIENTNET, _STAGED, _RESNET = "blocks.{}.{}", "stages.{}.{}", "layer{}.{}"
for _entry in (
    BackboneEntry(
        "mobilenetv2_100", "MobileNetV2", False,
        cnn(_EFFICIENTNET, 0, (32, 2), (2, (16,)), (4, (24,) * 2), (8, (32,) * 3), (16, (64,) * 4),
            (16, (96,) * 3), (32, (160,) * 3), (32, (320,))),
    ),
    BackboneEntry(
        "tf_efficientnet_lite0", "EfficientNet-Lite0", False,
        cnn(_EFFICIENTNET, 0, (32, 2), (2, (16,)), (4, (24,) * 2), (8, (40,) * 2), (16, (80,) * 3),
            (16, (112,) * 3), (32, (192,) * 4), (32, (320,))),
    ),
    BackboneEntry(
        "mcunet_in3", "MCUNet", False,
        cnn(_STAGED, 0, (16, 2), (2, (8,)), (4, (16,) * 4), (8, (24,) * 3), (16, (40,) * 3 + (48,) * 3),
            (32, (96,) * 3 + (160,))),
    ),
    BackboneEntry(
        "phinet_1.2_0.5_6_downsampling", "PhiNet", False,
        cnn(_STAGED, 0, (56, 2), (2, (32,)), (4, (32,) * 2), (8, (56,)), (16, (112,)), (32, (232,) * 2),
            (64, (464,))),
    ),
    BackboneEntry(
        "resnet18", "ResNet18", False,
        cnn(_RESNET, 1, (64, 4), (4, (64,) * 2), (8, (128,) * 2), (16, (256,) * 2), (32, (512,) * 2)),
    ),
    BackboneEntry(
        "wide_resnet50_2", "WideResNet50", False,
        cnn(_RESNET, 1, (64, 4), (4, (256,) * 3), (8, (512,) * 4), (16, (1024,) * 6), (32, (2048,) * 3)),
    ),
    BackboneEntry("deit_tiny_patch16_224", "DeiT-Tiny", True, vit(12, 192, 16)),
    BackboneEntry("vit_base_patch16_224", "ViT-Base", True, vit(12, 768, 16)),
    BackboneEntry("vit_base_patch14_dinov2", "DINOv2 ViT-B", True, vit(12, 768, 14)),
    BackboneEntry("vit_small_patch14_reg4_dinov2", "DINOv2 ViT-S", True, vit(12, 384, 14)),
):  # fmt: skip
    BACKBONES.register(_entry.name)(_entry)
del _entry


def method_title(name: str) -> str:
    """'PaSTe' for 'paste'; an unknown name as it is."""
    return METHODS.get(name).title if name in METHODS else name


def backbone_title(name: str) -> str:
    """'MobileNetV2' for 'mobilenetv2_100'; an unknown name as it is."""
    return BACKBONES.get(name).title if name in BACKBONES else name


def taps(name: str) -> tuple[Tap, ...]:
    """Every block of a backbone a method can tap, in execution order, with its channels and stride."""
    return BACKBONES.get(name).taps


def resolve_layers(name: str, layers: Layers) -> tuple[int, ...]:
    """Indices into ``taps(name)`` of the requested feature layers, shallowest first.

    An integer asks for the last block at that stride (the end of that resolution stage);
    a string names a block (``cvad list --taps BACKBONE`` lists them).
    """
    available = taps(name)
    names = [tap.name for tap in available]
    strides = sorted({tap.stride for tap in available})
    picked = []
    for layer in layers:
        if isinstance(layer, int):
            matches = [i for i, tap in enumerate(available) if tap.stride == layer]
            if not matches:
                raise ValueError(f"backbone {name} has no block at stride {layer}; its strides are {strides}")
            picked.append(matches[-1])
        elif layer in names:
            picked.append(names.index(layer))
        else:
            close = difflib.get_close_matches(str(layer), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"backbone {name} has no block {layer!r}{hint}; its blocks are {', '.join(names)}")
    if any(later <= earlier for earlier, later in zip(picked, picked[1:])):
        raise ValueError(f"feature layers {list(layers)} of {name} must be distinct and ordered shallowest first")
    return tuple(picked)


def config_name(config: Mapping[str, Any]) -> str:
    """How people read a configuration: 'PatchCoreCL++ 10000 + MobileNetV2, replay 40'.

    ``config`` is the nested run config (``RunConfig.to_dict()``, or a trial's MLflow params unflattened):
    its ``model`` (``name``, ``params``), ``backbone.name``, ``strategy`` (``name``, ``replay_size``) and what
    ``compression`` does not keep as fp32 / raw.
    PaDiM is named by covariance and continual rule, PatchCore by variant and bank size, Dinomaly on
    DeiT-Tiny is Tiny-Dinomaly.
    """
    model = config.get("model") or {}
    method, params = model.get("name", ""), model.get("params") or {}
    backbone = (config.get("backbone") or {}).get("name", "")
    title = method_title(method)
    if method == "padim":
        title = (
            "PaDiM-Lite" if params.get("covariance") == "diagonal" else "PaDiM"
        ) + f" {params.get('continual', '')}"
        title = title.rstrip()
    elif method == "patchcore":
        variant = {"cl": "CL", "cl++": "CL++"}.get(params.get("continual"), "")
        bank = params.get("bank_size")
        title = f"PatchCore{variant} {bank}" if bank not in (None, "None") else f"PatchCore{variant}"
    elif method == "dinomaly" and backbone == "deit_tiny_patch16_224":
        title = "Tiny-Dinomaly"
    strategy = config.get("strategy") or {}
    rule = strategy.get("name") or ""
    if rule == "replay":
        rule = f"replay {strategy.get('replay_size', '?')}"
    return f"{title} + {backbone_title(backbone)}, {rule}{compression_label(config.get('compression') or {})}"


def compression_label(compression: Mapping[str, Any]) -> str:
    """' (int8 memory, jpeg replay, int8 backbone)' for what is not stored as fp32 / raw; empty for none of it."""
    kept = [
        f"{compression[key]} {what}"
        for key, what, plain in (
            ("memory", "memory", "fp32"),
            ("replay", "replay", "raw"),
            ("backbone", "backbone", "fp32"),
        )
        if compression.get(key, plain) not in (plain, None, "None")
    ]
    return f" ({', '.join(kept)})" if kept else ""
