"""The paper's configurations per backbone, as its efficiency figures imply them.

The paper states its layer choices only loosely; its MB and GFLOPs columns pin them down
(README, "Paper presets", gives the arithmetic). Methods read these tables in their
``PAPER_CONFIG``; ``model.preset: paper`` applies them. Block names are those of
``cvad list --taps BACKBONE``.
"""

from __future__ import annotations

# PatchCore, PaDiM, CFA and SimpleNet: three levels concatenated on the stride-4 grid (56 x 56 at
# 224 px). Widths 248 / 136 / 200 / 1792: PatchCore costs 3,136 x d x 2 FLOPs and d x 4 bytes per bank
# entry, CFA's descriptor and memory follow from the same d (5.73 = 0.45 + 0.39 + 4.88 GFLOPs on
# MobileNetV2), SimpleNet's adaptor and discriminator are d wide, the last tap fixes the backbone.
DESCRIPTOR_LAYERS: dict[str, tuple[str, ...]] = {
    "mobilenetv2_100": ("blocks.1.1", "blocks.3.3", "blocks.5.0"),  # 24 + 64 + 160
    "mcunet_in3": ("stages.1.3", "stages.2.2", "stages.4.0"),  # 16 + 24 + 96
    "phinet_1.2_0.5_6_downsampling": ("stages.1.1", "stages.2.0", "stages.3.0"),  # 32 + 56 + 112
    "wide_resnet50_2": ("layer1.2", "layer2.3", "layer3.5"),  # 256 + 512 + 1024
}

# STFPM and PaSTe: the PaSTe paper's levels; the teacher runs through the deepest one (MobileNetV2's
# first stride-32 block: STFPM = 2 x 2 x 0.2255 G multiply-adds = 0.90 GFLOPs; on PhiNet its stride-16
# block: 2 x 0.537 MB of teacher and student), and PaSTe's student shares every block up to the
# second value (stride 8 on MobileNetV2).
STUDENT_TEACHER_LAYERS: dict[str, tuple[tuple[str, ...], str]] = {
    "mobilenetv2_100": (("blocks.3.0", "blocks.3.3", "blocks.5.0"), "blocks.2.2"),
    "mcunet_in3": (("stages.2.1", "stages.3.2", "stages.4.0"), "stages.2.0"),
    "phinet_1.2_0.5_6_downsampling": (("stages.1.1", "stages.2.0", "stages.3.0"), "stages.1.0"),
}

# PaDiM keeps a random subset of d channels. The paper's MB (Gaussian statistics only: its
# multimodal minus unimodal rows give one task's share exactly) fixes d per covariance on the
# stride-4 grid: MobileNetV2 3,136 x (90 + 90^2) x 4 B = 97.98 MB, diagonal 3,136 x 2 x 130 x 4 B =
# 3.11 MB. For MCUNet and PhiNet no whole d fits exactly: these are the nearest (within 2.2 %).
PADIM_FEATURES: dict[str, dict[str, int]] = {
    "mobilenetv2_100": {"full": 90, "diagonal": 130},
    "mcunet_in3": {"full": 50, "diagonal": 71},
    "phinet_1.2_0.5_6_downsampling": {"full": 73, "diagonal": 105},
    "wide_resnet50_2": {"full": 550, "diagonal": 550},  # the PaDiM paper's WideResNet50 subset
}
