"""Frozen networks' outputs computed once per training image: the same results with and without a cache."""

from __future__ import annotations

import pytest
import torch

from cvad.config import validate_config
from cvad.models.components.frozen import FeatureStore, FrozenOutputs, network_digest
from cvad.trial import run_trial
from support import tiny_config


def counting(network: torch.nn.Module):
    calls = []

    def compute(images: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(images))
        return [network(images)]

    return compute, calls


def test_each_image_is_computed_once_and_spills_past_the_memory_limit(tmp_path):
    network = torch.nn.Conv2d(3, 4, 3).eval()
    compute, calls = counting(network)
    store = FeatureStore(memory_limit_mb=4 * 6 * 6 * 4 * 3 / 2**20)  # room for three images' outputs
    frozen = FrozenOutputs(compute, network_digest(network, "conv"), store)
    images = torch.rand(5, 3, 8, 8)
    first = frozen(images)[0]
    for _ in range(3):  # later epochs, shuffled
        order = torch.randperm(5)
        assert torch.equal(frozen(images[order])[0], first[order])
    assert calls == [1] * 5  # one image at a time, each once
    assert store.computed == 5 and len(store.memory) == 3 and store.loaded > 0  # two live on disk
    with torch.no_grad():
        assert torch.allclose(first, network(images), atol=1e-6)  # a batch of five may round differently


def test_backbones_that_return_different_blocks_never_share_entries():
    from cvad.backbones import FeatureExtractor
    from cvad.models.components.frozen import extractor_digest

    # The same weights up to stride 16, but different blocks returned.
    shallow, deep = (FeatureExtractor("mobilenetv2_100", layers, "imagenet") for layers in ((8, 16), (4, 8, 16)))
    assert extractor_digest(shallow) != extractor_digest(deep)
    assert extractor_digest(shallow) == extractor_digest(FeatureExtractor("mobilenetv2_100", (8, 16), "imagenet"))


def test_a_different_network_or_image_never_hits(tmp_path):
    a, b = torch.nn.Conv2d(3, 4, 3).eval(), torch.nn.Conv2d(3, 4, 3).eval()
    assert network_digest(a, "conv") != network_digest(b, "conv")
    assert network_digest(a, "conv") != network_digest(a, "conv, other taps")
    store = FeatureStore(tmp_path)
    images = torch.rand(2, 3, 8, 8)
    out_a = FrozenOutputs(lambda x: [a(x)], network_digest(a, "conv"), store)(images)[0]
    out_b = FrozenOutputs(lambda x: [b(x)], network_digest(b, "conv"), store)(images)[0]
    assert not torch.equal(out_a, out_b)
    reopened = FeatureStore(tmp_path)  # a later trial of the sweep: read back from disk
    compute, calls = counting(a)
    assert torch.equal(FrozenOutputs(compute, network_digest(a, "conv"), reopened)(images)[0], out_a)
    assert calls == [] and reopened.loaded == 2


@pytest.mark.slow
def test_a_run_is_the_same_with_and_without_the_shared_cache(builtin_cache, tmp_path):
    raw = tiny_config(
        builtin_cache,
        dataset={"batch_size": 4, "builtin": {"categories": ["brick", "hex_nut"], "train_per_category": 4}},
        model={"name": "simplenet", "params": {"steps": 6}},
        strategy={"name": "replay", "replay_size": 3},
    )
    config = validate_config(raw)
    alone = run_trial(config)
    filling = run_trial(config, feature_cache=tmp_path / "features")
    reading = run_trial(config, feature_cache=tmp_path / "features")
    assert any((tmp_path / "features").rglob("*.pt"))
    for record in (filling, reading):
        assert record.matrices == alone.matrices
