"""Where and how a run computes: its device and its seeding, shared by training and by loading a fitted detector."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int) -> int:
    """The seed of one stream step's own randomness: a step draws the same numbers whether it runs inside
    ``cvad run`` or as a ``cvad learn`` of a saved detector (nothing random carries over from earlier steps)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use device: cpu or auto")
    return name
