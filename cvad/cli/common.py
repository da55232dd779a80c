"""What every command shares: the Typer app, one-line errors, number formatting."""

from __future__ import annotations

import typer

from cvad.registry import UnknownNameError

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
