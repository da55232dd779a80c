"""The main job, timed: `cvad sweep sweeps/edge.yaml` from nothing (data generation and feature cache included).

Runs the edge sweep as a user would, in a fresh store and a fresh cache folder (so the built-in
data is generated and no frozen feature is reused from an earlier run), then prints each trial's
configuration, outcome and seconds (its own wall time, from MLflow) and the sweep's total wall
time against the 10-minute target.

    python bench/edge_sweep.py [--sweep sweeps/edge.yaml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="sweeps/edge.yaml")
    parser.add_argument("--keep", help="folder for the store and caches (default: a temporary one, removed)")
    args = parser.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="cvad-edge-bench-"))
    env = os.environ | {"CVAD_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cvad", "sweep", args.sweep, "--store", str(root / "runs")]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, text=True)
    total = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the sweep failed (exit {done.returncode})")

    from cvad.selection import load_trials

    trials = load_trials(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    print(f"\n{'trial':>5}  {'configuration':<58} {'outcome':<12} {'pixel F1':>8} {'MB':>7} {'GFLOPs':>7} {'s':>6}")
    for _, row in trials.iterrows():
        outcome = "pruned" if isinstance(row["pruned"], str) else row["status"].lower()
        seconds = "-" if row["wall_seconds"] != row["wall_seconds"] else f"{row['wall_seconds']:.0f}"
        f1 = "-" if row["pixel_f1"] != row["pixel_f1"] else f"{row['pixel_f1']:.3f}"
        print(
            f"{row['trial']:>5}  {row['name']:<58} {outcome:<12} {f1:>8} "
            f"{row['memory_mb']:7.2f} {row['gflops']:7.3f} {seconds:>6}"
        )
    trained = trials["wall_seconds"].sum(skipna=True)
    print(f"\nsweep wall time {total:.0f} s (trials' own {trained:.0f} s, the rest: data, Ray, pricing, logging)")
    print(f"target {TARGET_SECONDS} s: ratio {total / TARGET_SECONDS:.2f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
