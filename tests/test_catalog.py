"""The catalog: one naming of a configuration, titles, and backbone taps that match the networks."""

from __future__ import annotations

import pytest

from cvad import catalog
from cvad.catalog import backbone_title, config_name, method_title


def config(model: str, backbone: str = "mobilenetv2_100", strategy: str = "finetune", replay=None, **params) -> dict:
    return {
        "model": {"name": model, "params": params},
        "backbone": {"name": backbone},
        "strategy": {"name": strategy, "replay_size": replay},
    }


@pytest.mark.parametrize(
    ("nested", "name"),
    [
        (config("patchcore", "mobilenetv2_100", "replay", 40, continual="cl++", bank_size=10000),
         "PatchCoreCL++ 10000 + MobileNetV2, replay 40"),
        (config("patchcore", continual="cl", bank_size=30000), "PatchCoreCL 30000 + MobileNetV2, finetune"),
        (config("patchcore", bank_size=None, bank_ratio=0.1), "PatchCore + MobileNetV2, finetune"),
        (config("padim", covariance="diagonal", continual="multimodal"),
         "PaDiM-Lite multimodal + MobileNetV2, finetune"),
        (config("padim", "mcunet_in3", "joint", covariance="full", continual="refit"), "PaDiM refit + MCUNet, joint"),
        (config("padim"), "PaDiM + MobileNetV2, finetune"),
        (config("paste", strategy="replay", replay=100), "PaSTe + MobileNetV2, replay 100"),
        (config("dinomaly", "deit_tiny_patch16_224"), "Tiny-Dinomaly + DeiT-Tiny, finetune"),
        (config("dinomaly", "vit_base_patch14_dinov2", "replay", 40), "Dinomaly + DINOv2 ViT-B, replay 40"),
        (config("stfpm", "phinet_1.2_0.5_6_downsampling"), "STFPM + PhiNet, finetune"),
        (config("my_method", "my_net"), "my_method + my_net, finetune"),  # names not in the catalog: as they are
        (config("patchcore", continual="cl++", bank_size=10000) | {"compression": {"memory": "pq", "backbone": "int8"}},
         "PatchCoreCL++ 10000 + MobileNetV2, finetune (pq memory, int8 backbone)"),
        (config("paste", strategy="replay", replay=40) | {"compression": {"memory": "fp32", "replay": "jpeg"}},
         "PaSTe + MobileNetV2, replay 40 (jpeg replay)"),
    ],
)  # fmt: skip
def test_config_name_reads_like_the_recommendations(nested, name):
    assert config_name(nested) == name


def test_config_name_of_a_run_config_and_of_logged_params():
    from cvad.config import validate_config

    run = validate_config({"model": {"name": "patchcore", "params": {"continual": "cl++"}}})
    assert config_name(run.to_dict()) == "PatchCoreCL++ 10000 + MobileNetV2, finetune"
    # A trial's MLflow params unflattened: every value as text, a missing replay size shown as such.
    logged = {
        "model": {"name": "patchcore", "params": {"continual": "cl", "bank_size": "None", "bank_ratio": "0.1"}},
        "backbone": {"name": "resnet18"},
        "strategy": {"name": "replay"},
    }
    assert config_name(logged) == "PatchCoreCL + ResNet18, replay ?"


def test_titles_of_known_and_unknown_names():
    assert method_title("paste") == "PaSTe" and method_title("nope") == "nope"
    assert backbone_title("vit_small_patch14_reg4_dinov2") == "DINOv2 ViT-S" and backbone_title("nope") == "nope"


def test_unknown_names_are_refused_with_the_closest_choice():
    assert catalog.METHODS.unknown_message("padimm").endswith("Did you mean 'padim'?")
    assert "mobilenetv2_100" in catalog.BACKBONES.unknown_message("mobilenet")


def test_every_method_entry_names_its_model_and_its_declaration():
    for name in catalog.METHODS:
        entry = catalog.METHODS.get(name)
        model, spec = entry.model_class(), entry.spec_class()
        assert issubclass(model, spec) and model.name == spec.name == name and model.Params is spec.Params


@pytest.mark.parametrize("name", catalog.BACKBONES.names())
def test_listed_taps_are_those_of_the_network(name):
    """Names, channels and strides as a meta-device pass finds them (a wrong ``is_vit`` fails it too)."""
    from cvad.backbones import measure_taps

    assert measure_taps(name) == catalog.taps(name)


def test_resolve_layers_by_stride_and_by_block():
    assert catalog.resolve_layers("mobilenetv2_100", (8, 16)) == (6, 13)
    assert catalog.resolve_layers("mobilenetv2_100", ("blocks.1.1", "blocks.3.3", "blocks.5.0")) == (3, 10, 14)
    with pytest.raises(ValueError, match="did you mean 'layer2.1'"):
        catalog.resolve_layers("resnet18", ("layer2.11",))
