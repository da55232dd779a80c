"""Multi-node sweeps on loopback: a real MLflow server, a Ray head and a second Ray node.

Everything started here is stopped here, by process group. The sweep driver runs as
``cvad sweep --address ... --tracking-uri http://...`` in a subprocess, like a user would.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support import Gate, Processes, alive_nodes, answers, free_port, tiny_sweep, trial_runs, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = Path(sys.executable).parent
# Every process of the cluster (and the driver) shares one auth token, as a real cluster would;
# fast failure detection, so that a killed node is noticed within seconds.
RAY_ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(16),
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "4",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    processes = Processes()
    gate = Gate(root / "gate", first=0)  # in the nodes' workers; open but for the test that kills a node
    gate.open()
    env = gate.env(RAY_ENV)
    mlflow_port, ray_port = free_port(), free_port()
    try:
        processes.start(
            [
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"),
            ],
            root / "mlflow.log",
        )  # fmt: skip
        node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block"]
        head = ["--head", "--port", str(ray_port), "--include-dashboard", "false"]
        processes.start([str(BIN / "ray"), "start", *head, *node], root / "head.log", env)
        address = f"127.0.0.1:{ray_port}"
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_until(lambda: answers(f"{uri}/health"), 90, "the MLflow server answering")
        second = processes.start([str(BIN / "ray"), "start", "--address", address, *node], root / "node2.log", env)
        wait_until(lambda: alive_nodes(address, RAY_ENV) == 2, 90, "two Ray nodes joining")
        yield {"root": root, "address": address, "uri": uri, "processes": processes, "second": second, "gate": gate}
    finally:
        processes.stop_all()


def sweep_file(root: Path, name: str, cache: Path, **dataset) -> Path:
    """``tiny_sweep`` at one CPU a trial, ``dataset`` over its dataset section, written to ``root/NAME.yaml``."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep(name, cache, dataset=dataset, resources={"cpus_per_trial": 1})))
    return path


def test_sweep_runs_on_two_nodes_and_lands_in_the_mlflow_server(cluster, builtin_cache, tmp_path):
    path = sweep_file(cluster["root"], "two-nodes", builtin_cache)
    result = subprocess.run(
        [
            str(BIN / "cvad"), "sweep", str(path), "--address", cluster["address"],
            "--tracking-uri", cluster["uri"], "--store", str(tmp_path),
        ],
        capture_output=True, text=True, env=RAY_ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ray: 2 node(s)" in result.stdout
    client, runs = trial_runs(cluster["uri"], "two-nodes")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"result.json", "matrices", "overlays"} <= artifacts  # served by the tracking server
    nodes = {r.data.tags["cvad.worker"].split(":")[0] for r in runs}
    assert len(nodes) == 2, nodes
    # The top pick's detector, kept on the server, exported, verified and registered there.
    result = subprocess.run(
        [str(BIN / "cvad"), "recommend", "--tracking-uri", cluster["uri"], "--register", "cluster-pick"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registered cluster-pick version 1" in result.stdout
    version = client.get_model_version("cluster-pick", "1")
    assert version.tags["tasks"] == "brick+grass" and float(version.tags["export.export_onnx_mb"]) > 0
    assert client.get_run(version.run_id).data.tags["cvad.registered"] == "cluster-pick:1"


def test_a_killed_node_loses_no_trial(cluster, builtin_cache, tmp_path):
    path = sweep_file(cluster["root"], "node-lost", builtin_cache)
    log = tmp_path / "driver.log"  # a file, not a pipe, so that no lingering process can block reading it
    gate = cluster["gate"]
    gate.close()
    with log.open("w") as sink:
        driver = subprocess.Popen(
            [
                str(BIN / "cvad"), "sweep", str(path), "--address", cluster["address"],
                "--tracking-uri", cluster["uri"], "--store", str(tmp_path),
            ],
            stdout=sink, stderr=subprocess.STDOUT, env=RAY_ENV,
        )  # fmt: skip
        try:  # trials 0 and 1 held at the gate, one on each node: the second node dies holding one
            held = lambda: gate.reached(0) and gate.reached(1)  # noqa: E731
            wait_until(lambda: held() or driver.poll() is not None, 300, "trials 0 and 1 reaching the gate")
            assert driver.poll() is None, log.read_text()
            Processes.kill(cluster["second"])
            time.sleep(5)  # Ray notices the lost node (health checks every 0.5 s) before the gate opens
            gate.open()
            assert driver.wait(timeout=600) == 0, log.read_text()
        finally:
            if driver.poll() is None:
                driver.kill()
    _, runs = trial_runs(cluster["uri"], "node-lost")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    rerun = [r.data.tags["cvad.trial"] for r in runs if r.data.tags.get("cvad.retried") == "true"]
    assert len(rerun) == 1 and rerun[0] in {"0", "1"}, rerun  # the lost trial, rerun on the surviving node


def test_an_unreachable_tracking_server_fails_before_any_trial(builtin_cache, tmp_path):
    path = sweep_file(tmp_path, "no-server", builtin_cache)
    result = subprocess.run(
        [
            str(BIN / "cvad"), "sweep", str(path), "--tracking-uri", f"http://127.0.0.1:{free_port()}",
            "--store", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is unreachable" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "optuna.db").exists()  # nothing started


def test_a_tracking_server_that_refuses_this_host_fails_before_any_trial(builtin_cache, tmp_path):
    processes, port = Processes(), free_port()
    try:
        processes.start(
            [
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--allowed-hosts", "mlflow:5000",
            ],
            tmp_path / "mlflow.log",
        )  # fmt: skip
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), 120, "the MLflow server answering")
        result = subprocess.run(
            [
                str(BIN / "cvad"), "sweep", str(sweep_file(tmp_path, "refused", builtin_cache)),
                "--tracking-uri", f"http://127.0.0.1:{port}", "--store", str(tmp_path / "store"),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        processes.stop_all()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "refuses cvad's requests (403" in result.stderr and f"'127.0.0.1:{port}'" in result.stderr
    assert not (tmp_path / "store" / "optuna.db").exists()  # nothing started
