"""The ``cvad`` command line: a thin adapter that prints progress and writes records."""

from __future__ import annotations

import json
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
import yaml

from cvad.backbones.weights import RandomWeightsWarning, WeightsError
from cvad.config import ConfigError, load_config
from cvad.data.base import DatasetError
from cvad.models.components.training import TrainingDivergedError
from cvad.registry import UnknownNameError

cli = typer.Typer(
    help="cvad: choose an anomaly detector for an edge camera that keeps learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USER_ERRORS = (ConfigError, DatasetError, WeightsError, UnknownNameError, FileNotFoundError, TrainingDivergedError)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def fmt(value: float | None, digits: int = 3) -> str:
    return "  -  " if value is None else f"{value:.{digits}f}"


class ProgressPrinter:
    """Prints one line per training step and evaluation, with elapsed time."""

    def __init__(self, total_tasks: int | None = None) -> None:
        self.started = time.perf_counter()
        self.total = total_tasks

    def elapsed(self) -> str:
        return f"{time.perf_counter() - self.started:7.1f}s"

    def __call__(self, event: str, info: dict) -> None:
        if event == "data":
            typer.echo(f"[{self.elapsed()}] {info['message']}")
        elif event == "train_start":
            typer.echo(f"[{self.elapsed()}] step {info['step'] + 1}: training on {info['task']} ({info['images']} images)")
        elif event == "train_epoch":
            typer.echo(f"[{self.elapsed()}]   epoch {info['epoch']}/{info['epochs']}  loss {info['loss']:.4f}")
        elif event == "evaluated":
            m = info["metrics"]
            typer.echo(
                f"[{self.elapsed()}]   eval {info['task']:<16} image F1 {fmt(m['image_f1'])}  AUROC {fmt(m['image_auroc'])}"
                f"  | pixel F1 {fmt(m['pixel_f1'])}  AUROC {fmt(m['pixel_auroc'])}"
            )


def print_summary(result: dict) -> None:
    tasks = result["tasks"]
    width = max(8, max(len(t) for t in tasks) + 1)
    typer.echo("\nPixel F1 after each step (rows) on each task (columns):")
    typer.echo(" " * width + "".join(f"{t[:width - 1]:>{width}}" for t in tasks))
    for t, row in zip(tasks, result["matrices"]["pixel_f1"]):
        if any(v is not None for v in row):
            typer.echo(f"{t[:width - 1]:<{width}}" + "".join(f"{fmt(v):>{width}}" for v in row))
    final, eff, w = result["final"], result["efficiency"], result["weights"]
    typer.echo("\nFinal (average over all tasks after the last step):")
    typer.echo(f"  image F1 {fmt(final['image_f1'])}   image ROC-AUC {fmt(final['image_auroc'])}")
    typer.echo(f"  pixel F1 {fmt(final['pixel_f1'])}   pixel ROC-AUC {fmt(final['pixel_auroc'])}")
    typer.echo(f"  forgetting (pixel F1) {fmt(final['forgetting_pixel_f1'])}")
    print_efficiency(eff)
    if eff["latency_ms"] is None:
        typer.echo("  latency not measured")
    else:
        noisy = "  NOISY: the machine was busy, do not rely on it" if eff["latency_noisy"] else ""
        typer.echo(
            f"  latency {eff['latency_ms']:.1f} ms/image (median of {eff['latency_runs']} batch-1 runs, "
            f"IQR {eff['latency_iqr_ms']:.1f} ms) on {eff['latency_device']}{noisy}"
        )
    if not w["pretrained"]:
        typer.secho("  WEIGHTS: RANDOM (untrained backbone) - these figures do not reflect a pretrained model", fg=typer.colors.RED)
    else:
        typer.echo(f"  weights: {w['source']}")


def print_efficiency(eff: dict) -> None:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in eff["memory_breakdown_mb"].items())
    typer.echo(f"  memory {eff['memory_mb']:.2f} MB ({parts}; MB = 2^20 bytes, {eff['memory_bytes']:,} bytes)")
    typer.echo(f"  {eff['gflops']:.3f} GFLOPs/image (2 x {eff['gmacs']:.4f} G multiply-adds)")
    if eff["uncounted_ops"]:
        typer.echo(f"  not counted (no FLOP rule): {', '.join(eff['uncounted_ops'])}")


