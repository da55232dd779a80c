"""Helpers shared by the test modules: small real images, tasks and models built as a run builds them."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cvad.compression import CompressionConfig
from cvad.data.builtin import BuiltinOptions, render_image
from cvad.models import AnomalyModel, Setup, build_model
from cvad.models.base import ImageBatches, Task
from cvad.record import TrialRecord
from cvad.tracking import TrackingStore, trial_tags

SIZE = 64  # px: small enough for every method on 2 cores, large enough for stride-16 taps
CNN = "mobilenetv2_100"  # real ImageNet weights install offline
VIT = "deit_tiny_patch16_224"  # runs here with random weights only


def in_ci() -> bool:
    """Whether this is CI (``.ci/run`` runs with ``CI=true``), where what the tests need is installed."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(available: bool, missing: str) -> None:
    """Skip the calling test when what it needs is not ``available``, saying what is ``missing``; under CI, where
    ``.ci/run`` installs it, fail instead: a test that README names must run there, not skip."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{missing}; .ci/run installs it, so under CI this test must run, not skip", pytrace=False)
    pytest.skip(missing)


def builtin_images(n: int, size: int = SIZE, category: str = "hex_nut") -> torch.Tensor:
    """Defect-free images from the built-in generator, uint8 [n, 3, S, S]."""
    options = BuiltinOptions(resolution=size, categories=(category,))
    pixels = np.stack([render_image(options, category, "train", "good", i).image for i in range(n)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def task_of(images: torch.Tensor, batch_size: int = 4, index: int = 0, name: str = "hex_nut") -> Task:
    """A task training on uint8 ``images`` in order (no shuffling)."""
    return Task(index, name, ImageBatches(DataLoader([{"image": im} for im in images], batch_size=batch_size)))


def image_task(index: int, n: int, brightness: int) -> Task:
    """A task of ``n`` seeded noise images around ``brightness``: tasks that differ by how bright they are."""
    generator = torch.Generator().manual_seed(index)
    images = (torch.rand(n, 3, SIZE, SIZE, generator=generator) * 60 + brightness).to(torch.uint8)
    return task_of(images, index=index, name=f"t{index}")


def build(
    name: str,
    backbone: str = CNN,
    *,
    seed: int = 0,
    image_size: int = SIZE,
    weights: str = "imagenet",
    tasks: int | None = None,
    storage: dict | None = None,
    **params,
) -> AnomalyModel:
    """A registered method with ``params`` over its defaults, as a run builds it; ``storage`` is the config's
    ``compression`` section (a name of its own: CFA has a parameter called ``compression``)."""
    kept = CompressionConfig(**(storage or {}))
    return build_model(name, params, Setup(backbone, weights, image_size, seed, tasks, compression=kept))


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


# -- run configs ------------------------------------------------------------------------------

TINY_RUN = {
    "dataset": {
        "image_size": SIZE,
        "batch_size": 6,
        "builtin": {
            "categories": ["brick", "hex_nut", "grass"],
            "resolution": SIZE,
            "train_per_category": 6,
            "test_good_per_category": 2,
            "test_defects_per_category": 2,
        },
    },
    "model": {"name": "padim", "params": {"n_features": 16}},
    "strategy": {"name": "finetune"},
    "calibration": {"min_images": 1},  # 6 training images hold out 1 to calibrate on
    "measure_latency": False,
}


def merged(base: object, override: object) -> object:
    """``override`` over ``base``: mappings merge key by key at every depth, except that a mapping giving a
    ``name`` (another model, strategy or dataset) replaces the one below it whole; a None value drops its key."""
    if not isinstance(base, dict) or not isinstance(override, dict) or "name" in override:
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merged(base[key], value) if key in base else copy.deepcopy(value)
    return out


def tiny_config(cache: Path | None, **overrides) -> dict:
    """A raw run config on tiny built-in data: brick, hex_nut and grass at 64 px, 6 training (one of them held
    out to calibrate thresholds on), 2 good and 2 defective test images each, batch 6; PaDiM with 16 features,
    fine-tuning, no latency measured.

    ``cache``: the folder of generated built-in data, the session's ``builtin_cache`` fixture, so that each option
    set is generated once a session (None, for a config whose data is never generated: no folder named).
    ``overrides``: top-level sections (``dataset``, ``model``, ``strategy``, ``backbone``, ``seed``, ...) merged
    over the default as ``merged`` does; e.g. ``model={"name": "patchcore", ...}`` replaces the PaDiM section,
    ``dataset={"builtin": {"train_per_category": 4}}`` changes that count alone, ``model=None`` drops the section.
    """
    raw = merged(TINY_RUN, overrides)
    if cache is not None:
        raw["dataset"]["cache_dir"] = str(cache)
    return raw


# -- sweeps ------------------------------------------------------------------------------------

SWEEP_DATA = {
    "image_size": 48,
    "batch_size": 8,
    "builtin": {"categories": ["brick", "grass"], "resolution": 48, "train_per_category": 3},
}


def tiny_sweep(name: str, cache: Path, space: dict | None = None, *, dataset: dict | None = None, **sweep) -> dict:
    """A sweep file of four PaDiM trials on ``tiny_config``'s data cut to brick and grass at 48 px, 3 training images
    each; ``dataset`` is merged over that section, ``sweep`` over the ``sweep`` section."""
    run = tiny_config(cache, dataset=merged(SWEEP_DATA, dataset or {}), model=None, strategy=None)
    return {
        "sweep": {"name": name, "objectives": ["maximize pixel_f1", "minimize memory_mb"], **sweep},
        **run,
        "space": space
        or {
            "strategy": [{"name": "finetune"}, {"name": "replay", "replay_size": [2]}],
            "model": [{"name": "padim", "params": {"n_features": 8, "continual": ["unimodal", "multimodal"]}}],
        },
    }


def run_sweep(raw: dict, store: Path, **options) -> object:
    """Run a sweep in this process, quietly; returns its SweepOutcome."""
    from cvad.sweep.runner import SweepOptions, SweepRunner
    from cvad.sweep.spec import SweepSpec

    spec = SweepSpec(copy.deepcopy(raw))
    return SweepRunner(spec, SweepOptions(store_dir=store, **options), printer=lambda line: None).run()


# -- processes started by a test -------------------------------------------------------------


def log_trial(
    store: TrackingStore,
    experiment: str,
    parent: str,
    number: int,
    config: dict,
    efficiency: dict | None = None,
    tasks: list[str] | None = None,
    final: dict | None = None,
    pretrained: bool = True,
    sweep: str = "s",
    **tags: str,
) -> str:
    """A trial logged through the tracking store as a sweep logs it, without a model: its step metrics
    (``final`` at the last step) and, with ``efficiency``, a record; without, none (a pruned trial). ``config``
    is a run config mapping (every section a tag names: dataset, model, backbone, strategy)."""
    run = store.start_trial(experiment, parent, f"t{number}", config, trial_tags(config, sweep, number) | tags)
    if tasks is not None:
        store.log_metrics(run, final or {}, step=len(tasks) - 1)
    if efficiency is not None:
        wall = {"train": 1.0, "eval": 1.0, "total": 2.0}
        record = TrialRecord(
            config, list(tasks), {}, final or {}, {"latency_ms": None} | efficiency, {"pretrained": pretrained},
            (), wall, seed=0, cvad_version="test",
        )  # fmt: skip
        store.log_result(run, record, {})
    store.end_trial(run, "FINISHED")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Gate:
    """The gate of ``tests/gate/sitecustomize.py`` for the processes a test starts: their trials numbered ``first``
    and up wait, once started, until ``open()``; ``reached(n)`` says trial n is waiting there."""

    def __init__(self, folder: Path, first: int = 1) -> None:
        self.folder, self.first = folder, first
        folder.mkdir(parents=True, exist_ok=True)

    def env(self, base: dict | None = None) -> dict:
        base = dict(os.environ if base is None else base)
        path = os.pathsep.join(p for p in (str(Path(__file__).parent / "gate"), base.get("PYTHONPATH")) if p)
        return base | {"PYTHONPATH": path, "CVAD_TEST_GATE": str(self.folder), "CVAD_TEST_GATE_FROM": str(self.first)}

    def reached(self, number: int) -> bool:
        return (self.folder / f"waiting.{number}").exists()

    def open(self) -> None:
        (self.folder / "open").touch()

    def close(self) -> None:
        """Hold trials again, forgetting the ones that waited before (a new sweep numbers its trials from 0)."""
        for mark in [self.folder / "open", *self.folder.glob("waiting.*")]:
            mark.unlink(missing_ok=True)


class Processes:
    """Long-running processes started in their own process groups, stopped by group id."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        process = subprocess.Popen(
            args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env or os.environ, start_new_session=True
        )
        self.started.append(process)
        return process

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(process)


def trial_runs(uri: str, experiment: str) -> tuple:
    """The MLflow client of ``uri`` and the trial runs of ``experiment`` there (none while it does not exist)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "tags.`cvad.role` = 'trial'", max_results=1000) if found else []
    return client, runs


def alive_nodes(address: str, env: dict) -> int:
    """Alive nodes of the Ray cluster at ``address`` (0 while it does not answer), asked from a fresh process."""
    result = subprocess.run(
        [
            sys.executable, "-c",
            f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))",
        ],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 and result.stdout.strip() else 0
