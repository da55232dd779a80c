"""`cvad --help`, `cvad recommend`, what the dashboard imports and config validation start without torch, timm,
Ray, Optuna or the models.

Each check runs in a fresh interpreter and reads ``sys.modules`` afterwards: it asserts what is
imported, not how long it takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "torchvision", "ray", "optuna", "cvad.models", "cvad.backbones", "cvad.config", "cvad.trial")

PROBE = """
import json, sys
from cvad.cli import cli
for args in {commands!r}:
    try:
        cli(args=args, prog_name="cvad")
    except SystemExit as exit:
        if exit.code:
            raise
{extra}
print("\\nLOADED " + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def loaded_after(commands: list[list[str]], extra: str = "") -> list[str]:
    """The heavy modules loaded once the CLI module is imported and ``commands`` have run, in a fresh interpreter."""
    code = PROBE.format(commands=commands, extra=extra, heavy=HEAVY + ("mlflow",))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.rsplit("LOADED ", 1)[1])


def test_help_of_every_command_imports_nothing_heavy():
    commands = [["--help"]] + [[name, "--help"] for name in ("run", "cost", "sweep", "recommend", "dashboard", "list")]
    assert loaded_after(commands) == []


def test_what_recommend_and_the_dashboard_import_is_light():
    extra = "import cvad.selection, cvad.tracking, cvad.metrics, cvad.catalog"
    assert loaded_after([], extra) == []


VALIDATION_PROBE = """
import json, sys
import cvad.catalog, cvad.config
from cvad.config import ConfigError, validate_config
validate_config({{}})
for raw in {configs!r}:
    try:
        validate_config(raw)
    except ConfigError:
        continue
    raise SystemExit(f"accepted {{raw}}")
print("\\nLOADED " + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def test_config_validation_refuses_without_torch_or_the_models():
    """A bad name, a bad parameter key and an impossible setup are refused from ``cvad.catalog`` and
    ``cvad.methods`` alone."""
    bad = [
        {"model": {"name": "padimm"}},
        {"model": {"name": "padim", "params": {"n_feature": 3}}},
        {"backbone": {"name": "mobilenet"}},
        {"model": {"name": "padim", "params": {"layers": [4, 64]}}},
        {"model": {"name": "dinomaly"}},
        {"model": {"name": "simplenet", "preset": "paper"}, "backbone": {"name": "resnet18"}},
    ]
    heavy = tuple(m for m in HEAVY if m != "cvad.config") + ("mlflow", "scipy")
    code = VALIDATION_PROBE.format(configs=bad, heavy=heavy)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.rsplit("LOADED ", 1)[1]) == []


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An MLflow store with two finished trials logged the way a sweep logs them (no model is built)."""
    from cvad.tracking import TrackingStore
    from support import log_trial

    root = tmp_path_factory.mktemp("startup-store")
    tracker = TrackingStore(f"sqlite:///{root / 'mlflow.db'}")
    experiment = tracker.open_experiment("startup")
    parent = tracker.start_sweep(experiment, "startup", {}, {})
    for trial, (model, pixel_f1, mb) in enumerate([("paste", 0.45, 16.9), ("padim", 0.41, 46.7)]):
        config = {
            "dataset": {"name": "builtin"},
            "model": {"name": model, "params": {}},
            "backbone": {"name": "mobilenetv2_100"},
            "strategy": {"name": "finetune"},
        }
        efficiency = {"memory_mb": mb, "memory_bytes": int(mb * 2**20), "gflops": 0.6, "gmacs": 0.3}
        final = {"pixel_f1": pixel_f1, "image_f1": 0.9, "forgetting_pixel_f1": 0.1, "forgetting_image_f1": 0.0}
        log_trial(tracker, experiment, parent, trial, config, efficiency, ["a", "b"], final, sweep="startup")
    return root


@pytest.mark.slow
def test_recommend_reads_mlflow_without_the_models(store):
    command = ["recommend", "--store", str(store), "--max-mb", "20", "--json"]
    code = PROBE.format(commands=[command], extra="", heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer, loaded = done.stdout.rsplit("LOADED ", 1)
    assert json.loads(loaded) == []
    assert json.loads(answer)["picks"][0]["name"] == "PaSTe + MobileNetV2, finetune"
