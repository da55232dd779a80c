"""How a model is run to be measured, shared by FLOP counting and latency.

Both run ``forward`` on the same seeded image, in eval mode, after checking that the model is on
the device asked for; memory accounting reads stored tensors and runs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_PROBE_SEED = 0


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode, then give every submodule back its own training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != device.type or (device.index is not None and tensor.device != device):
            raise ValueError(
                f"model tensor {name!r} is on {tensor.device}, but device={device}; "
                f"move the model first with model.to({str(device)!r})"
            )


def _probe_image(image_size: int, channels: int, device: torch.device) -> torch.Tensor:
    """One seeded float image in [0, 1], shape [1, C, S, S]."""
    if image_size < 1 or channels < 1:
        raise ValueError(f"image_size and channels must be positive, got {image_size} and {channels}")
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.rand((1, channels, image_size, image_size), generator=generator).to(device)
