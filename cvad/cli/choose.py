"""``cvad recommend``, ``cvad dashboard`` and ``cvad list``: what to deploy, and what can be chosen."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import get_args

import typer

from cvad.cli.common import cli, fail
from cvad.metrics import QUALITY_METRICS
from cvad.registry import UnknownNameError
from cvad.tracking import DEFAULT_STORE, resolve_tracking_uri


@cli.command()
def recommend(
    max_mb: float | None = typer.Option(
        None, "--max-mb", help="memory budget in MB of 2^20 bytes (model + stored state + replay buffer)"
    ),
    max_gflops: float | None = typer.Option(
        None, "--max-gflops", help="compute budget in GFLOPs per image (2 x multiply-adds)"
    ),
    min_image_f1: float | None = typer.Option(
        None, "--min-image-f1", help="keep only trials with at least this image F1"
    ),
    max_update_s: float | None = typer.Option(
        None, "--max-update-s", help="keep only trials whose largest training step (an update) took at most this"
    ),
    max_update_mb: float | None = typer.Option(
        None, "--max-update-mb", help="keep only trials whose largest update raised peak memory by at most this"
    ),
    metric: str = typer.Option("pixel_f1", "--metric", help=f"quality to maximise: {', '.join(QUALITY_METRICS)}"),
    experiment: list[str] = typer.Option(
        [], "--experiment", help="sweep (MLflow experiment) to read; repeatable; default all"
    ),
    stream: int | None = typer.Option(
        None,
        "--stream",
        min=1,
        help="rank only task stream N (a dataset and its ordered task list), numbered as listed when the trials span "
        "several; default: each stream ranked on its own",
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)"
    ),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="folder of the local MLflow store"),
    as_json: bool = typer.Option(False, "--json", help="print the recommendation as JSON"),
    tasks: int | None = typer.Option(
        None,
        "--tasks",
        min=1,
        help="project each trial's memory and GFLOPs to N tasks, e.g. 'best under 20 MB after 30 products'",
    ),
    register: str | None = typer.Option(
        None, "--register", help="export the top pick to ONNX, verify it and register it in MLflow under this name"
    ),
) -> None:
    """The Pareto-optimal trials that fit a budget, best first: what to deploy.

    Trials of different task streams (dataset and ordered task list) are never ranked together: each gets its own.

    Example: cvad recommend --max-mb 20 --max-gflops 1 --tasks 30
    """
    from cvad.selection import (
        Budget,
        SelectionError,
        chosen_streams,
        load_trials,
        of_stream,
        project_to_tasks,
        recommend_streams,
    )  # fmt: skip
    from cvad.tracking import TrackingError

    uri = resolve_tracking_uri(tracking_uri, store)
    try:
        trials = load_trials(uri, experiment or None)
        chosen = chosen_streams(trials, stream)  # before any pricing: a wrong --stream is refused at once
        if tasks is not None:
            trials = project_to_tasks(trials, tasks)
            for _, row in trials[trials["projection_error"].notna()].iterrows():
                typer.echo(f"{row['sweep']} trial {row['trial']} kept as measured: {row['projection_error']}", err=True)
        recs = recommend_streams(
            trials, chosen, metric, Budget(max_mb, max_gflops, min_image_f1, max_update_s, max_update_mb)
        )
    except (SelectionError, TrackingError) as exc:
        fail(str(exc))
    projected = f" (MB and GFLOPs projected to {tasks} tasks)" if tasks is not None else ""
    if as_json:
        answers = [
            {"summary": rec.summary() + projected, "metric": metric, "projected_tasks": tasks, "excluded": rec.excluded}
            | {"stream": rec.stream.as_record() | {"number": n}, "picks": rec.as_records()}
            for n, rec in recs
        ]  # one stream: its answer; several: one answer each
        several = {"metric": metric, "projected_tasks": tasks, "streams": answers}
        typer.echo(json.dumps(answers[0] if len(answers) == 1 else several, indent=1))
    else:
        if len(recs) > 1:
            typer.echo(
                f"these trials ran on {len(recs)} task streams, each ranked on its own (rank one only: --stream N)"
            )
        for n, rec in recs:
            if len(recs) > 1:
                typer.echo(f"\nstream {n}: {rec.stream.describe()}, {len(of_stream(trials, rec.stream))} trial(s)")
            print_recommendation(rec, projected, tasks is not None)
    if register:
        if len(recs) > 1:
            fail("--register exports one top pick: choose its task stream with --stream N")
        if recs[0][1].picks.empty:
            fail("--register: no trial fits the budget, so there is nothing to export")
        top = recs[0][1].picks.iloc[0]
        typer.echo(f"\nexporting the top pick ({top['sweep']} trial {top['trial']}, run {top['run_id']})")
        from cvad.cli.deploy import export_and_register

        export_and_register(top["run_id"], "onnx", None, "uint8", register, uri)


def print_recommendation(rec, projected: str, projecting: bool) -> None:
    """One recommendation (a ``cvad.selection.Recommendation``): the summary, the picks with why, what was left out."""
    metric = rec.metric
    typer.echo(rec.summary() + projected)
    for rank, row in rec.picks.iterrows():
        weights = "" if row["pretrained"] else "  [random weights]"
        measured = "  [as measured: not projected]" if projecting and row["projection_error"] else ""
        typer.echo(
            f"  {rank + 1}. {row['name']:<48} {metric} {row[metric]:.3f}  {row['memory_mb']:8.2f} MB  "
            f"{row['gflops']:6.3f} GFLOPs"
            f"  ({row['sweep']} trial {row['trial']}){weights}{measured}\n       {row['why']}"
        )
    left_out = ", ".join(f"{n} {reason}" for reason, n in rec.excluded.items() if n)
    if left_out:
        typer.echo(f"left out: {left_out}")


@cli.command()
def dashboard(
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)"
    ),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="folder of the local MLflow store"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8501, "--port"),
) -> None:
    """Open the Streamlit dashboard: Pareto fronts, budget recommendations, continual curves."""
    import subprocess

    app = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
    if not app.is_file():
        fail(f"the dashboard app is missing ({app}); install cvad from its repository (pip install -e .)")
    uri = resolve_tracking_uri(tracking_uri, store)
    command = [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host, "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",  # a results viewer: no Streamlit "Deploy" button or developer menu
        "--", "--tracking-uri", uri,
    ]  # fmt: skip
    typer.echo(f"dashboard on http://{host}:{port} reading {uri}")
    raise typer.Exit(subprocess.call(command))


@cli.command("list")
def list_choices(
    taps_of: str | None = typer.Option(
        None, "--taps", metavar="BACKBONE", help="list the blocks a method can tap: name, channels, stride"
    ),
) -> None:
    """List the registered models, backbones and datasets (or one backbone's feature taps)."""
    from cvad.backbones import BACKBONES, taps
    from cvad.config import DatasetConfig
    from cvad.models import METHODS

    if taps_of is not None:
        try:
            listed = taps(taps_of)
        except UnknownNameError as exc:
            fail(str(exc))
        typer.echo(f"{taps_of}: blocks a method can tap (model.params.layers), shallowest first")
        typer.echo(f"  {'block':<14}{'channels':>9}{'stride':>8}")
        for tap in listed:
            typer.echo(f"  {tap.name:<14}{tap.channels:>9}{tap.stride:>8}")
        typer.echo("a stride in layers means the last block at that stride")
        return
    typer.echo("models (params and defaults):")
    for name in METHODS.names():
        defaults = METHODS.get(name).Params().model_dump(mode="json")
        typer.echo(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    typer.echo("backbones: " + ", ".join(BACKBONES.names()))
    typer.echo("datasets:  " + ", ".join(get_args(DatasetConfig.model_fields["name"].annotation)))
