"""``cvad learn``: a saved detector learns the next product (``cvad.learning``)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer

from cvad.cli.common import cli, fail, fmt, user_errors
from cvad.tracking import DEFAULT_STORE, resolve_tracking_uri


@cli.command()
def learn(
    source: str = typer.Argument(..., help="a `cvad run` or `cvad learn` folder, a detector.pt, or a trial's run id"),
    task: str = typer.Option(..., "--task", help="the new task: a category of the dataset (a folder under --root)"),
    root: Path | None = typer.Option(
        None, "--root", help="the dataset folder that holds the new task (default: the detector's dataset.root)"
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="output folder (default runs/<source>+<task>-<time>)"),
    register: str | None = typer.Option(
        None, "--register", help="also export the new detector to ONNX and register it as a version of this model"
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)"
    ),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="folder of the local MLflow store"),
) -> None:
    """Learn one more task on a fitted detector, evaluate every task seen, and write a new run folder.

    The method's own continual rule and the run's strategy (replay: the stored buffer, rebalanced) fit the
    task; its thresholds are calibrated on held-out good images; the matrices gain a row. The source is left
    as it was. Example: cvad learn runs/quickstart-20261203-101500 --task screw
    """
    from cvad.cli.run import ProgressPrinter, prepare_output
    from cvad.deployment import DeploymentError, names_a_run, resolve_source
    from cvad.detector import DetectorError, load_detector
    from cvad.learning import LearnError, learn_task
    from cvad.record import RecordError, RecordWriteError
    from cvad.tracking import TrackingError, TrackingStore

    uri = resolve_tracking_uri(tracking_uri, store)
    try:
        found = resolve_source(source, TrackingStore(uri) if names_a_run(source) else None)
        detector = load_detector(found.detector, found.origin)
    except (DeploymentError, DetectorError, RecordError, TrackingError) as exc:
        fail(str(exc))
    name = Path(source).name if Path(source).is_dir() else (found.run_id or found.detector.parent.name)
    out = out or DEFAULT_STORE / f"{name}+{task}-{datetime.now():%Y%m%d-%H%M%S}"
    prepare_output(out, overwrite=False)
    typer.echo(f"cvad learn: {detector.model.name} ({', '.join(detector.tasks)}) + {task} -> {out}")
    try:
        done = learn_task(
            detector, task, out, root=root, where=str(found.detector), progress=ProgressPrinter(), say=typer.echo
        )
    except (*user_errors(), LearnError, RecordWriteError) as exc:
        fail(str(exc))
    print_learned(done)
    if register:
        from cvad.cli.deploy import export_and_register

        export_and_register(str(out), "onnx", None, "uint8", register, uri)


def print_learned(done) -> None:
    """The new row, forgetting per earlier task, the thresholds and what the update cost."""
    from cvad.metrics import forgetting_per_task

    record, row = done.record, len(done.record.tasks) - 1
    step = record.steps[-1]
    typer.echo(f"\nAfter learning {done.task} (step {row + 1}):")
    for j, name in enumerate(record.tasks):
        values = {m: record.matrices[m][row][j] for m in ("image_f1", "pixel_f1", "image_f1_calibrated", "image_fpr")}
        if all(v is None for v in values.values()):
            typer.echo(f"  {name:<16} not evaluated (its test data is not here)")
            continue
        typer.echo(
            f"  {name:<16} image F1 {fmt(values['image_f1'])}  pixel F1 {fmt(values['pixel_f1'])}  | at the "
            f"threshold: image F1 {fmt(values['image_f1_calibrated'])}  FPR {fmt(values['image_fpr'])}"
        )
    for metric in ("pixel_f1", "image_f1"):
        drops = forgetting_per_task(record.matrices[metric])
        listed = ", ".join(f"{t} {fmt(d)}" for t, d in zip(record.tasks, drops))
        typer.echo(f"  forgetting ({metric}): {fmt(record.final.get(f'forgetting_{metric}'))}  ({listed})")
    if record.thresholds:
        typer.echo(
            f"  thresholds of {done.task}: image {record.thresholds['image'][-1]:.4g}, pixel "
            f"{record.thresholds['pixel'][-1]:.4g} (targets: FPR {record.thresholds['image_fpr']:g} of good "
            f"images, {record.thresholds['pixel_fpr']:g} of good pixels)"
        )
    typer.echo(
        f"  update: {step.train_seconds:.2f} s, peak memory rise {fmt(step.update_peak_mb, 1)} MB, state "
        f"{fmt(step.update_state_mb, 2)} MB; memory {record.efficiency['memory_mb']:.2f} MB"
    )
    typer.echo(f"\nwrote {done.out / 'result.json'} and {done.out / 'detector.pt'}")
