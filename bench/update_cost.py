"""What learning the next product costs on the device: `cvad learn` against the same step inside `cvad run`.

Per method (each as the edge sweep configures it), on the built-in data at 224 px:

1. `cvad run` over a stream of N tasks (default 15, every built-in category it needs): each step's
   update (fit, buffer, calibration) seconds and peak memory rise, i.e. how the cost grows along the
   stream, and step N, the reference;
2. `cvad run` over the first N - 1 tasks, then `cvad learn` of task N as a command of its own, timed
   whole (process start, imports, loading the detector and the data, the step, evaluation, writing).

It prints the growth table and, per method, the learn command's wall seconds against the reference
step's update + evaluation inside `cvad run`: target `cvad learn` <= 1.1 x that step + 3 s of loading.
The loading it reports is split into what any fresh process pays to import torch and timm (timed
here as `python -c "import torch, timm"`) and the rest (cvad's imports, the detector, the data
listing, writing the folder). Each command runs alone, one after another (the 2 cores are shared by
everything started).

    python bench/update_cost.py [--tasks 15] [--methods padim patchcore stfpm] [--size 224] [--keep DIR]
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

import yaml

from cvad.data.builtin import BUILTIN_CATEGORIES
from cvad.record import TrialRecord

# Each method as the edge sweep runs it (sweeps/edge.yaml), MobileNetV2.
METHODS = {
    "padim": {"model": {"name": "padim", "params": {"covariance": "diagonal", "continual": "multimodal"}}},
    "patchcore": {"model": {"name": "patchcore", "params": {"continual": "cl++", "bank_size": 10000}}},
    "paste": {"model": {"name": "paste"}, "strategy": {"name": "replay", "replay_size": 40}},
    "stfpm": {"model": {"name": "stfpm"}, "strategy": {"name": "replay", "replay_size": 40}},
    "simplenet": {"model": {"name": "simplenet"}, "strategy": {"name": "replay", "replay_size": 40}},
    "cfa": {"model": {"name": "cfa"}, "strategy": {"name": "replay", "replay_size": 40}},
}
RATIO_TARGET, LOADING_TARGET_S = 1.1, 3.0


def config(method: str, tasks: list[str], size: int, cache: Path) -> dict:
    return {
        "dataset": {"image_size": size, "builtin": {"categories": tasks}, "cache_dir": str(cache)},
        "backbone": {"name": "mobilenetv2_100"},
        "strategy": {"name": "finetune"},
        "measure_latency": False,
    } | METHODS[method]


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=15)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keep", help="folder for runs and data (default: a temporary one, removed)")
    args = parser.parse_args()
    categories = list(BUILTIN_CATEGORIES)[: args.tasks]
    if len(categories) < args.tasks:
        sys.exit(f"the built-in data has {len(categories)} categories; ask for at most that many tasks")

    root = Path(args.keep or tempfile.mkdtemp(prefix="cvad-update-bench-"))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "CVAD_CACHE": str(root / "cache")}
    cvad = [sys.executable, "-m", "cvad"]
    imports = min(timed([sys.executable, "-c", "import torch, timm"], env) for _ in range(3))
    summary = []
    for method in args.methods:
        folder = root / method
        folder.mkdir(parents=True, exist_ok=True)
        # The whole stream first: it generates the data, so the commands after it find it in the cache.
        for name, tasks in (("whole", categories), ("first", categories[:-1])):
            path = folder / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config(method, tasks, args.size, root / "data")))
            timed([*cvad, "run", str(path), "--out", str(folder / name)], env)
        learn_wall = timed(
            [*cvad, "learn", str(folder / "first"), "--task", categories[-1], "--out", str(folder / "next")], env
        )
        whole = TrialRecord.read(folder / "whole" / "result.json")
        learned = TrialRecord.read(folder / "next" / "result.json")

        print(f"\n{method}: each step of `cvad run` over {args.tasks} tasks ({args.size} px)")
        print(
            f"  {'step':>4} {'task':<10} {'images':>6} {'update s':>9} {'peak rise MB':>13} {'state MB':>9} "
            f"{'eval s':>7}"
        )
        for step in whole.steps:
            print(
                f"  {step.step + 1:>4} {step.trained_on:<10} {step.train_images:>6} {step.train_seconds:9.2f} "
                f"{step.update_peak_mb:13.1f} {step.update_state_mb:9.2f} {step.eval_seconds:7.2f}"
            )
        reference, mine = whole.steps[-1], learned.steps[-1]
        inside = reference.train_seconds + reference.eval_seconds
        loading = learn_wall - mine.train_seconds - mine.eval_seconds
        same = learned.matrices == whole.matrices
        print(
            f"  cvad learn {categories[-1]}: {learn_wall:.2f} s whole command (update {mine.train_seconds:.2f} s, eval "
            f"{mine.eval_seconds:.2f} s, loading and writing {loading:.2f} s) vs step {args.tasks} inside cvad run "
            f"{inside:.2f} s (update {reference.train_seconds:.2f} s, eval {reference.eval_seconds:.2f} s); "
            f"matrices equal: {same}"
        )
        print(f"  of the loading, {imports:.2f} s is importing torch and timm (a bare process, best of 3)")
        summary.append((method, learn_wall, inside, mine.train_seconds / reference.train_seconds, loading, same))

    print(
        f"\n{'method':<10} {'learn s':>8} {'step in run s':>14} {'update ratio':>13} {'loading s':>10} "
        f"{'beyond imports':>15}  target"
    )
    for method, learn_wall, inside, ratio, loading, same in summary:
        met = learn_wall <= RATIO_TARGET * inside + LOADING_TARGET_S and same
        print(
            f"{method:<10} {learn_wall:8.2f} {inside:14.2f} {ratio:13.2f} {loading:10.2f} {loading - imports:15.2f}  "
            f"{'met' if met else 'MISSED'}"
        )
    print(f"target: cvad learn <= {RATIO_TARGET} x the step inside cvad run + {LOADING_TARGET_S:g} s, same matrices")
    print(f"(importing torch and timm alone takes {imports:.2f} s in a fresh process here)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
