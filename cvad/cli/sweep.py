"""``cvad sweep``: a search over configurations (``cvad.sweep.runner``), or its plan with ``--dry-run``."""

from __future__ import annotations

import itertools
from pathlib import Path

import typer

from cvad.cli.common import cli, fail, user_errors
from cvad.tracking import DEFAULT_STORE

DRY_RUN_LISTED = 5  # configurations a dry run lists of each order of a grid too large to list


@cli.command()
def sweep(
    file: Path = typer.Argument(..., help="sweep YAML (see sweeps/)"),
    overrides: list[str] = typer.Option(
        [], "--set", help="override a value of the sweep file: --set dataset.name=mvtec dataset.root=/data/mvtec"
    ),
    n_trials: int | None = typer.Option(
        None,
        "--n-trials",
        "--max-trials",
        min=1,
        help="finished trials the sweep should reach, over all its --resume sessions (default: the file's "
        "sweep.n_trials, or the whole grid); a grid too large to run whole (--dry-run says) runs only with it, "
        "on that many points drawn at random (sweep.sampler.seed)",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="print the trials a grid would run (a huge one: its size, structure and a sample), or the space, and exit",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue an interrupted sweep: finished trials are not run again"
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)"
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in --store)"
    ),
    storage: str | None = typer.Option(
        None, "--storage", help="Optuna storage URL (default: CVAD_STUDY_STORAGE, else sqlite in --store)"
    ),
    store: Path = typer.Option(
        DEFAULT_STORE, "--store", help="folder of the local MLflow and Optuna databases and artifacts"
    ),
    service_wait: float | None = typer.Option(
        None,
        "--service-wait",
        min=0,
        help="seconds to wait for a lost MLflow server or study database before stopping cleanly, to resume "
        "later (default 120)",
    ),
) -> None:
    """Search a space of configurations: Optuna samples, Ray runs each trial, MLflow records it.

    Example: cvad sweep sweeps/edge.yaml --set dataset.name=mvtec dataset.root=/data/mvtec
    """
    from cvad.config import ConfigError
    from cvad.sweep.spec import load_sweep

    try:
        spec = load_sweep(file, overrides)
        if not dry_run:
            spec.n_trials(n_trials)  # a huge grid without a budget: refused before the store, Ray or the study
    except ConfigError as exc:  # refused before torch is imported
        fail(str(exc))
    if dry_run:
        print_sweep_plan(spec, n_trials)
        return
    from cvad.sweep.runner import SweepError, SweepOptions, SweepRunner
    from cvad.tracking import TrackingError

    store.mkdir(parents=True, exist_ok=True)
    options = SweepOptions(
        store_dir=store,
        tracking_uri=tracking_uri,
        storage=storage,
        address=address,
        resume=resume,
        n_trials=n_trials,
        **({} if service_wait is None else {"service_wait": service_wait}),
    )
    try:
        outcome = SweepRunner(spec, options, printer=typer.echo).run()
    except (SweepError, TrackingError, *user_errors()) as exc:
        fail(str(exc))
    typer.echo(
        f"\nsweep {outcome.study_name}: {outcome.completed} trial(s) completed, {outcome.failed} failed, "
        f"{outcome.pruned} pruned before training (over the constraints)"
    )
    for trial in outcome.best[:10]:
        values = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(spec.settings.objectives, trial.values))
        typer.echo(f"  best: trial {trial.number}  {trial.user_attrs.get('label', '')}  ({values})")
    uri = options.resolved_tracking_uri()
    typer.echo(f"browse the runs: mlflow ui --backend-store-uri {uri}")
    if outcome.interrupted:
        raise typer.Exit(130)
    failures = outcome.failure_summary()
    if outcome.all_failed:  # no result to choose from: a failure, not a finished sweep
        typer.secho(
            f"error: {failures}\nthe runs in MLflow hold each trial's full error", fg=typer.colors.RED, err=True
        )
        raise typer.Exit(1)
    if failures:
        typer.secho(f"warning: {failures}", fg=typer.colors.YELLOW, err=True)
    if outcome.warnings:
        listed = "\n  ".join(outcome.warnings)
        typer.secho(
            f"warning: {len(outcome.warnings)} thing(s) were not written (each run tagged cvad.warning):\n  {listed}",
            fg=typer.colors.YELLOW,
            err=True,
        )


def print_sweep_plan(spec, n_trials: int | None) -> None:
    from cvad.sweep.space import describe_space

    settings = spec.settings
    objectives = ", ".join(f"{o.direction} {o.metric}" for o in settings.objectives)
    typer.echo(f"sweep {spec.name}: sampler {settings.sampler.name}, objectives: {objectives}")
    if settings.constraints.active:
        typer.echo(f"constraints: max_mb={settings.constraints.max_mb}, max_gflops={settings.constraints.max_gflops}")
    if spec.grid_points is None:
        typer.echo(f"{spec.n_trials(n_trials)} trials sampled from this space:")
        for line in describe_space(spec.space):
            typer.echo("  " + line)
        return
    if spec.needs_budget:
        print_huge_grid(spec, n_trials)
        return
    total = len(spec.grid_points)
    shown = min(total, spec.n_trials(n_trials))
    typer.echo(f"grid of {total:,} configurations" + (f" ({shown:,} will run)" if shown < total else "") + ":")
    for index in range(shown):
        typer.echo(point_line(spec, index))


def print_huge_grid(spec, n_trials: int | None) -> None:
    """A grid too large to list: its size, its structure and a few of its points, named, of each order."""
    from cvad.config import ConfigError
    from cvad.sweep.space import describe_space

    total = len(spec.grid_points)
    typer.echo(f"grid of {total:,} configurations:")
    for line in describe_space(spec.space):
        typer.echo("  " + line)
    seed = spec.settings.sampler.seed
    try:
        budget = spec.n_trials(n_trials)
        typer.echo(f"{min(budget, total):,} of them will run, drawn at random (seed {seed})")
    except ConfigError as exc:
        typer.echo(f"a run is refused without a budget: {exc}")
    typer.echo(f"the first {DRY_RUN_LISTED} configurations of the grid:")
    for index in range(min(DRY_RUN_LISTED, total)):
        typer.echo(point_line(spec, index))
    typer.echo(f"the first {DRY_RUN_LISTED} drawn at random (seed {seed}), the first to run with a budget:")
    for index in itertools.islice(spec.run_order(), DRY_RUN_LISTED):
        typer.echo(point_line(spec, index))


def point_line(spec, index: int) -> str:
    """A grid point's index and configuration name; one the covering validation missed says why its trial fails."""
    import optuna

    from cvad.catalog import config_name
    from cvad.config import ConfigError

    try:
        name = config_name(spec.config_for(optuna.trial.FixedTrial(spec.grid_points[index])).to_dict())
    except ConfigError as exc:
        name = f"invalid, its trial would fail before running: {' '.join(str(exc).split())}"
    return f"  {index:>9,}  {name}"
