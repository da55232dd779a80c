"""What compression saves and what it costs, each figure beside its fp32 / raw counterpart measured in the same run.

On two streams at 224 px, MobileNetV2 (the edge sweep's settings): the built-in 5-task stream, and
a stream of five real-photo textures (GIMP's slate, paper, walnut, veneer and paving patterns).
Per stream, each a `cvad run` in this process, one after another:

1. PatchCoreCL++ 10000 with its banks kept as fp32, int8 and pq (``compression.memory``): the bank's
   stored bytes (codes, scales, codebooks) and the final pixel F1; targets int8 <= 0.26 x the fp32
   bank with pixel F1 within 0.005, pq <= 0.1 x with pixel F1 within 0.02;
2. PaSTe with a 40-image replay buffer kept raw and as JPEG (``compression.replay``, default quality),
   seeds 0 and 1 (a trained method's pixel F1 moves with the seed): the buffer's stored bytes and the
   final pixel F1; target <= 0.2 x the raw buffer, pixel F1 within 0.02 (mean over the seeds);
3. the fp32 PatchCoreCL++ detector exported by `cvad export --precision int8` (ONNX Runtime static
   quantization, verified on the run's test images) against its own fp32 export: batch-1 latency and
   the largest per-task image ROC-AUC drop; target >= 1.5 x faster, drop <= 0.01.

With ``--edge-store`` (the MLflow store `bench/edge_sweep.py --keep DIR` left, DIR/runs/mlflow.db) it also
reads the edge sweep's answer: the best pixel F1 under 2 MB against the best under 20 MB (target >= 0.95).

    python bench/compression.py [--streams builtin photos] [--keep DIR] [--edge-store DIR/runs/mlflow.db]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvad.compression import CompressionConfig
from cvad.config import validate_config
from cvad.trial import run_trial

STREAMS = {
    "builtin": {},  # the default five categories
    "photos": {"builtin": {"categories": ["slate", "paper", "walnut", "veneer", "paving"]}},
}
PATCHCORE = {"model": {"name": "patchcore", "params": {"continual": "cl++", "bank_size": 10000}}}
PASTE = {"model": {"name": "paste"}, "strategy": {"name": "replay", "replay_size": 40}}
REPLAY_SEEDS = (0, 1)
TARGETS = {
    "int8": (0.26, 0.005),  # bank bytes ratio at most, pixel F1 drop at most
    "pq": (0.1, 0.02),
    "jpeg": (0.2, 0.02),
    "export_speedup": 1.5,
    "export_auroc_drop": 0.01,
    "edge_ratio": 0.95,
}


def run_config(stream: str, cache: Path, features: Path, out: Path, compression: dict, method: dict, seed: int = 0):
    """A TrialRecord of one configuration on one stream, and the seconds it took."""
    raw = {
        "seed": seed,
        "dataset": {"image_size": 224, "cache_dir": str(cache), **STREAMS[stream]},
        "backbone": {"name": "mobilenetv2_100"},
        "strategy": {"name": "finetune"},
        "compression": compression,
        "measure_latency": False,
    } | method
    started = time.perf_counter()
    record = run_trial(validate_config(raw), output_dir=out, feature_cache=features)
    return record, time.perf_counter() - started


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def memory_figures(stream: str, cache: Path, work: Path) -> tuple[list[str], Path]:
    """Bank and replay rows for one stream, and the fp32 PatchCore run's folder (for the export figures)."""
    lines, features = [], work / "features"
    runs = {}
    for memory in ("fp32", "int8", "pq"):
        runs[memory] = run_config(stream, cache, features, work / f"{stream}-patchcore-{memory}", {"memory": memory},
                                  PATCHCORE)  # fmt: skip
    base_record, base_s = runs["fp32"]
    base_bank = base_record.efficiency["memory_bytes_by_part"]["memory_bank"]
    base_f1 = base_record.final["pixel_f1"]
    lines.append(f"  PatchCoreCL++ 10000 fp32 bank: {base_bank:,} B, pixel F1 {base_f1:.4f} ({base_s:.0f} s)")
    for memory in ("int8", "pq"):
        record, seconds = runs[memory]
        bank = record.efficiency["memory_bytes_by_part"]["memory_bank"]
        ratio, drop = bank / base_bank, base_f1 - record.final["pixel_f1"]
        max_ratio, max_drop = TARGETS[memory]
        lines.append(
            f"  {memory:4s} bank: {bank:,} B = {ratio:.3f} x fp32 (target <= {max_ratio}), pixel F1 "
            f"{record.final['pixel_f1']:.4f}, drop {drop:+.4f} (target <= {max_drop}) ({seconds:.0f} s): "
            f"{verdict(ratio <= max_ratio and drop <= max_drop)}"
        )
    raw_bytes, jpeg_bytes, drops = 0, 0, []
    for seed in REPLAY_SEEDS:  # a trained method's pixel F1 moves with the seed: the drop is a mean over seeds
        raw, raw_s = run_config(stream, cache, features, work / f"{stream}-paste-raw-{seed}", {}, PASTE, seed)
        jpeg, jpeg_s = run_config(stream, cache, features, work / f"{stream}-paste-jpeg-{seed}", {"replay": "jpeg"},
                                  PASTE, seed)  # fmt: skip
        raw_bytes = raw.efficiency["memory_bytes_by_part"]["replay_buffer"]
        jpeg_bytes = max(jpeg_bytes, jpeg.efficiency["memory_bytes_by_part"]["replay_buffer"])
        drops.append(raw.final["pixel_f1"] - jpeg.final["pixel_f1"])
        lines.append(
            f"  PaSTe replay 40, seed {seed}: raw buffer {raw_bytes:,} B, pixel F1 {raw.final['pixel_f1']:.4f} "
            f"({raw_s:.0f} s); jpeg buffer {jpeg.efficiency['memory_bytes_by_part']['replay_buffer']:,} B, "
            f"pixel F1 {jpeg.final['pixel_f1']:.4f} ({jpeg_s:.0f} s)"
        )
    ratio, drop = jpeg_bytes / raw_bytes, sum(drops) / len(drops)
    max_ratio, max_drop = TARGETS["jpeg"]
    lines.append(
        f"  jpeg buffer (quality {CompressionConfig().replay_quality}): at most {ratio:.3f} x raw (target <= "
        f"{max_ratio}), pixel F1 drop {drop:+.4f} averaged over seeds {list(REPLAY_SEEDS)} (target <= {max_drop}): "
        f"{verdict(ratio <= max_ratio and drop <= max_drop)}"
    )
    return lines, work / f"{stream}-patchcore-fp32"


