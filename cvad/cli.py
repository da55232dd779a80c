"""The ``cvad`` command line: a thin adapter that prints progress and writes records."""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import get_args

import typer
import yaml

from cvad.metrics import DETECTION_METRICS
from cvad.progress import DataReady, Progress, TaskEvaluated, TrainPass, TrainStarted
from cvad.registry import UnknownNameError
from cvad.tracking import DEFAULT_STORE, resolve_tracking_uri

# Module-level imports stay light (no torch, timm, Ray, Optuna or models): `cvad --help` and
# `cvad recommend` must start at once; each command imports what it needs (tests/test_cli_startup.py).

cli = typer.Typer(
    help="cvad: choose an anomaly detector for an edge camera that keeps learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors() -> tuple[type[Exception], ...]:
    """What a command reports in one line, without a traceback (their modules import torch: called on failure only)."""
    from cvad.backbones.weights import WeightsError
    from cvad.config import ConfigError
    from cvad.data.base import DatasetError
    from cvad.models.components.training import TrainingDivergedError

    return (ConfigError, DatasetError, WeightsError, UnknownNameError, FileNotFoundError, TrainingDivergedError)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def fmt(value: float | None, digits: int = 3) -> str:
    return "  -  " if value is None else f"{value:.{digits}f}"


class ProgressPrinter:
    """Prints one line per training step, training pass and evaluation, with elapsed time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> str:
        return f"{time.perf_counter() - self.started:7.1f}s"

    def __call__(self, event: Progress) -> None:
        match event:
            case DataReady(message=message):
                typer.echo(f"[{self.elapsed()}] {message}")
            case TrainStarted(step=step, task=task, images=images):
                typer.echo(f"[{self.elapsed()}] step {step + 1}: training on {task} ({images} images)")
            case TrainPass(number=number, passes=passes, loss=loss):
                typer.echo(f"[{self.elapsed()}]   epoch {number}/{passes}  loss {loss:.4f}")
            case TaskEvaluated(task=task, metrics=m):
                typer.echo(
                    f"[{self.elapsed()}]   eval {task:<16} image F1 {fmt(m['image_f1'])}  AUROC {fmt(m['image_auroc'])}"
                    f"  | pixel F1 {fmt(m['pixel_f1'])}  AUROC {fmt(m['pixel_auroc'])}"
                )


def print_summary(result: dict) -> None:
    tasks = result["tasks"]
    width = max(8, max(len(t) for t in tasks) + 1)
    typer.echo("\nPixel F1 after each step (rows) on each task (columns):")
    typer.echo(" " * width + "".join(f"{t[: width - 1]:>{width}}" for t in tasks))
    for t, row in zip(tasks, result["matrices"]["pixel_f1"]):
        if any(v is not None for v in row):
            typer.echo(f"{t[: width - 1]:<{width}}" + "".join(f"{fmt(v):>{width}}" for v in row))
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
        typer.secho(
            "  WEIGHTS: RANDOM (untrained backbone) - these figures do not reflect a pretrained model",
            fg=typer.colors.RED,
        )
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
    out: Path | None = typer.Option(None, "--out", "-o", help="output folder (default runs/<config>-<time>)"),
    overrides: list[str] = typer.Option(
        [], "--set", help="override a config value: --set dataset.image_size=128 (repeatable)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a result.json already in the output folder"),
    keep_detector: bool = typer.Option(
        True, "--detector/--no-detector", help="keep the fitted detector as DIR/detector.pt (for cvad export)"
    ),
) -> None:
    """Run one continual experiment and write DIR/result.json (and the fitted detector, DIR/detector.pt).

    Example: cvad run configs/quickstart.yaml --set strategy.name=replay strategy.replay_size=40
    """
    from cvad.backbones.weights import RandomWeightsWarning
    from cvad.config import load_config
    from cvad.trial import RECORD_FILE, RecordWriteError, run_trial, write_atomic  # heavy imports only when running

    try:
        cfg = load_config(config, overrides)
    except user_errors() as exc:
        fail(str(exc))
    out = out or DEFAULT_STORE / f"{config.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    replacing = prepare_output(out, overwrite)
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if not replacing:  # beside an earlier result, the new config waits for the new record
        write_atomic(out / "config.yaml", config_text)
    typer.echo(
        f"cvad run: {cfg.model.name} on {cfg.backbone.name} ({cfg.backbone.weights}), strategy {cfg.strategy.name}, "
        f"dataset {cfg.dataset.name}, seed {cfg.seed} -> {out}"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        try:
            result = run_trial(cfg, progress=ProgressPrinter(), output_dir=out, keep_detector=keep_detector)
        except (*user_errors(), RecordWriteError) as exc:
            fail(str(exc))
    for warning in caught:
        if issubclass(warning.category, RandomWeightsWarning):
            typer.secho(f"WARNING: {warning.message}", fg=typer.colors.RED, err=True)
    if replacing:
        write_atomic(out / "config.yaml", config_text)
    print_summary(result)
    for warning in result["warnings"]:
        typer.secho(f"WARNING: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"\nwrote {out / RECORD_FILE}")
    if "detector" in result:
        typer.echo(
            f"wrote {out / result['detector']['file']} ({result['detector']['mb']:.2f} MB; the frozen backbone is "
            f"reloaded from its weights); deploy it: cvad export {out} --format onnx"
        )


def prepare_output(out: Path, overwrite: bool) -> bool:
    """Refuse an output folder that cannot take the result before any work starts; True when a result is replaced."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder (it is created if missing)")
    replacing = (out / "result.json").exists()
    if replacing and not overwrite:
        fail(f"{out / 'result.json'} already holds a result; choose another --out or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        fail(f"cannot write into --out {out} ({exc.strerror or exc}); choose a folder you can write to")
    return replacing


@cli.command()
def cost(
    config: Path = typer.Argument(..., help="experiment YAML, as for cvad run"),
    tasks: int | None = typer.Option(
        None, "--tasks", min=1, help="price the state after N tasks (default: the config's task count)"
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="override a config value: --set model.params.bank_size=30000"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the efficiency record as JSON"),
) -> None:
    """Memory by part and GFLOPs of a configuration after N tasks, without data or training.

    The model is built with stored state of the shapes it would hold (banks, Gaussians,
    prototypes, the replay buffer) and measured exactly as a run measures it.

    Example: cvad cost configs/quickstart.yaml --tasks 30 --set strategy.name=finetune
    """
    from cvad.config import load_config
    from cvad.cost import price_config

    try:
        cfg = load_config(config, overrides)
        eff = price_config(cfg, tasks)
    except (*user_errors(), ValueError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(eff, indent=1))
        return
    typer.echo(
        f"{cfg.model.name} on {cfg.backbone.name} at {cfg.dataset.image_size} px, strategy {cfg.strategy.name}, "
        f"after {eff['tasks']} task(s):"
    )
    print_efficiency(eff)


@cli.command()
def sweep(
    file: Path = typer.Argument(..., help="sweep YAML (see sweeps/)"),
    overrides: list[str] = typer.Option(
        [], "--set", help="override a value of the sweep file: --set dataset.name=mvtec dataset.root=/data/mvtec"
    ),
    n_trials: int | None = typer.Option(
        None,
        "--n-trials",
        min=1,
        help="finished trials the sweep should reach (default: the file's, or the whole grid)",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the trials a grid would run (or the space) and exit"),
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
) -> None:
    """Search a space of configurations: Optuna samples, Ray runs each trial, MLflow records it.

    Example: cvad sweep sweeps/edge.yaml --set dataset.name=mvtec dataset.root=/data/mvtec
    """
    from cvad.sweep.spec import load_sweep

    try:
        spec = load_sweep(file, overrides)
    except user_errors() as exc:
        fail(str(exc))
    if dry_run:
        print_sweep_plan(spec, n_trials)
        return
    from cvad.sweep.runner import SweepError, SweepOptions, SweepRunner
    from cvad.tracking import TrackingError

    store.mkdir(parents=True, exist_ok=True)
    options = SweepOptions(
        store_dir=store, tracking_uri=tracking_uri, storage=storage, address=address, resume=resume, n_trials=n_trials
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
    metric: str = typer.Option("pixel_f1", "--metric", help=f"quality to maximise: {', '.join(DETECTION_METRICS)}"),
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
    from cvad.selection import Budget, SelectionError, load_trials, of_stream, project_to_tasks, streams
    from cvad.selection import recommend as select
    from cvad.tracking import TrackingError

    uri = resolve_tracking_uri(tracking_uri, store)
    try:
        trials = load_trials(uri, experiment or None)
        found = streams(trials)
        if stream is not None and stream > len(found):
            listed = "; ".join(f"{n}. {s.describe()}" for n, s in enumerate(found, 1))
            fail(f"--stream {stream}: these trials ran on {len(found)} task stream(s), choose one of: {listed}")
        chosen = list(enumerate(found, 1)) if stream is None else [(stream, found[stream - 1])]
        if tasks is not None:
            trials = project_to_tasks(trials, tasks)
            for _, row in trials[trials["projection_error"].notna()].iterrows():
                typer.echo(f"{row['sweep']} trial {row['trial']} kept as measured: {row['projection_error']}", err=True)
        budget = Budget(max_mb, max_gflops, min_image_f1)
        recs = [(n, select(of_stream(trials, s), metric, budget)) for n, s in chosen]
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


@cli.command("export")
def export_command(
    source: str = typer.Argument(..., help="a `cvad run` folder, a detector.pt, or a trial's MLflow run id"),
    file_format: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="file to write (default: beside the detector, or runs/exports/RUN_ID/)"
    ),
    input_kind: str = typer.Option("uint8", "--input", help="what the file takes: uint8 (0-255) or float (0-1) images"),
    register: str | None = typer.Option(
        None, "--register", help="also log the export as a model of the run and register a version under this name"
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)"
    ),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="folder of the local MLflow store"),
) -> None:
    """Export a fitted detector to one file for the device, verified against PyTorch on the run's test images.

    The file takes an image batch [B, 3, S, S] and returns image scores [B] and anomaly maps [B, S, S]: the
    whole path (backbone, heads, scoring, task routing). Example: cvad export runs/quickstart-... --format onnx
    """
    if file_format not in ("onnx", "torchscript"):
        fail(f"--format {file_format!r}: choose onnx or torchscript")
    if input_kind not in ("uint8", "float"):
        fail(f"--input {input_kind!r}: choose uint8 or float")
    uri = resolve_tracking_uri(tracking_uri, store)
    export_and_register(source, file_format, out, input_kind, register, uri)


def export_and_register(
    source: str, file_format: str, out: Path | None, input_kind: str, register: str | None, uri: str
) -> None:
    """What ``cvad export`` and ``cvad recommend --register`` do for one detector."""
    from cvad.data import DatasetError
    from cvad.deployment import DeploymentError, log_export, register_export, resolve_source
    from cvad.detector import DetectorError, load_detector
    from cvad.export import ExportError, export_detector, verification_images

    try:
        found = resolve_source(source, uri)
        detector = load_detector(found.detector)
        typer.echo(f"cvad export: {found.detector} ({detector.model.name}, tasks {', '.join(detector.tasks)})")
        images = verification_images(detector)
        report = export_detector(detector, file_format, out or found.default_output(file_format), images, input_kind)
        log_export(found, report)
    except (DeploymentError, DetectorError, ExportError, DatasetError) as exc:
        fail(str(exc))
    Path(f"{report.path}.json").write_text(json.dumps(report.as_dict(), indent=1))
    print_export(report, found.record)
    if register:
        example = images[:1].numpy() if input_kind == "uint8" else images[:1].float().numpy() / 255
        version = register_export(found, report, example, register, uri)
        typer.echo(f"registered {register} version {version} at {uri}")


def print_export(report, record: dict | None) -> None:
    """The export beside the trial's own figures: size, stored tensors, verification, latency."""
    weights = ", ".join(f"{dtype} {n / 2**20:.3g} MB" for dtype, n in report.weights_bytes_by_dtype.items())
    eff = record["efficiency"] if record else {}
    lines = [
        f"wrote {report.path} ({report.format}, input {report.input})",
        f"  file        {report.file_mb:8.3f} MB  (stored tensors: {weights})",
        f"  verified on {report.images_checked} test images: max |diff| scores {report.max_abs_diff_scores:.2g} "
        f"(tolerance {report.tolerance_scores:.2g}), maps {report.max_abs_diff_maps:.2g} "
        f"(tolerance {report.tolerance_maps:.2g})",
        f"  latency     {report.latency_ms:8.2f} ms at batch 1 ({report.threads} threads; PyTorch here: "
        f"{report.pytorch_latency_ms:.2f} ms)",
    ]
    if eff:
        lines.append(
            f"  the trial:  memory_mb {fmt(eff.get('memory_mb'))} MB, gflops {fmt(eff.get('gflops'))}, "
            f"latency_ms {fmt(eff.get('latency_ms'))} ({eff.get('latency_device', '?')})"
        )
    typer.echo("\n".join(lines))


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

    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
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
