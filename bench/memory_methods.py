"""PaDiM and PatchCore families on the built-in 5-task stream (MobileNetV2, ImageNet weights).

Runs every continual variant through the same `run_trial` that `cvad run` uses and prints
a table of the final averages, forgetting, routing accuracy, MB and GFLOPs, then the
comparisons the paper makes, as ratios measured in this run:

- PatchCoreCL vs CL++ scoring GFLOPs (total minus the backbone's own), expected ~T;
- PaDiM unimodal vs multimodal memory, lite vs full;
- PaDiM unimodal vs original when task sizes differ (the case the exact merge fixes).

    python bench/memory_methods.py [--bank 10000] [--image-size 224] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

from cvad.backbones import FeatureExtractor
from cvad.config import validate_config
from cvad.efficiency import count_gflops
from cvad.trial import run_trial

UNEQUAL = {"brick": 60, "capsule": 10, "grass": 40, "hex_nut": 8, "gravel": 30}


def variants(bank: int) -> dict[str, dict]:
    padim = lambda cov, cl: {"name": "padim", "params": {"covariance": cov, "continual": cl}}  # noqa: E731
    patchcore = lambda cl: {"name": "patchcore", "params": {"continual": cl, "bank_size": bank}}  # noqa: E731
    return {
        "PaDiM joint (upper bound)": {"model": padim("full", "refit"), "strategy": {"name": "joint"}},
        "PaDiM finetune (refit)": {"model": padim("full", "refit")},
        "PaDiM original": {"model": padim("full", "original")},
        "PaDiM unimodal": {"model": padim("full", "unimodal")},
        "PaDiM multimodal": {"model": padim("full", "multimodal")},
        "PaDiM lite-unimodal": {"model": padim("diagonal", "unimodal")},
        "PaDiM lite-multimodal": {"model": padim("diagonal", "multimodal")},
        "PatchCore joint (upper bound)": {"model": patchcore("refit"), "strategy": {"name": "joint"}},
        "PatchCore finetune (refit)": {"model": patchcore("refit")},
        "PatchCoreCL": {"model": patchcore("cl")},
        "PatchCoreCL++": {"model": patchcore("cl++")},
    }


def run(raw: dict, image_size: int, train_sizes: int | dict = 30) -> dict:
    raw = {
        "dataset": {"image_size": image_size, "builtin": {"train_per_category": train_sizes}},
        "strategy": {"name": "finetune"},
        **raw,
    }
    return run_trial(validate_config(raw))


def fmt(value) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=10_000, help="PatchCore total bank size B")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", help="also write every result record here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    results = {}
    print(
        "| variant | image F1 | pixel F1 | image AUROC | pixel AUROC | "
        "forgetting pF1 | routing | MB | GFLOPs | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, raw in variants(args.bank).items():
        started = time.perf_counter()
        result = results[name] = run(raw, args.image_size)
        f, e = result.final, result.efficiency
        print(
            f"| {name} | {fmt(f['image_f1'])} | {fmt(f['pixel_f1'])} | {fmt(f['image_auroc'])} "
            f"| {fmt(f['pixel_auroc'])} | {fmt(f['forgetting_pixel_f1'])} | {fmt(f['routing_accuracy'])} "
            f"| {e['memory_mb']:.2f} | {e['gflops']:.3f} | {result['wall_seconds']['train']:.1f} |",
            flush=True,
        )
        result["bench_seconds"] = time.perf_counter() - started

    backbone = FeatureExtractor("mobilenetv2_100", (8, 16), "imagenet")
    backbone_gflops = count_gflops(backbone, args.image_size).gflops
    cl = results["PatchCoreCL"].efficiency["gflops"] - backbone_gflops
    clpp = results["PatchCoreCL++"].efficiency["gflops"] - backbone_gflops
    mb = {name: r.efficiency["memory_mb"] for name, r in results.items()}
    print("\nRatios measured in this run:")
    print(
        f"  PatchCoreCL / CL++ scoring GFLOPs (backbone {backbone_gflops:.3f} excluded): "
        f"{cl:.3f} / {clpp:.3f} = {cl / clpp:.2f}  (T = 5)"
    )
    print(f"  PaDiM multimodal / unimodal MB: {mb['PaDiM multimodal'] / mb['PaDiM unimodal']:.2f}")
    print(f"  PaDiM lite-multimodal / lite-unimodal MB: {mb['PaDiM lite-multimodal'] / mb['PaDiM lite-unimodal']:.2f}")
    print(f"  PaDiM unimodal / lite-unimodal MB: {mb['PaDiM unimodal'] / mb['PaDiM lite-unimodal']:.2f}")

    print(f"\nUnequal task sizes {UNEQUAL}:")
    for rule in ("original", "unimodal"):
        result = results[f"unequal {rule}"] = run(
            {"model": {"name": "padim", "params": {"continual": rule}}}, args.image_size, UNEQUAL
        )
        f = result.final
        print(
            f"  PaDiM {rule:<9} image F1 {fmt(f['image_f1'])}  pixel F1 {fmt(f['pixel_f1'])}  "
            f"pixel AUROC {fmt(f['pixel_auroc'])}"
        )

    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
