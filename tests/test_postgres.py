"""The compose stack's stores for real: Optuna studies and MLflow runs in PostgreSQL.

A throwaway PostgreSQL server (Debian's ``postgresql`` package) with password authentication,
an MLflow server that reads its PostgreSQL URI from the environment (as docker/compose.yaml
runs it), one Ray head, and two sweep drivers started at once against all of it. Every trial
must be in both stores exactly once.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from support import Gate, Processes, alive_nodes, answers, free_port, require, tiny_sweep, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = Path(sys.executable).parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)
psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[dev]')")
USER = "cvad"


def as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: under root (CI), run its tools as the package's ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []


@pytest.fixture(scope="module")
def postgres():
    require(
        PG_BIN is not None and (PG_BIN / "initdb").exists(), "PostgreSQL is not installed (Debian package postgresql)"
    )
    # Not under pytest's tmp folder: that one is private to the user running the tests.
    root = Path(tempfile.mkdtemp(prefix="cvad-postgres-"))
    password = secrets.token_hex(12)
    (root / "password").write_text(password + "\n")
    if os.getuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "password", "postgres")
    data, port = root / "data", free_port()
    run = as_postgres_user()
    subprocess.run(
        [*run, str(PG_BIN / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={root / 'password'}",
         "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    pg_ctl = [*run, str(PG_BIN / "pg_ctl"), "-D", str(data)]

    def start() -> None:
        subprocess.run([*pg_ctl, "-o", options, "-l", str(root / "log"), "-w", "start"], check=True)

    def stop() -> None:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True)

    start()
    try:
        env = {**os.environ, "PGPASSWORD": password}
        for database in ("mlflow", "optuna"):
            subprocess.run(
                [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, database],
                check=True,
                env=env,
            )
        url = f"postgresql://{USER}:{password}@127.0.0.1:{port}"
        yield {"url": url, "password": password, "start": start, "stop": stop}
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_two_drivers_record_every_trial_once_in_both_postgresql_stores(postgres, builtin_cache, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    processes = Processes()
    mlflow_port, ray_port = free_port(), free_port()
    storage = f"{postgres['url']}/optuna"
    try:
        # As compose runs it: the server's PostgreSQL URI (with its password) comes from the environment.
        server_env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"{postgres['url']}/mlflow"}
        server = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"]
        processes.start(
            [*server, "--artifacts-destination", str(tmp_path / "artifacts")], tmp_path / "mlflow.log", server_env
        )
        ray_env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        head = ["--head", "--port", str(ray_port), "--include-dashboard", "false", "--node-ip-address", "127.0.0.1"]
        processes.start(
            [str(BIN / "ray"), "start", *head, "--num-cpus", "2", "--block"], tmp_path / "head.log", ray_env
        )
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_until(lambda: answers(f"{uri}/health"), 120, "the MLflow server answering")
        wait_until(lambda: alive_nodes(f"127.0.0.1:{ray_port}", ray_env) == 1, 120, "the Ray head starting")
        assert postgres["password"] not in " ".join(processes.started[0].args)  # not on its command line
        optuna.storages.RDBStorage(storage)  # the schema, as the stack's first sweep leaves it

        drivers = {}
        for name in ("pg-a", "pg-b"):
            path = tmp_path / f"{name}.yaml"
            space = {"model": [{"name": "padim", "params": {"n_features": 8, "continual": ["unimodal", "multimodal"]}}]}
            path.write_text(yaml.safe_dump(tiny_sweep(name, builtin_cache, space=space)))
            args = [sys.executable, "-m", "cvad", "sweep", str(path), "--address", f"127.0.0.1:{ray_port}"]
            args += ["--tracking-uri", uri, "--storage", storage, "--store", str(tmp_path / name)]
            drivers[name] = processes.start(args, tmp_path / f"{name}.log", ray_env)
        for name, driver in drivers.items():
            assert driver.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

        client = MlflowClient(uri)
        for name in drivers:
            study = optuna.load_study(study_name=name, storage=storage)
            numbers = sorted(t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
            assert numbers == [0, 1], [(t.number, t.state) for t in study.trials]
            experiment = client.get_experiment_by_name(name)
            runs = client.search_runs([experiment.experiment_id], "tags.`cvad.role` = 'trial'", max_results=100)
            trials = sorted(int(run.data.tags["cvad.trial"]) for run in runs)
            assert trials == numbers  # each trial once: no duplicate, none missing
            assert all(run.info.status == "FINISHED" and "pixel_f1" in run.data.metrics for run in runs)
    finally:
        processes.stop_all()


def test_a_study_database_stopped_mid_sweep_stops_the_driver_cleanly_and_resume_finishes_each_trial_once(
    postgres, builtin_cache, tmp_path
):
    """PostgreSQL (the Optuna storage) stopped while trial 1 runs (held at tests/gate's gate), started again after."""
    import optuna
    from mlflow.tracking import MlflowClient

    storage = f"{postgres['url']}/optuna"
    path = tmp_path / "pg-lost.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep("pg-lost", builtin_cache, resources={"cpus_per_trial": 2})))
    store, log, gate = tmp_path / "store", tmp_path / "driver.log", Gate(tmp_path / "gate")
    args = [sys.executable, "-m", "cvad", "sweep", str(path), "--store", str(store), "--storage", storage]
    args += ["--service-wait", "3"]
    processes = Processes()
    try:
        driver = processes.start(args, log, gate.env())
        wait_until(lambda: gate.reached(1) or driver.poll() is not None, 300, "trial 1 reaching the gate")
        assert driver.poll() is None, log.read_text()

        def recorded() -> bool:
            trials = optuna.load_study(study_name="pg-lost", storage=storage).get_trials()
            return any(t.number == 0 and t.state == optuna.trial.TrialState.COMPLETE for t in trials)

        wait_until(recorded, 60, "trial 0 recorded")
        postgres["stop"]()
        gate.open()
        assert driver.wait(timeout=300) == 2, log.read_text()
        said = log.read_text()
        assert "lost the Optuna study storage postgresql://cvad:***@127.0.0.1" in said, said
        assert postgres["password"] not in said and "Traceback" not in said
    finally:
        gate.open()
        processes.stop_all()
        postgres["start"]()
    again = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    study = optuna.load_study(study_name="pg-lost", storage=storage)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 4
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pg-lost")
    runs = client.search_runs([experiment.experiment_id], "tags.`cvad.role` = 'trial'", max_results=100)
    finished = sorted(r.data.tags["mlflow.runName"][4:] for r in runs if r.info.status == "FINISHED")
    assert len(finished) == len(set(finished)) == 4  # each configuration finished exactly once
