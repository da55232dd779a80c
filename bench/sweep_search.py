"""How much of a grid's Pareto front NSGA-II finds with a third of the grid's trials.

1. Runs a grid sweep on the built-in data through the real platform (Optuna, Ray, MLflow),
   or reads a finished grid study (``--study NAME --store DIR``, e.g. the edge sweep).
2. Replays searches over the same space with a budget of a third of the grid's configurations:
   NSGA-II and, as the reference, random sampling, each over several seeds. Trials are
   deterministic (same config and seed, same metrics), so a configuration's objectives are
   looked up from the grid's measured results instead of being trained again; a configuration a
   sampler proposes twice is counted once, as the platform does.
3. Prints the hypervolume (pixel F1 up, MB and GFLOPs down; MB and GFLOPs on log10 scales so that
   halving 4 MB counts like halving 400 MB) of each search's front as a fraction of the grid's.

    python bench/sweep_search.py [--seeds 10] [--study edge --store runs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from cvad.pareto import hypervolume, pareto_front
from cvad.sweep.space import sample
from cvad.sweep.spec import SweepSpec

BENCH_GRID = {
    "sweep": {
        "name": "search-bench-grid",
        "objectives": ["maximize pixel_f1", "minimize memory_mb", "minimize gflops"],
        "resources": {"cpus_per_trial": 1},
    },
    "dataset": {
        "image_size": 128,
        "builtin": {"categories": ["brick", "capsule", "hex_nut"], "train_per_category": 20},
    },
    "measure_latency": False,
    "space": {
        "backbone": {"name": ["mobilenetv2_100", "tf_efficientnet_lite0"]},
        "model": [
            {
                "name": "padim",
                "params": {
                    "covariance": ["full", "diagonal"],
                    "continual": ["unimodal", "multimodal"],
                    "n_features": [50, 100],
                },
            },
            {
                "name": "patchcore",
                "params": {
                    "continual": ["cl", "cl++"],
                    "bank_size": [500, 2000, 8000],
                    "layers": {"choices": [[8, 16], [4, 8]]},
                },
            },
        ],
    },
}


def key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def to_minimised(values: list[float], directions: list[str], log_scale: list[bool]) -> tuple[float, ...]:
    out = []
    for value, direction, log in zip(values, directions, log_scale):
        value = math.log10(value) if log else value
        out.append(-value if direction == "maximize" else value)
    return tuple(out)


def search(
    spec: SweepSpec, lookup: dict[str, list[float]], sampler: optuna.samplers.BaseSampler, budget: int
) -> list[list[float]]:
    """Ask/tell over the space until ``budget`` distinct configurations were evaluated."""
    study = optuna.create_study(directions=spec.directions, sampler=sampler)
    seen: dict[str, list[float]] = {}
    for _ in range(budget * 50):
        if len(seen) >= budget:
            break
        trial = study.ask()
        sample(spec.space, trial, {})
        values = lookup[key(trial.params)]
        seen.setdefault(key(trial.params), values)
        study.tell(trial, values)
    return list(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="read this finished grid study instead of running the bench grid")
    parser.add_argument("--store", type=Path, default=Path("runs"), help="where that study's optuna.db is")
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        if args.study:
            storage, name = f"sqlite:///{args.store.resolve() / 'optuna.db'}", args.study
        else:
            from cvad.sweep.runner import SweepOptions, SweepRunner

            store = Path(tmp)
            spec = SweepSpec(BENCH_GRID)
            print(f"running the bench grid: {len(spec.grid_points)} configurations on the built-in data ...")
            SweepRunner(spec, SweepOptions(store_dir=store), printer=lambda line: None).run()
            storage, name = f"sqlite:///{store / 'optuna.db'}", spec.name
        grid = optuna.load_study(study_name=name, storage=storage)
        spec = SweepSpec(grid.user_attrs["spec"])

    if spec.grid_points is None:
        raise SystemExit(f"study {name!r} is not a grid sweep")
    metrics = [o.metric for o in spec.settings.objectives]
    if set(metrics) != {"pixel_f1", "memory_mb", "gflops"}:
        raise SystemExit(f"study {name!r} must have objectives pixel_f1, memory_mb and gflops (has {metrics})")
    complete = grid.get_trials(states=(TrialState.COMPLETE,))
    lookup = {key(t.params): t.values for t in complete}
    missing = [p for p in spec.grid_points if key(p) not in lookup]
    if missing:
        raise SystemExit(
            f"study {name!r} lacks {len(missing)} of {len(spec.grid_points)} grid points; finish it with --resume first"
        )

    log_scale = [m in ("memory_mb", "gflops") for m in metrics]
    points = [to_minimised(v, spec.directions, log_scale) for v in lookup.values()]
    reference = tuple(
        max(p[i] for p in points) + 0.1 * (max(p[i] for p in points) - min(p[i] for p in points) or 1) for i in range(3)
    )
    grid_hv = hypervolume(points, reference)
    budget = len(spec.grid_points) // 3
    maximize = [d == "maximize" for d in spec.directions]
    front = pareto_front(list(lookup.values()), maximize)
    print(f"grid {name!r}: {len(points)} configurations, {len(front)} on the Pareto front, hypervolume {grid_hv:.4f}")
    print(f"searches with {budget} distinct configurations each (a third of the grid), {args.seeds} seeds:")
    for label, make in (
        ("NSGA-II", lambda s: optuna.samplers.NSGAIISampler(seed=s, population_size=max(4, budget // 3))),
        ("random", lambda s: optuna.samplers.RandomSampler(seed=s)),
    ):
        ratios = []
        for seed in range(args.seeds):
            found = search(spec, lookup, make(seed), budget)
            ratios.append(
                hypervolume([to_minimised(v, spec.directions, log_scale) for v in found], reference) / grid_hv
            )
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        print(
            f"  {label:8s} hypervolume / grid's: mean {statistics.mean(ratios):.3f} +- {spread:.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
