"""Trained methods under fine-tuning, replay 40 / 100 and joint training, on the built-in 5-task stream.

For each method (MobileNetV2 with ImageNet weights; Dinomaly on DeiT-Tiny, run with random weights
where its ImageNet weights are not available offline, flagged in the table), runs the same
``run_trial`` as ``cvad run`` under ``finetune``, ``replay 40``, ``replay 100`` and ``joint`` with
the method's defaults, and prints final image/pixel F1 and ROC-AUC, forgetting, MB (replay buffer
included, as the paper counts it), GFLOPs and training seconds per task. Then, per method, the
targets measured here: under joint, pixel ROC-AUC >= 0.95 and image ROC-AUC >= 0.80; pixel F1
ordered as the paper orders it, finetune < replay 40 <= replay 100 <= joint + 0.02. The runs share
one frozen-feature cache (as a sweep's trials do), so a backbone's features of an image are
computed once.

    python bench/trained_methods.py [--methods stfpm paste ...] [--image-size 224] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

from cvad.config import validate_config
from cvad.trial import run_trial

# Dinomaly needs a ViT: DeiT-Tiny (Tiny-Dinomaly). Its ImageNet weights cannot be fetched offline,
# so here it runs untrained on purpose; the table flags it.
BACKBONES = {"dinomaly": ("deit_tiny_patch16_224", "random")}
STRATEGIES = {
    "finetune": {"name": "finetune"},
    "replay 40": {"name": "replay", "replay_size": 40},
    "replay 100": {"name": "replay", "replay_size": 100},
    "joint": {"name": "joint"},
}


def fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["stfpm", "paste", "simplenet", "cfa", "dinomaly"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", help="also write every result record here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = tempfile.TemporaryDirectory(prefix="cvad-bench-features-")

    rows, records = [], {}
    header = (
        f"{'method':10s} {'strategy':10s} {'img F1':>6s} {'pix F1':>6s} {'img AUC':>7s} {'pix AUC':>7s} "
        f"{'forget':>6s} {'MB':>7s} {'GFLOPs':>6s} {'train s/task':>12s}"
    )
    for method in args.methods:
        for label in args.strategies:
            config = validate_config(
                {
                    "dataset": {"image_size": args.image_size},
                    "model": {"name": method},
                    "backbone": dict(zip(("name", "weights"), BACKBONES.get(method, ("mobilenetv2_100", "imagenet")))),
                    "strategy": STRATEGIES[label],
                    "measure_latency": False,
                }
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                record = run_trial(config, feature_cache=Path(cache.name))
            records[f"{method} {label}"] = record
            final, eff = record.final, record.efficiency
            per_task = record.wall_seconds["train"] / len(record.tasks)  # joint: its one step, per task
            weights = "" if record.weights["pretrained"] else "  (random encoder weights)"
            row = (
                f"{method:10s} {label:10s} {fmt(final['image_f1']):>6s} {fmt(final['pixel_f1']):>6s} "
                f"{fmt(final['image_auroc']):>7s} {fmt(final['pixel_auroc']):>7s} "
                f"{fmt(final['forgetting_pixel_f1']):>6s} {eff['memory_mb']:7.2f} {eff['gflops']:6.3f} "
                f"{per_task:12.1f}{weights}"
            )
            rows.append(row)
            print(row, flush=True)
    print("\n" + header)
    print("\n".join(rows))

    print(
        "\ntargets: joint pixel ROC-AUC >= 0.95 and image ROC-AUC >= 0.80; "
        "pixel F1 finetune < replay 40 <= replay 100 <= joint + 0.02"
    )
    for method in args.methods:
        joint = records.get(f"{method} joint")
        if joint is not None:
            auc = joint.final
            ok = auc["pixel_auroc"] >= 0.95 and auc["image_auroc"] >= 0.80
            print(
                f"  {method:10s} joint: pixel ROC-AUC {auc['pixel_auroc']:.3f}, "
                f"image ROC-AUC {auc['image_auroc']:.3f}: {'met' if ok else 'NOT met'}"
            )
        got = {label: records.get(f"{method} {label}") for label in STRATEGIES}
        if any(v is None for v in got.values()):
            continue
        f1 = {label: r.final["pixel_f1"] for label, r in got.items()}
        ordered = f1["finetune"] < f1["replay 40"] <= f1["replay 100"] <= f1["joint"] + 0.02
        print(
            f"  {method:10s} finetune {f1['finetune']:.3f} < replay 40 {f1['replay 40']:.3f} "
            f"<= replay 100 {f1['replay 100']:.3f} "
            f"<= joint {f1['joint']:.3f} + 0.02: {'met' if ordered else 'NOT met'}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)


if __name__ == "__main__":
    main()
