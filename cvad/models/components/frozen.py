"""Outputs of frozen networks for training images, computed once per image.

A trained method (STFPM's teacher, SimpleNet's and CFA's backbone, Dinomaly's encoder) runs a
frozen network on every training image in every epoch; its outputs never change, so the
training loop asks a :class:`FrozenOutputs` instead. Entries are content-addressed: the key is
a digest of the network's weights and of what it returns, plus a digest of the image's bytes,
so the same image seen again (the next epoch, the replay buffer, another trial of a sweep
sharing the folder) is never recomputed, and a different network or image can never hit.

Each image is computed on its own (a batch of one): its features are then the same bits
whichever batch it arrives in, so results are identical with and without a cache, in any
trial order. Entries stay in memory up to ``memory_limit_mb``; past it they live on disk
only (in ``directory``, or a temporary folder removed with the store).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cvad.untrusted import load_untrusted

DEFAULT_MEMORY_LIMIT_MB = 1024


def digest(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def network_digest(module: nn.Module, returns: str) -> str:
    """Identity of a frozen network's function: every parameter and buffer's bytes, and what it returns."""
    parts = [returns]
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        parts += [
            name,
            str(tuple(tensor.shape)),
            str(tensor.dtype),
            tensor.detach().cpu().contiguous().numpy().tobytes(),
        ]
    return digest(*parts)


def extractor_digest(extractor: nn.Module) -> str:
    """Identity of a backbone feature extractor's outputs: its weights and the blocks it returns."""
    return network_digest(extractor, f"feature maps of blocks {list(extractor.tap_names)}")


class FeatureStore:
    """Frozen outputs by key: memory up to a limit, then disk. One per trial, or shared by a sweep's
    trials via ``directory``."""

    def __init__(self, directory: Path | None = None, memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB) -> None:
        self.directory = Path(directory) if directory is not None else None  # None: spill to a temporary folder
        self._spill: tempfile.TemporaryDirectory | None = None
        self.memory_limit = memory_limit_mb * 2**20
        self.memory: dict[str, list[torch.Tensor]] = {}
        self.memory_bytes = 0
        self.computed = self.loaded = 0  # images computed here / read back from disk

    def path(self, key: str) -> Path | None:
        root = self.directory or (Path(self._spill.name) if self._spill else None)
        return None if root is None else root / key[:2] / f"{key}.pt"

    def get(self, key: str) -> list[torch.Tensor] | None:
        if key in self.memory:
            return self.memory[key]
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        self.loaded += 1
        entry = load_untrusted(path, "a cached feature entry", f"the feature cache {path.parent.parent}")
        self._keep(key, entry)
        return entry

    def put(self, key: str, entry: list[torch.Tensor]) -> None:
        self.computed += 1
        kept = self._keep(key, entry)
        if self.directory is None and kept:
            return
        if self.directory is None and self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="cvad-features-")
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(entry, partial)
        os.replace(partial, path)  # atomic: a concurrent reader sees all of it or nothing

    def _keep(self, key: str, entry: list[torch.Tensor]) -> bool:
        size = sum(t.numel() * t.element_size() for t in entry)
        if self.memory_bytes + size > self.memory_limit:
            return False
        self.memory[key] = entry
        self.memory_bytes += size
        return True


class FrozenOutputs:
    """A frozen network's outputs for batches of images, through a :class:`FeatureStore`."""

    def __init__(
        self, compute: Callable[[torch.Tensor], list[torch.Tensor]], identity: str, store: FeatureStore | None
    ) -> None:
        self.compute = compute
        self.identity = identity
        self.store = store or FeatureStore()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        entries = []
        for image in images:
            key = digest(self.identity, str(tuple(image.shape)), image.detach().cpu().contiguous().numpy().tobytes())
            entry = self.store.get(key)
            if entry is None:
                entry = [t.squeeze(0).cpu() for t in self.compute(image.unsqueeze(0))]
                self.store.put(key, entry)
            entries.append(entry)
        return [torch.stack(parts).to(images.device) for parts in zip(*entries)]
