"""How people read the registered names: each method's and backbone's title in tables, plots and recommendations.

Keyed by the names ``cvad.models.METHODS`` and ``cvad.backbones.BACKBONES`` register; a test holds every
registered name to having a title here. Kept apart from the registries, which import torch and every model,
so that ``cvad recommend`` and the dashboard name trials without them.
"""

from __future__ import annotations

METHOD_TITLES = {
    "padim": "PaDiM",
    "patchcore": "PatchCore",
    "stfpm": "STFPM",
    "paste": "PaSTe",
    "simplenet": "SimpleNet",
    "cfa": "CFA",
    "dinomaly": "Dinomaly",
}
BACKBONE_TITLES = {
    "mobilenetv2_100": "MobileNetV2",
    "mcunet_in3": "MCUNet",
    "phinet_1.2_0.5_6_downsampling": "PhiNet",
    "tf_efficientnet_lite0": "EfficientNet-Lite0",
    "deit_tiny_patch16_224": "DeiT-Tiny",
    "vit_base_patch16_224": "ViT-Base",
    "vit_base_patch14_dinov2": "DINOv2 ViT-B",
    "vit_small_patch14_reg4_dinov2": "DINOv2 ViT-S",
    "resnet18": "ResNet18",
    "wide_resnet50_2": "WideResNet50",
}


def method_title(name: str) -> str:
    """'PaSTe' for 'paste'; an unknown name as it is."""
    return METHOD_TITLES.get(name, name)


def backbone_title(name: str) -> str:
    """'MobileNetV2' for 'mobilenetv2_100'; an unknown name as it is."""
    return BACKBONE_TITLES.get(name, name)
