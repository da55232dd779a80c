"""``cvad run`` and ``cvad cost``: one experiment, or a configuration's price, in the terminal."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import typer
import yaml

from cvad.cli.common import cli, fail, fmt, user_errors
from cvad.progress import DataReady, Progress, TaskEvaluated, TrainPass, TrainStarted
from cvad.tracking import DEFAULT_STORE


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


def print_summary(result) -> None:
    """A ``cvad.record.TrialRecord`` in words: the pixel-F1 matrix, the final averages, efficiency, weights."""
    tasks = result.tasks
    width = max(8, max(len(t) for t in tasks) + 1)
    typer.echo("\nPixel F1 after each step (rows) on each task (columns):")
    typer.echo(" " * width + "".join(f"{t[: width - 1]:>{width}}" for t in tasks))
    for t, row in zip(tasks, result.matrices["pixel_f1"]):
        if any(v is not None for v in row):
            typer.echo(f"{t[: width - 1]:<{width}}" + "".join(f"{fmt(v):>{width}}" for v in row))
    final, eff, w = result.final, result.efficiency, result.weights
    typer.echo("\nFinal (average over all tasks after the last step):")
    typer.echo(f"  image F1 {fmt(final['image_f1'])}   image ROC-AUC {fmt(final['image_auroc'])}")
    typer.echo(f"  pixel F1 {fmt(final['pixel_f1'])}   pixel ROC-AUC {fmt(final['pixel_auroc'])}")
    typer.echo(f"  pixel AUPRO (FPR <= 0.3) {fmt(final['pixel_aupro'])}")
    typer.echo(f"  forgetting (pixel F1) {fmt(final['forgetting_pixel_f1'])}")
    if result.thresholds:
        typer.echo(
            f"  at the calibrated thresholds: image F1 {fmt(final['image_f1_calibrated'])}  precision "
            f"{fmt(final['image_precision'])}  recall {fmt(final['image_recall'])}  FPR {fmt(final['image_fpr'])}"
            f"  | pixel F1 {fmt(final['pixel_f1_calibrated'])}  (targets: {result.thresholds['image_fpr']:g} of good "
            f"images, {result.thresholds['pixel_fpr']:g} of good pixels)"
        )
    else:
        typer.echo("  no thresholds (calibration.holdout: 0): the detector returns scores and maps only")
    print_efficiency(eff)
    typer.echo(
        f"  largest update (a training step): {eff['update_seconds']:.2f} s, peak memory rise "
        f"{eff['update_peak_mb']:.1f} MB, state {eff['update_state_mb']:.2f} MB"
    )
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
    if eff.get("replay_priced_raw"):
        typer.echo(
            "  replay_buffer priced at its raw size: a JPEG file's bytes depend on the image (a run records them)"
        )


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
    from cvad.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:  # refused before torch is imported (tests/test_cli_startup.py)
        fail(str(exc))
    from cvad.backbones.weights import RandomWeightsWarning
    from cvad.files import write_atomic
    from cvad.record import RECORD_FILE, RecordWriteError
    from cvad.trial import run_trial  # heavy imports only when running

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
    for warning in result.warnings:
        typer.secho(f"WARNING: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"\nwrote {out / RECORD_FILE}")
    if result.detector is not None:
        typer.echo(
            f"wrote {out / result.detector.file} ({result.detector.mb:.2f} MB; the frozen backbone is "
            f"reloaded from its weights); deploy it: cvad export {out} --format onnx"
        )


def prepare_output(out: Path, overwrite: bool) -> bool:
    """Refuse an output folder that cannot take the result before any work starts; True when a result is replaced."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a folder (it is created if missing)")
    from cvad.record import RECORD_FILE

    replacing = (out / RECORD_FILE).exists()
    if replacing and not overwrite:
        fail(f"{out / RECORD_FILE} already holds a result; choose another --out or pass --overwrite")
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
    from cvad.catalog import compression_label
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
        f"{cfg.model.name} on {cfg.backbone.name} at {cfg.dataset.image_size} px, strategy {cfg.strategy.name}"
        f"{compression_label(cfg.compression.model_dump())}, after {eff['tasks']} task(s):"
    )
    print_efficiency(eff)
