"""Greedy k-center coreset selection at PatchCore's scale, against its arithmetic floor.

Selects k of N descriptors (default 10,000 of 200,000, as PatchCore on a mid-size task)
from real patch descriptors (MobileNetV2 ImageNet, stride-8 + stride-16 stages,
3x3-averaged: 128-d, from built-in images) and, with --noise, Gaussian noise of the
same shape (the worst case for the lazy search: distances concentrate, few bounds can wait).
The reference, measured in the same run on the same data, is k plain matrix-vector
products N x d (500 of them timed, scaled to k): what a farthest-first pass that measures every
point at every pick costs at the least. Ratio < 1 means the lazy search beats that floor. Target
(issue 13): 10,000 of 200,000 real descriptors in under 30 s on 2 cores.

    python bench/kcenter.py [--n 200000] [--k 10000] [--noise]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from cvad.config import validate_config
from cvad.continual.protocol import LoaderSettings, train_batches
from cvad.data import load_task_stream
from cvad.data.base import ImageDataset
from cvad.models import Setup, build_model
from cvad.models.components.coreset import greedy_k_center


def real_descriptors(n: int) -> torch.Tensor:
    """PatchCore descriptors of enough built-in training images to give ``n`` rows."""
    per_image = (224 // 8) ** 2
    images_per_task = -(-n // (per_image * 5))
    config = validate_config(
        {"dataset": {"builtin": {"train_per_category": images_per_task}}, "model": {"name": "patchcore"}}
    )
    model = build_model("patchcore", config.model.params, Setup("mobilenetv2_100"))
    settings = LoaderSettings(224, 16, "cpu", 0, eval_batch_size=4)
    rows = []
    with torch.no_grad():
        for split in load_task_stream(config.dataset).splits:
            for images in train_batches(ImageDataset(split.train, 224), settings, 0):
                rows.append(model.features(images)[0].reshape(-1, 128))
    return torch.cat(rows)[:n]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--noise", action="store_true", help="also time Gaussian noise (slow: nothing prunes)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    print(f"greedy k-center: {args.k} of {args.n} 128-d descriptors, {torch.get_num_threads()} threads")
    sources = {"real patch features": real_descriptors(args.n)}
    if args.noise:
        sources["gaussian noise"] = torch.randn(args.n, 128, generator=torch.Generator().manual_seed(0))
    sampled = min(args.k, 500)
    for name, x in sources.items():
        ours = timed(lambda x=x: greedy_k_center(x, args.k, seed=0, projection_dim=None))
        floor = timed(lambda x=x: [x @ x[i] for i in range(sampled)]) * args.k / sampled
        print(
            f"  {name:<20} cvad {ours:7.2f} s   reference (k matvecs, {sampled} timed) {floor:7.2f} s   "
            f"ratio {ours / floor:5.2f}   target < 30 s: {'met' if ours < 30 else 'missed'}"
        )
    print(
        f"  working memory: {args.n * 128 * 4 / 1e6:.1f} MB of descriptors "
        f"+ {args.n * 12 / 1e6:.1f} MB of per-point state"
    )


if __name__ == "__main__":
    main()