def exported(run: Path, precision: str) -> dict:
    """`cvad export RUN --precision P` as a command of its own; its report (the JSON beside the file)."""
    out = run / f"detector-{precision}.onnx"
    command = [sys.executable, "-m", "cvad", "export", str(run), "--format", "onnx", "--precision", precision,
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(Path(f"{out}.json").read_text())


def export_figures(run: Path) -> list[str]:
    report = exported(run, "int8")
    speedup = report["fp32_latency_ms"] / report["latency_ms"]
    drop = max(task["drop"]["image_auroc"] for task in report["accuracy"])
    ok = speedup >= TARGETS["export_speedup"] and drop <= TARGETS["export_auroc_drop"]
    return [
        f"  int8 ONNX export: {report['file_bytes']:,} B ({report['file_bytes'] / report['fp32_file_bytes']:.3f} x "
        f"fp32's {report['fp32_file_bytes']:,} B), batch-1 latency {report['latency_ms']:.2f} ms against fp32's "
        f"{report['fp32_latency_ms']:.2f} ms = {speedup:.2f} x faster (target >= {TARGETS['export_speedup']}), "
        f"largest image ROC-AUC drop {drop:+.4f} (target <= {TARGETS['export_auroc_drop']}): {verdict(ok)}"
    ]


def edge_figure(store: Path) -> list[str]:
    """The edge sweep's best pixel F1 under 2 MB against its best under 20 MB (``cvad recommend``'s own selection)."""
    from cvad.selection import Budget, load_trials, recommend

    trials = load_trials(f"sqlite:///{store}")
    small, large = (recommend(trials, "pixel_f1", Budget(max_mb=mb)).picks for mb in (2.0, 20.0))
    if small.empty or large.empty:
        return [f"  edge sweep ({store}): no trial under {'2' if small.empty else '20'} MB"]
    small, large = small.iloc[0], large.iloc[0]
    ratio = small["pixel_f1"] / large["pixel_f1"]
    return [
        f"  edge sweep: best under 2 MB {small['name']} ({small['memory_mb']:.2f} MB) pixel F1 {small['pixel_f1']:.4f};"
        f" best under 20 MB {large['name']} ({large['memory_mb']:.2f} MB) pixel F1 {large['pixel_f1']:.4f}; "
        f"ratio {ratio:.3f} (target >= {TARGETS['edge_ratio']}): {verdict(ratio >= TARGETS['edge_ratio'])}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    parser.add_argument("--keep", help="folder for the runs and caches (default: a temporary one, removed)")
    parser.add_argument("--edge-store", type=Path, help="mlflow.db of a kept edge sweep (bench/edge_sweep.py --keep)")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cvad-bench-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for stream in args.streams:
            print(f"{stream} stream (5 tasks, 224 px, MobileNetV2):", flush=True)
            lines, fp32_run = memory_figures(stream, work / "data", work)
            print("\n".join(lines), flush=True)
            print("\n".join(export_figures(fp32_run)), flush=True)
        if args.edge_store:
            print("\n".join(edge_figure(args.edge_store)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
