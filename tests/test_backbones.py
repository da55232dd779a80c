"""Backbone registry and weights: real ImageNet weights offline, loud random weights, fast failures."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata

from cvad.backbones import BACKBONES, FeatureExtractor, resolve_layers, taps
from cvad.backbones.weights import PackagedWeights, RandomWeightsWarning, WeightsError, resolve_weights
from cvad.registry import UnknownNameError


def classify(name: str, image: np.ndarray) -> list[int]:
    """Top-3 ImageNet classes of a real photo through the registry's weight resolution."""
    spec = BACKBONES.get(name)
    model = timm.create_model(spec.timm_name, pretrained=False).eval()
    info = resolve_weights(name, model, "imagenet", hub_id=spec.hub_id, packaged=spec.packaged)
    assert info.kind == "imagenet" and info.source.startswith("package:")
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).topk(3).indices[0].tolist()


@pytest.mark.parametrize("name", ["mobilenetv2_100", "tf_efficientnet_lite0"])
def test_packaged_imagenet_weights_recognise_real_photos(name):
    # ImageNet classes 281-285 are domestic cats; 967 is espresso.
    assert classify(name, skdata.chelsea())[0] in range(281, 286)
    assert classify(name, skdata.coffee())[0] == 967


def test_unknown_backbone_lists_choices():
    with pytest.raises(UnknownNameError, match="mobilenetv2_100"):
        BACKBONES.get("mobilenet_v2")


def test_feature_extractor_keeps_only_needed_stages():
    extractor = FeatureExtractor("mobilenetv2_100", (8, 16), "imagenet")
    maps = extractor(torch.rand(2, 3, 128, 128))
    assert [m.shape[1:] for m in maps] == [(32, 16, 16), (96, 8, 8)]
    full = sum(p.numel() for p in timm.create_model("mobilenetv2_100").parameters())
    kept = sum(p.numel() for p in extractor.parameters())
    assert kept < 0.3 * full  # later stages and the head are not built, hence not stored
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training  # frozen batch-norm statistics


def test_stride_without_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="no block at stride 64"):
        resolve_layers("resnet18", (64,))
    with pytest.raises(ValueError, match="did you mean 'blocks.3.3'"):
        resolve_layers("mobilenetv2_100", ("blocks.3.33",))
    with pytest.raises(ValueError, match="shallowest first"):
        resolve_layers("mobilenetv2_100", (16, 8))


@pytest.mark.parametrize("name", [n for n in BACKBONES.names() if not BACKBONES.get(n).is_vit])
def test_taps_are_known_before_weights_and_match_real_outputs(name):
    """Every block can be tapped; its listed channels and stride are what it really outputs."""
    listed = taps(name)
    names = [tap.name for tap in listed]
    assert names[0] == "stem" and len(set(names)) == len(names)
    assert all(a.stride <= b.stride for a, b in zip(listed, listed[1:]))
    every = FeatureExtractor(name, tuple(names), "random")
    maps = every(torch.rand(1, 3, 128, 128))
    assert [(m.shape[1], 128 // m.shape[-1]) for m in maps] == [(t.channels, t.stride) for t in listed]


def test_block_taps_reach_inside_a_stage():
    # The paper's MobileNetV2 descriptor: 24 + 64 + 160 channels, the last one from the first stride-32 block.
    extractor = FeatureExtractor("mobilenetv2_100", ("blocks.1.1", "blocks.3.3", "blocks.5.0"), "imagenet")
    assert extractor.channels == [24, 64, 160] and extractor.strides == [4, 16, 32]
    assert len(extractor.blocks) == 1 + [t.name for t in taps("mobilenetv2_100")].index("blocks.5.0")
    by_stride = FeatureExtractor("mobilenetv2_100", (4, 16), "imagenet")
    assert by_stride.tap_names == ["blocks.1.1", "blocks.4.2"]  # a stride means the last block at it


def test_random_weights_warn_and_are_recorded():
    with pytest.warns(RandomWeightsWarning, match="RANDOM"):
        extractor = FeatureExtractor("resnet18", (8,), "random")
    assert extractor.weights.as_dict()["pretrained"] is False


def test_missing_imagenet_weights_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAD_WEIGHTS_DIR", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        FeatureExtractor("resnet18", (8,), "imagenet")
    assert time.perf_counter() - started < 20  # never the hub's ~50 s wait
    message = str(info.value)
    assert str(tmp_path / "resnet18.pth") in message and "weights: random" in message


def test_weights_from_user_folder_and_explicit_file(tmp_path, monkeypatch):
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    monkeypatch.setenv("CVAD_WEIGHTS_DIR", str(tmp_path))
    from_folder = FeatureExtractor("resnet18", (8,), "imagenet")
    assert from_folder.weights.source == f"file:{path}"
    from_file = FeatureExtractor("resnet18", (8,), str(path))
    assert from_file.weights.kind == "file" and from_file.weights.sha256
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(from_folder(x)[0], from_file(x)[0])
    with pytest.raises(WeightsError, match="does not exist"):
        FeatureExtractor("resnet18", (8,), str(tmp_path / "nope.pth"))


def test_packaged_file_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    torch.save({}, fake / "w.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = timm.create_model("resnet18", pretrained=False)
    packaged = (PackagedWeights(package="pkg", module="pkg", relative_path="w.pth", sha256="0" * 64),)
    with pytest.raises(WeightsError, match="expected 0000"):
        resolve_weights("resnet18", model, "imagenet", hub_id=None, packaged=packaged)


def test_checkpoint_in_other_naming_maps_by_order(tmp_path):
    reference = timm.create_model("mobilenetv2_100", pretrained=False)
    renamed = {f"net.{i}": v for i, v in enumerate(reference.state_dict().values())}
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    target = timm.create_model("mobilenetv2_100", pretrained=False)
    resolve_weights("mobilenetv2_100", target, str(path), hub_id=None)
    for a, b in zip(reference.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_lists_a_backbones_taps():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "cvad", "list", "--taps", "mobilenetv2_100"], capture_output=True, text=True, check=True
    )
    assert "blocks.5.0" in out.stdout and "160" in out.stdout
