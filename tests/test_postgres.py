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

from support import Processes, alive_nodes, answers, free_port, require, tiny_sweep, wait_until

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
    subprocess.run(
        [*run, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
    )
    try:
        env = {**os.environ, "PGPASSWORD": password}
        for database in ("mlflow", "optuna"):
            subprocess.run(
                [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, database],
                check=True,
                env=env,
            )
        yield {"url": f"postgresql://{USER}:{password}@127.0.0.1:{port}", "password": password}
    finally:
        subprocess.run([*run, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], check=False)
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
