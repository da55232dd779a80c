"""The sweep platform's overhead: wall time of a sweep of N short trials vs the trials' own time.

Runs N PaDiM trials (one at a time, each with every CPU) through the real platform (Optuna
study in sqlite, local Ray, MLflow in sqlite, overlays and artifacts) and compares:

- the sweep's wall time once Ray is up (the stores' creation, Ray's start and the workers'
  one-time imports are reported separately), with
- the sum of the trials' own ``wall_seconds.total`` (measured inside ``run_trial``).

Overhead = sweep wall / sum of trial walls - 1 (target: under 10 %). It includes worker
start-up (imports), Optuna and MLflow calls, artifact logging and scheduling.

    python bench/sweep_overhead.py [--trials 10] [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import optuna


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from cvad.sweep.runner import SweepOptions, SweepRunner
    from cvad.sweep.spec import SweepSpec

    cpus = os.cpu_count() or 1
    raw = {
        "sweep": {"name": "overhead", "resources": {"cpus_per_trial": cpus}},
        "dataset": {
            "image_size": args.image_size,
            "builtin": {"categories": ["brick", "grass", "capsule"], "train_per_category": 20},
        },
        "model": {"name": "padim"},
        "measure_latency": False,
        "space": {"seed": list(range(args.trials))},
    }
    with tempfile.TemporaryDirectory() as tmp:
        runner = SweepRunner(SweepSpec(raw), SweepOptions(store_dir=Path(tmp)), printer=lambda line: None)
        started = time.perf_counter()
        runner.run()
        sweep_seconds = time.perf_counter() - started - sum(runner.timings.values())
        study = optuna.load_study(study_name="overhead", storage=f"sqlite:///{tmp}/optuna.db")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        own = []
        for trial in study.get_trials():
            run = client.get_run(trial.user_attrs["mlflow_run_id"])
            own.append(run.data.metrics["wall_seconds"])
        ray.shutdown()
    total = sum(own)
    print(f"{args.trials} trials, {args.image_size} px, one at a time on {cpus} CPUs")
    print(
        f"  MLflow and Optuna store set-up    {runner.timings['store_setup']:7.1f} s "
        "(once per sweep, not counted below)"
    )
    print(
        f"  Ray start-up                      {runner.timings['ray_start']:7.1f} s (once per sweep, not counted below)"
    )
    print(
        f"  worker warm-up (imports)          {runner.timings['workers_ready']:7.1f} s "
        "(once per sweep, not counted below)"
    )
    print(f"  sweep wall time after Ray is up   {sweep_seconds:7.1f} s")
    print(f"  sum of the trials' own wall time  {total:7.1f} s (per trial {min(own):.1f}-{max(own):.1f} s)")
    print(f"  overhead                          {sweep_seconds / total - 1:7.1%} (target < 10%)")


if __name__ == "__main__":
    main()
