"""A sweep driver whose stores go away or fill up: a real MLflow server killed and restarted, real full disks
(tmpfs mounts of a few MB) under the artifacts, the staged detectors and the study file.

Each sweep's trial 1 waits at the gate of tests/gate until the test has done its damage, so the order of
events is the same on any machine. What is asserted holds whichever write meets the fault first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cvad.sweep.hold import Driver
from cvad.sweep.services import Patience, Service, ServiceLost, shown_url
from support import Gate, Processes, answers, free_port, require, tiny_sweep, trial_runs, wait_until

BIN = Path(sys.executable).parent
CVAD = [sys.executable, "-m", "cvad"]


# -- the rules, without processes ---------------------------------------------------------------
def test_a_lost_service_is_waited_for_then_named_and_other_errors_pass_at_once():
    service = Service.study("sqlite:////nowhere/optuna.db")
    said: list[str] = []
    patience = Patience(0.6, said.append)
    import sqlalchemy.exc

    failures = iter([sqlalchemy.exc.OperationalError("INSERT", {}, OSError("database or disk is full"))] * 2)

    def flaky() -> str:
        for failure in failures:
            raise failure
        return "written"

    assert patience.call(service, flaky) == "written"
    assert "waiting up to 1 s" in said[0] and "answers again" in said[-1]
    always = sqlalchemy.exc.OperationalError("INSERT", {}, OSError("database or disk is full"))
    with pytest.raises(ServiceLost, match=r"lost the Optuna study storage sqlite:////nowhere/optuna.db .*within"):
        patience.call(service, lambda: (_ for _ in ()).throw(always))
    with pytest.raises(KeyError):  # not a lost service: the caller's error, at once, without waiting
        patience.call(service, lambda: {}["missing"])
    assert shown_url("postgresql://cvad:s3cret@db:5432/optuna") == "postgresql://cvad:***@db:5432/optuna"


def test_a_hold_is_stale_only_when_its_driver_is_gone():
    now = time.time()
    mine = Driver.this_process()
    assert mine.alive(now)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not Driver(mine.host, gone.pid, now, now, "t", None).alive(now)
    reused = Driver(mine.host, os.getpid(), now, now, "t", "1")  # this pid, but another process start: reused
    assert not reused.alive(now)
    elsewhere = Driver("another-host", 1, now, now - 30, "t", None)
    assert elsewhere.alive(now) and not elsewhere.alive(now + 3600)


# -- processes -------------------------------------------------------------------------------------
def sweep_file(tmp_path: Path, name: str, cache: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep(name, cache, resources={"cpus_per_trial": 2})))  # one at a time
    return path


def start_driver(args: list[str], log: Path, gate: Gate) -> subprocess.Popen:
    return subprocess.Popen(
        [*CVAD, "sweep", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=gate.env(), start_new_session=True
    )


def wait_for_trial_1_at_the_gate(driver: subprocess.Popen, gate: Gate, log: Path, storage: str, name: str) -> None:
    """Trial 0 recorded, trial 1 running and held at the gate."""
    wait_until(lambda: gate.reached(1) or driver.poll() is not None, 300, "trial 1 reaching the gate")
    assert driver.poll() is None, log.read_text()

    def recorded() -> bool:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        return any(t.number == 0 and t.state == TrialState.COMPLETE for t in trials)

    wait_until(recorded, 60, "trial 0 recorded")


def resume(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CVAD, "sweep", *args, "--resume"], capture_output=True, text=True, timeout=600)


def finished_trials(uri: str, name: str) -> tuple[object, list]:
    client, runs = trial_runs(uri, name)
    return client, [r for r in runs if r.info.status == "FINISHED"]


def assert_each_configuration_once(runs: list) -> None:
    names = sorted(r.data.tags["mlflow.runName"][4:] for r in runs)
    assert len(names) == len(set(names)) == 4, names


@pytest.mark.slow
def test_a_tracking_server_killed_mid_sweep_stops_cleanly_and_resume_records_every_trial_once(tmp_path, builtin_cache):
    processes = Processes()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "art"),
    ]  # fmt: skip
    path, store, log, gate = sweep_file(tmp_path, "lost", builtin_cache), tmp_path / "store", tmp_path / "a.log", None
    args = [str(path), "--store", str(store), "--tracking-uri", uri, "--service-wait", "3"]
    try:
        first_server = processes.start(server, tmp_path / "mlflow-1.log")
        wait_until(lambda: answers(f"{uri}/health"), 120, "the MLflow server answering")
        gate = Gate(tmp_path / "gate")
        driver = start_driver(args, log, gate)
        wait_for_trial_1_at_the_gate(driver, gate, log, f"sqlite:///{store / 'optuna.db'}", "lost")
        processes.kill(first_server)
        gate.open()
        assert driver.wait(timeout=300) == 2, log.read_text()
        said = log.read_text()
        assert "Traceback" not in said, said
        assert f"lost the MLflow tracking server at {uri}" in said and "waiting up to 3 s" in said, said
        unsent = sorted((store / "unsent").iterdir())
        assert len(unsent) == 1 and str(store / "unsent") in said  # trial 1's record, kept to be sent
        trial_1_run = unsent[0].name

        processes.start(server, tmp_path / "mlflow-2.log")
        wait_until(lambda: answers(f"{uri}/health"), 120, "the MLflow server answering again")
        again = resume(args)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "trial 1: its record, kept when the tracking store was lost, is now in MLflow" in again.stdout
        client, runs = finished_trials(uri, "lost")
        assert_each_configuration_once(runs)
        assert client.get_run(trial_1_run).info.status == "FINISHED"  # sent, never rerun
        assert not list((store / "unsent").iterdir())
        study = optuna.load_study(study_name="lost", storage=f"sqlite:///{store / 'optuna.db'}")
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    finally:
        if gate is not None:
            gate.open()
        processes.stop_all()


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int):
    """A real filesystem of ``megabytes`` mounted at ``folder`` (tmpfs: needs root, as CI runs)."""
    require(os.geteuid() == 0 and shutil.which("mount") is not None, "mounting a small tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path) -> Path:
    """Write to ``disk`` until it is full; returns the file that fills it."""
    filler = disk / "filler"
    with filler.open("wb") as sink, contextlib.suppress(OSError):
        while True:
            sink.write(b"\0" * 65536)
            sink.flush()
    return filler


@pytest.mark.slow
def test_full_disks_under_the_artifacts_and_the_staged_detectors_are_warnings_and_lose_nothing(tmp_path, builtin_cache):
    path, store, log, gate = sweep_file(tmp_path, "full", builtin_cache), tmp_path / "store", tmp_path / "a.log", None
    args = [str(path), "--store", str(store)]
    with small_disk(store / "artifacts", 16) as artifacts, small_disk(store / "detectors", 4) as detectors:
        gate = Gate(tmp_path / "gate")
        driver = start_driver(args, log, gate)
        try:
            wait_for_trial_1_at_the_gate(driver, gate, log, f"sqlite:///{store / 'optuna.db'}", "full")
            fill(artifacts), fill(detectors)
        finally:
            gate.open()
        assert driver.wait(timeout=300) == 0, log.read_text()
        said = log.read_text()
        client, runs = finished_trials(f"sqlite:///{store / 'mlflow.db'}", "full")
        assert_each_configuration_once(runs)  # the sweep went on
        by_trial = {int(r.data.tags["cvad.trial"]): r for r in runs}
        for number in (1, 2, 3):
            run = by_trial[number]
            assert "pixel_f1" in run.data.metrics and "No space left on device" in run.data.tags["cvad.warning"]
            assert f"warning: trial {number}: its files (result.json" in said, said
            assert f"warning: trial {number}: its fitted detector was not kept" in said, said
        with contextlib.suppress(FileNotFoundError):
            (artifacts / "filler").unlink()
        record = client.download_artifacts(by_trial[0].info.run_id, "result.json", str(tmp_path))
        assert Path(record).stat().st_size > 0  # what was recorded before the disk filled is all there
        assert "thing(s) were not written" in said and "Traceback" not in said


@pytest.mark.slow
def test_a_full_disk_under_the_study_file_stops_cleanly_and_resume_finishes_each_configuration_once(
    tmp_path, builtin_cache
):
    path, store, log = sweep_file(tmp_path, "study-full", builtin_cache), tmp_path / "store", tmp_path / "a.log"
    with small_disk(tmp_path / "disk", 2) as disk:
        storage = f"sqlite:///{disk / 'optuna.db'}"
        args = [str(path), "--store", str(store), "--storage", storage, "--service-wait", "2"]
        gate = Gate(tmp_path / "gate")
        driver = start_driver(args, log, gate)
        try:
            wait_for_trial_1_at_the_gate(driver, gate, log, storage, "study-full")
            filler = fill(disk)
        finally:
            gate.open()
        assert driver.wait(timeout=300) == 2, log.read_text()
        said = log.read_text()
        assert f"lost the Optuna study storage {storage}" in said and "Traceback" not in said, said
        filler.unlink()
        again = resume(args)
        assert again.returncode == 0, again.stdout + again.stderr
        _, runs = finished_trials(f"sqlite:///{store / 'mlflow.db'}", "study-full")
        assert_each_configuration_once(runs)
        study = optuna.load_study(study_name="study-full", storage=storage)
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
