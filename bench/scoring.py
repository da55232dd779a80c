"""PatchCore's and PaDiM's scoring against the plain matmul of the same shape, in the same run.

PatchCore scores an image by finding, for each of its P patch descriptors [P, d], the nearest
of the M bank entries [M, d]: any exact search computes those P x M dot products, so one plain
matmul [P, d] x [d, M] is the floor. Measured: ``nearest`` (the search) and ``score_bank`` (the
search plus the image-score reweighting) at batch 1 (P = 784: a 224 px image at stride 8) and
batch 32. PaDiM (full covariance) scores each position with one d x d whitening matvec: the
floor is the batched matmul [P, d, d] x [P, d, B] of the same shape. Target: every ratio <= 1.5.

    python bench/scoring.py [--bank 10000] [--dim 128] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from cvad.backbones.weights import RandomWeightsWarning
from cvad.models import Setup, build_model
from cvad.models.components.coreset import nearest
from cvad.models.components.gaussian import mahalanobis_full

PATCHES = 28 * 28  # a 224 px image on PatchCore's stride-8 grid
POSITIONS = 56 * 56  # a 224 px image on PaDiM's stride-4 grid
TARGET = 1.5


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in ms after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def row(name: str, measured: float, floor: float, images: int) -> str:
    ratio = measured / floor
    verdict = "ok" if ratio <= TARGET else f"over {TARGET}"
    return f"{name:<44} {measured / images:9.2f} {floor / images:9.2f} {ratio:7.2f}  {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=10_000, help="PatchCore bank entries M")
    parser.add_argument("--dim", type=int, default=128, help="PatchCore descriptor dims d")
    parser.add_argument("--padim-dim", type=int, default=100, help="PaDiM channels d")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(args.bank, args.dim, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        patchcore = build_model("patchcore", {}, Setup("mobilenetv2_100", weights="random"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per image, median of {args.repeats}")
    print(f"{'scoring':<44} {'measured':>9} {'floor':>9} {'ratio':>7}")
    with torch.inference_mode():
        for batch in (1, 32):
            patches = torch.randn(batch, PATCHES, args.dim, generator=generator)
            flat = patches.reshape(-1, args.dim)
            floor = median_ms(lambda flat=flat: flat @ bank.T, args.repeats)
            label = f"PatchCore, {args.bank} x {args.dim}, batch {batch}"
            search = median_ms(lambda flat=flat: nearest(flat, bank), args.repeats)
            print(row(f"{label}: nearest", search, floor, batch))
            whole = median_ms(lambda patches=patches: patchcore.score_bank(patches, bank), args.repeats)
            print(row(f"{label}: score_bank", whole, floor, batch))
        d = args.padim_dim
        mean = torch.randn(POSITIONS, d, generator=generator)
        whitening = torch.randn(POSITIONS, d, d, generator=generator).tril()
        for batch in (1, 32):
            x = torch.randn(batch, POSITIONS, d, generator=generator)
            columns = x.permute(1, 2, 0).contiguous()
            floor = median_ms(lambda columns=columns: whitening @ columns, args.repeats)
            scoring = median_ms(lambda x=x: mahalanobis_full(x, mean, whitening), args.repeats)
            print(row(f"PaDiM full, {POSITIONS} x {d}x{d}, batch {batch}", scoring, floor, batch))


if __name__ == "__main__":
    main()