@cli.command()
def run(
    config: Path = typer.Argument(..., help="experiment YAML (see configs/)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default runs/<config>-<time>)"),
    overrides: list[str] = typer.Option([], "--set", help="override a config value: --set dataset.image_size=128 (repeatable)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a result.json already in the output folder"),
) -> None:
    """Run one continual experiment and write DIR/result.json.

    Example: cvad run configs/quickstart.yaml --set strategy.name=replay strategy.replay_size=40
    """
    from cvad.trial import run_trial  # heavy imports only when running

    try:
        cfg = load_config(config, overrides)
    except USER_ERRORS as exc:
        fail(str(exc))
    out = out or Path("runs") / f"{config.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if (out / "result.json").exists() and not overwrite:
        fail(f"{out / 'result.json'} already holds a result; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    typer.echo(
        f"cvad run: {cfg.model.name} on {cfg.backbone.name} ({cfg.backbone.weights}), strategy {cfg.strategy.name}, "
        f"dataset {cfg.dataset.name}, seed {cfg.seed} -> {out}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        try:
            result = run_trial(cfg, progress=ProgressPrinter(), output_dir=out)
        except USER_ERRORS as exc:
            fail(str(exc))
    for warning in caught:
        if issubclass(warning.category, RandomWeightsWarning):
            typer.secho(f"WARNING: {warning.message}", fg=typer.colors.RED, err=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print_summary(result)
    typer.echo(f"\nwrote {out / 'result.json'}")


@cli.command()
def cost(
    config: Path = typer.Argument(..., help="experiment YAML, as for cvad run"),
    tasks: Optional[int] = typer.Option(None, "--tasks", min=1, help="price the state after N tasks (default: the config's task count)"),
    overrides: list[str] = typer.Option([], "--set", help="override a config value: --set model.params.bank_size=30000"),
    as_json: bool = typer.Option(False, "--json", help="print the efficiency record as JSON"),
) -> None:
    """Memory by part and GFLOPs of a configuration after N tasks, without data or training.

    The model is built with stored state of the shapes it would hold (banks, Gaussians,
    prototypes, the replay buffer) and measured exactly as a run measures it.

    Example: cvad cost configs/quickstart.yaml --tasks 30 --set strategy.name=finetune
    """
    from cvad.cost import price_config

    try:
        cfg = load_config(config, overrides)
        eff = price_config(cfg, tasks)
    except (*USER_ERRORS, ValueError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(eff, indent=1))
        return
    typer.echo(f"{cfg.model.name} on {cfg.backbone.name} at {cfg.dataset.image_size} px, strategy {cfg.strategy.name}, after {eff['tasks']} task(s):")
    print_efficiency(eff)


@cli.command()
def sweep(
    file: Path = typer.Argument(..., help="sweep YAML (see sweeps/)"),
    overrides: list[str] = typer.Option([], "--set", help="override a value of the sweep file: --set dataset.name=mvtec dataset.root=/data/mvtec"),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", min=1, help="finished trials the sweep should reach (default: the file's, or the whole grid)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the trials a grid would run (or the space) and exit"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep: finished trials are not run again"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in --store)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: CVAD_STUDY_STORAGE, else sqlite in --store)"),
    store: Path = typer.Option(Path("runs"), "--store", help="folder of the local MLflow and Optuna databases and artifacts"),
) -> None:
    """Search a space of configurations: Optuna samples, Ray runs each trial, MLflow records it.

    Example: cvad sweep sweeps/edge.yaml --set dataset.name=mvtec dataset.root=/data/mvtec
    """
    from cvad.sweep.spec import load_sweep

    try:
        spec = load_sweep(file, overrides)
    except USER_ERRORS as exc:
        fail(str(exc))
    if dry_run:
        print_sweep_plan(spec, n_trials)
        return
    from cvad.sweep.runner import SweepError, SweepOptions, SweepRunner
    from cvad.tracking import TrackingError

    store.mkdir(parents=True, exist_ok=True)
    options = SweepOptions(store_dir=store, tracking_uri=tracking_uri, storage=storage, address=address, resume=resume, n_trials=n_trials)
    try:
        outcome = SweepRunner(spec, options, printer=typer.echo).run()
    except (SweepError, TrackingError, *USER_ERRORS) as exc:
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


def print_sweep_plan(spec, n_trials: int | None) -> None:
    import optuna

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
    from cvad.sweep.runner import describe

    total = len(spec.grid_points)
    shown = min(total, spec.n_trials(n_trials))
    typer.echo(f"grid of {total} configurations" + (f" ({shown} will run)" if shown < total else "") + ":")
    for i, point in enumerate(spec.grid_points[:shown]):
        typer.echo(f"  {i:4d}  {describe(spec.config_for(optuna.trial.FixedTrial(point)))}")


def describe_space(node, indent: str = "") -> list[str]:
    from cvad.sweep import space

    if isinstance(node, space.Categorical):
        return [f"{indent}{node.name}: one of {list(node.choices)}"]
    if isinstance(node, space.Numeric):
        scale = "log " if node.log else ""
        step = f" step {node.step}" if node.step else ""
        return [f"{indent}{node.name}: {scale}{node.kind} in [{node.low}, {node.high}]{step}"]
    if isinstance(node, space.Alternatives):
        lines = [f"{indent}{node.name}: one of {list(node.labels)}"]
        for label, branch in zip(node.labels, node.branches):
            inner = describe_space(branch, indent + "    ")
            if inner:
                lines += [f"{indent}  if {label}:", *inner]
        return lines
    if isinstance(node, space.Mapping):
        return [line for child in node.children for line in describe_space(child, indent)]
    return []


def default_tracking_uri_for(store: Path) -> str:
    import os

    from cvad.tracking import default_tracking_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(store)


@cli.command()
def recommend(
    max_mb: Optional[float] = typer.Option(
        None, "--max-mb", help="memory budget in MB of 2^20 bytes (model + stored state + replay buffer)"
    ),
    max_gflops: Optional[float] = typer.Option(
        None, "--max-gflops", help="compute budget in GFLOPs per image (2 x multiply-adds)"
    ),
    min_image_f1: Optional[float] = typer.Option(None, "--min-image-f1", help="keep only trials with at least this image F1"),
    metric: str = typer.Option("pixel_f1", "--metric", help="quality to maximise: pixel_f1, image_f1, pixel_auroc, image_auroc"),
    experiment: list[str] = typer.Option([], "--experiment", help="sweep (MLflow experiment) to read; repeatable; default all"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)"),
    store: Path = typer.Option(Path("runs"), "--store", help="folder of the local MLflow store"),
    as_json: bool = typer.Option(False, "--json", help="print the recommendation as JSON"),
    tasks: Optional[int] = typer.Option(
        None, "--tasks", min=1,
        help="project each trial's memory and GFLOPs to N tasks, e.g. 'best under 20 MB after 30 products'",
    ),
) -> None:
    """The Pareto-optimal trials that fit a budget, best first: what to deploy.

    Example: cvad recommend --max-mb 20 --max-gflops 1 --tasks 30
    """
    from cvad.selection import Budget, SelectionError, load_trials, project_to_tasks
    from cvad.selection import recommend as select
    from cvad.tracking import TrackingError

    uri = tracking_uri or default_tracking_uri_for(store)
    try:
        trials = load_trials(uri, experiment or None)
        if tasks is not None:
            trials = project_to_tasks(trials, tasks)
            for _, row in trials[trials["projection_error"].notna()].iterrows():
                typer.echo(f"{row['sweep']} trial {row['trial']} kept as measured: {row['projection_error']}", err=True)
        rec = select(trials, metric, Budget(max_mb, max_gflops, min_image_f1))
    except (SelectionError, TrackingError) as exc:
        fail(str(exc))
    summary = rec.summary() + (f" (MB and GFLOPs projected to {tasks} tasks)" if tasks is not None else "")
    if as_json:
        answer = {"summary": summary, "metric": metric, "projected_tasks": tasks, "excluded": rec.excluded}
        typer.echo(json.dumps(answer | {"picks": rec.as_records()}, indent=1))
        return
    typer.echo(summary)
    for rank, row in rec.picks.iterrows():
        weights = "" if row["pretrained"] else "  [random weights]"
        measured = "  [as measured: not projected]" if tasks is not None and row["projection_error"] else ""
        typer.echo(
            f"  {rank + 1}. {row['name']:<48} {metric} {row[metric]:.3f}  {row['memory_mb']:8.2f} MB  {row['gflops']:6.3f} GFLOPs"
            f"  ({row['sweep']} trial {row['trial']}){weights}{measured}\n       {row['why']}"
        )
    left_out = ", ".join(f"{n} {reason}" for reason, n in rec.excluded.items() if n)
    if left_out:
        typer.echo(f"left out: {left_out}")


@cli.command()
def dashboard(
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)"),
    store: Path = typer.Option(Path("runs"), "--store", help="folder of the local MLflow store"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8501, "--port"),
) -> None:
    """Open the Streamlit dashboard: Pareto fronts, budget recommendations, continual curves."""
    import subprocess

    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    if not app.is_file():
        fail(f"the dashboard app is missing ({app}); install cvad from its repository (pip install -e .)")
    uri = tracking_uri or default_tracking_uri_for(store)
    command = [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host, "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--", "--tracking-uri", uri,
    ]  # fmt: skip
    typer.echo(f"dashboard on http://{host}:{port} reading {uri}")
    raise typer.Exit(subprocess.call(command))


@cli.command("list")
def list_choices(
    taps_of: Optional[str] = typer.Option(None, "--taps", metavar="BACKBONE", help="list the blocks a method can tap: name, channels, stride"),
) -> None:
    """List the registered models, backbones and datasets (or one backbone's feature taps)."""
    from cvad.backbones import BACKBONES, taps
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
    typer.echo("datasets:  builtin, mvtec, visa, folder")


def expand_set_values(argv: list[str]) -> list[str]:
    """Let ``--set a=1 b=2`` mean ``--set a=1 --set b=2``."""
    expanded, in_set = [], False
    for token in argv:
        if token == "--set":
            in_set = True
            expanded.append(token)
            continue
        if in_set and not token.startswith("-") and "=" in token and expanded[-1] != "--set":
            expanded.append("--set")
        in_set = in_set and not token.startswith("-")
        expanded.append(token)
    return expanded


def app() -> None:
    """Console-script entry point."""
    cli(args=expand_set_values(sys.argv[1:]), prog_name="cvad")
