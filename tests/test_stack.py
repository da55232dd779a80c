"""docker/ for real: the image built, the compose stack up, a sweep through it, a worker killed, a restart kept.

Run by ``.ci/run`` as its own step (``pytest -m stack``) where a Docker engine answers or can be started.
Where no registry answers (this project's machines), the image is built from the same Dockerfile through its
build arguments only: a Debian base made with debootstrap, torch from the local package index served on
loopback, pip's CA bundle as a build secret. Every published port is bound to 127.0.0.1 and the containers
talk over the bridge network compose creates. Timings are printed and written to ``STACK_TIMINGS`` (a JSON
file) when that is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from support import Gate, answers, free_port, require, tiny_sweep, trial_runs, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
STACK = Path(__file__).parent / "stack"
DOCKER = shutil.which("docker")
BASE_IMAGE = "cvad-debian:bookworm"
POSTGRES_IMAGE = "cvad-postgres:stack"
IMAGE_TAG = "stack"
PROJECT = "cvad-stack-test"
TIMINGS: dict[str, float] = {}
INDEX_PORT = 38765  # one port from run to run keeps the build arguments, and so Docker's layer cache, the same


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def sh(*args: str, timeout: float = 900, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args[:4])} ... failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


def timed(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = sh(*args, **kwargs)
    TIMINGS[name] = round(time.monotonic() - started, 1)
    return done


def docker_engine() -> None:
    """A Docker engine that answers: the one running, or ``dockerd`` started here when this process may."""
    require(DOCKER is not None, "the docker client is not installed (Debian package docker.io)")
    if sh(DOCKER, "info", check=False, timeout=60).returncode == 0:
        return
    dockerd = shutil.which("dockerd")
    require(dockerd is not None and os.geteuid() == 0, "no Docker engine answers and dockerd cannot be started here")
    log = open("/tmp/cvad-dockerd.log", "a")  # noqa: SIM115 - the engine outlives this test session
    subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: sh(DOCKER, "info", check=False, timeout=30).returncode == 0, 120, "dockerd answering")


def build_client() -> str:
    """A docker client that builds with BuildKit (for the build secret): one with buildx, else Debian's docker.io
    client (20.10), which has BuildKit built in where a newer client on PATH needs the buildx plugin."""
    if sh(DOCKER, "buildx", "version", check=False).returncode == 0:
        return DOCKER
    require(Path("/usr/bin/docker").exists(), "no docker client here builds with BuildKit (install docker-buildx)")
    return "/usr/bin/docker"


def image_exists(name: str) -> bool:
    return sh(DOCKER, "image", "inspect", name, check=False).returncode == 0


def pip_setting(key: str) -> str:
    """``global.KEY`` (or ``PIP_KEY``) as pip sees it; ``pip config list`` shows every file, ``get`` only some."""
    found = {}
    for line in sh(sys.executable, "-m", "pip", "config", "list", check=False).stdout.splitlines():
        name, _, value = line.partition("=")
        found[name.strip()] = value.strip().strip("'\"")
    return found.get(f"global.{key}") or found.get(f":env:.{key}", "")


def local_indexes() -> list[Path]:
    """The folders of the file:// package indexes pip's configuration names (torch lies there, offline)."""
    urls = pip_setting("extra-index-url").split() + pip_setting("index-url").split()
    return [Path(urlparse(url).path) for url in urls if url.startswith("file://") and Path(urlparse(url).path).is_dir()]


def debian_base(workdir: Path) -> None:
    """``BASE_IMAGE``: Debian bookworm with python3 and python3-venv, from Debian's packages (no registry)."""
    if image_exists(BASE_IMAGE):
        return
    require(shutil.which("debootstrap") is not None, "debootstrap is not installed (Debian package debootstrap)")
    rootfs = workdir / "rootfs"
    timed(
        "debootstrap_s", "debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
        str(rootfs), "http://deb.debian.org/debian",
    )  # fmt: skip
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run([DOCKER, "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def build_images(workdir: Path) -> None:
    """The cvad image from docker/Dockerfile (BuildKit, for the CA bundle as a secret) and the PostgreSQL image."""
    env = os.environ | {"DOCKER_BUILDKIT": "1"}
    client = build_client()
    args: list[str] = []
    indexes = local_indexes()
    server = None
    if indexes:
        debian_base(workdir)
        top = Path(os.path.commonpath([str(i.parent) for i in indexes]))
        port = INDEX_PORT if port_is_free(INDEX_PORT) else free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(top)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        urls = [f"http://127.0.0.1:{port}/{index.relative_to(top)}" for index in indexes]
        torch_index = next((u for u, i in zip(urls, indexes) if (i / "torch").is_dir()), urls[0])
        extra = [u for u in urls if u != torch_index] + ["https://pypi.org/simple"]
        args += ["--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}"]
        args += [
            "--build-arg",
            f"TORCH_INDEX_URL={torch_index}",
            "--build-arg",
            f"PIP_EXTRA_INDEX_URL={' '.join(extra)}",
        ]
        args += ["--build-arg", "PIP_TRUSTED_HOST=127.0.0.1"]
    cert = pip_setting("cert")
    if cert and Path(cert).is_file():
        args += ["--secret", f"id=pip_cert,src={cert}"]
    try:
        wait_until(lambda: server is None or answers(urls[0] + "/"), 30, "the loopback package index")
        tag = f"cvad:{IMAGE_TAG}"
        cold = not image_exists(tag)
        timed("image_build_cold_s" if cold else "image_build_warm_s", client, "build", "-f", "docker/Dockerfile",
              "-t", tag, *args, ".", cwd=ROOT, env=env, timeout=1500)  # fmt: skip
        if cold:  # the same build again: every layer from the cache
            timed("image_build_warm_s", client, "build", "-f", "docker/Dockerfile", "-t", tag, *args, ".",
                  cwd=ROOT, env=env, timeout=600)  # fmt: skip
        base = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE if indexes else 'debian:bookworm-slim'}"]
        net = ["--network", "host"] if indexes else []
        timed("postgres_image_build_s", client, "build", "-f", str(STACK / "postgres.Dockerfile"), "-t",
              POSTGRES_IMAGE, *base, *net, str(STACK), env=env, timeout=900)  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
    TIMINGS["image_mb"] = round(int(sh(DOCKER, "image", "inspect", "-f", "{{.Size}}", tag).stdout) / 2**20)


def compose_command() -> list[str]:
    if sh(DOCKER, "compose", "version", check=False).returncode == 0:
        return [DOCKER, "compose"]
    found = shutil.which("docker-compose")
    require(found is not None, "neither `docker compose` nor docker-compose is installed")
    return [found]


class Stack:
    """The compose project of this test: its env file, its ports, and compose commands against it."""

    def __init__(self, workdir: Path) -> None:
        self.gate = Gate(workdir / "gate")
        self.gate.folder.chmod(0o777)  # the containers write there as uid 10001
        self.sweeps = workdir / "sweeps"
        self.sweeps.mkdir()
        self.ports = {name: free_port() for name in ("MLFLOW", "DASHBOARD", "RAY_CLIENT", "RAY_DASHBOARD", "POSTGRES")}
        self.password, self.token = secrets.token_hex(12), secrets.token_hex(16)
        self.env_file = workdir / "stack.env"
        lines = {
            "POSTGRES_USER": "cvad", "POSTGRES_PASSWORD": self.password, "RAY_AUTH_TOKEN": self.token,
            "CVAD_IMAGE_TAG": IMAGE_TAG, "RAY_HEAD_CPUS": "0", "RAY_WORKER_CPUS": "1",
            "STACK_POSTGRES_IMAGE": POSTGRES_IMAGE, "STACK_GATE": str(self.gate.folder),
            "STACK_GATE_CODE": str(Path(__file__).parent / "gate"), "STACK_SWEEPS": str(self.sweeps),
        } | {f"{name}_PORT": str(port) for name, port in self.ports.items()}  # fmt: skip
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        self.base = [
            *compose_command(), "--project-name", PROJECT, "--env-file", str(self.env_file),
            "-f", str(ROOT / "docker" / "compose.yaml"), "-f", str(STACK / "compose.test.yaml"),
        ]  # fmt: skip
        self.mlflow = f"http://127.0.0.1:{self.ports['MLFLOW']}"
        self.dashboard = f"http://127.0.0.1:{self.ports['DASHBOARD']}"
        self.optuna = f"postgresql://cvad:{self.password}@127.0.0.1:{self.ports['POSTGRES']}/optuna"

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.base, *args, timeout=timeout, check=check, cwd=ROOT)

    def up(self) -> float:
        started = time.monotonic()
        self("up", "-d", "--no-build", "--scale", "ray-worker=2", timeout=900)
        wait_until(lambda: answers(f"{self.mlflow}/health"), 300, "the stack's MLflow server")
        wait_until(lambda: self.ray_nodes() == 3, 300, "the Ray head and two workers")
        wait_until(lambda: answers(f"{self.dashboard}/_stcore/health"), 300, "the stack's dashboard")
        return round(time.monotonic() - started, 1)

    def on_ray_head(self, code: str, check: bool = True) -> str | None:
        """The last line ``code`` prints, run by Python in the Ray head's container joined to its cluster."""
        joined = f"import ray; ray.init(address='auto', logging_level='ERROR'); {code}"
        done = self("exec", "-T", "ray-head", "python", "-c", joined, check=check, timeout=120)
        lines = done.stdout.strip().splitlines()
        return lines[-1] if done.returncode == 0 and lines else None

    def ray_nodes(self) -> int:
        alive = self.on_ray_head("print(sum(n['Alive'] for n in ray.nodes()))", check=False)
        return int(alive) if alive and alive.isdigit() else 0

    def head_node(self) -> str:
        """The Ray head's node id as a trial's ``cvad.worker`` tag shows it (12 characters)."""
        return self.on_ray_head("print(ray.get_runtime_context().get_node_id())")[:12]

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).stdout.split()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    docker_engine()
    workdir = tmp_path_factory.mktemp("stack")
    build_images(workdir)
    stack = Stack(workdir)
    try:
        TIMINGS["stack_start_s"] = stack.up()
        yield stack
    finally:
        print(stack("logs", "--no-color", "--tail", "60", check=False).stdout)  # shown by pytest on a failure
        stack("down", "-v", "--remove-orphans", check=False)
        print("stack timings:", json.dumps(TIMINGS))
        if os.environ.get("STACK_TIMINGS"):
            Path(os.environ["STACK_TIMINGS"]).write_text(json.dumps(TIMINGS, indent=1))


def trial_figures(runs: list) -> dict[str, dict[str, float]]:
    """Each trial's metrics by its configuration's name, less what the machine's speed and memory use decide and
    the detector file's size (it holds the run config, whose data path differs between the stack and here)."""
    left_out = ("seconds", "latency", "peak", "detector_mb")
    return {
        run.data.tags["mlflow.runName"][4:]: {
            name: value for name, value in run.data.metrics.items() if not any(word in name for word in left_out)
        }
        for run in runs
    }


def write_sweep(stack: Stack, name: str) -> str:
    raw = tiny_sweep(name, Path("/home/cvad/.cache/cvad/builtin"), resources={"cpus_per_trial": 1})
    (stack.sweeps / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return f"/sweeps/{name}.yaml"


def test_every_published_port_is_bound_to_loopback(stack):
    for container in stack("ps", "-q").stdout.split():
        bindings = json.loads(sh(DOCKER, "inspect", "-f", "{{json .NetworkSettings.Ports}}", container).stdout) or {}
        for port, hosts in bindings.items():
            for host in hosts or []:
                assert host["HostIp"] == "127.0.0.1", f"{container} publishes {port} on {host['HostIp']}"


def test_no_secret_or_certificate_is_in_an_image_layer(stack):
    history = sh(DOCKER, "history", "--no-trunc", "--format", "{{.CreatedBy}}", f"cvad:{IMAGE_TAG}").stdout
    assert "BEGIN CERTIFICATE" not in history and stack.password not in history
    cert = Path(pip_setting("cert"))
    require(cert.is_file(), "pip names no CA bundle here, so no build secret was passed")
    digest = hashlib.sha256(cert.read_bytes()).hexdigest()
    find = f"find / -xdev -type f -size {cert.stat().st_size}c -exec sha256sum {{}} + 2>/dev/null; true"
    same_size = sh(DOCKER, "run", "--rm", "--entrypoint", "sh", f"cvad:{IMAGE_TAG}", "-c", find)
    assert digest not in same_size.stdout, f"the build secret {cert} is a file in the image:\n{same_size.stdout}"


def test_a_sweep_on_the_stack_runs_on_the_workers_and_a_killed_worker_loses_no_trial(stack):
    sweep = write_sweep(stack, "stack")
    started = time.monotonic()
    driver = subprocess.Popen(
        [*stack.base, "exec", "-T", "ray-head", "cvad", "sweep", sweep, "--address", "auto",
         "--tracking-uri", "http://mlflow:5000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_until(lambda: stack.gate.reached(1) or driver.poll() is not None, 600, "trial 1 running on a worker")
        assert driver.poll() is None, driver.stdout.read()
        host = (stack.gate.folder / "waiting.1").read_text().strip()
        workers = stack.containers("ray-worker")
        victim = next(c for c in workers if c.startswith(host))  # a container's host name is its short id
        # Its main process killed from outside, as a crash is (``docker kill`` would count as stopping it by hand,
        # which its restart policy leaves stopped).
        os.kill(int(sh(DOCKER, "inspect", "-f", "{{.State.Pid}}", victim).stdout), signal.SIGKILL)
        time.sleep(5)  # Ray notices the lost node (health checks every 0.5 s) before the gate opens
        stack.gate.open()
        output, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
    TIMINGS["sweep_on_stack_s"] = round(time.monotonic() - started, 1)
    assert driver.returncode == 0, output
    assert "Ray: 3 node(s)" in output
    assert "progress channel was lost" not in output  # it lives on the driver's node, which no kill touches
    client, runs = trial_runs(stack.mlflow, "stack")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    ran_on = {r.data.tags["cvad.worker"].split(":")[0] for r in runs}  # Ray node ids (12 characters)
    assert ran_on and stack.head_node() not in ran_on, ran_on  # on the workers, never on the head (it has no CPU)
    rerun = [r.data.tags["cvad.trial"] for r in runs if r.data.tags.get("cvad.retried") == "true"]
    where = {r.data.tags["cvad.trial"]: r.data.tags["cvad.worker"] for r in runs}
    assert rerun == ["1"], (rerun, where, output)  # trial 1 rerun on another Ray node, and said so
    for run in runs:
        assert {"result.json", "matrices"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    wait_until(lambda: stack.ray_nodes() == 3, 300, "the killed worker restarted and back in the Ray cluster")


def test_the_same_sweep_gives_the_same_figures_on_the_stack_as_here(stack, builtin_cache, tmp_path):
    """A sweep with no fault, on the stack (two one-CPU workers) and on this machine's own Ray, timed: a trial is
    a function of its config, so both give the same figures (what depends on the machine's speed left out)."""
    stack.gate.open()  # this sweep is not held
    started = time.monotonic()
    stack("exec", "-T", "ray-head", "cvad", "sweep", write_sweep(stack, "twin"), "--address", "auto",
          "--tracking-uri", "http://mlflow:5000", timeout=900)  # fmt: skip
    TIMINGS["same_sweep_on_stack_s"] = round(time.monotonic() - started, 1)
    local = tmp_path / "twin.yaml"
    local.write_text(yaml.safe_dump(tiny_sweep("twin", builtin_cache, resources={"cpus_per_trial": 1})))
    timed("same_sweep_here_s", str(Path(sys.executable).parent / "cvad"), "sweep", str(local),
          "--store", str(tmp_path / "store"), timeout=900)  # fmt: skip
    _, on_stack = trial_runs(stack.mlflow, "twin")
    _, here = trial_runs(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "twin")
    stack_figures, here_figures = trial_figures(on_stack), trial_figures(here)
    assert len(stack_figures) == 4 and stack_figures.keys() == here_figures.keys()
    for name, expected in here_figures.items():
        got = stack_figures[name]
        differ = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != pytest.approx(v, rel=1e-6)}
        assert got.keys() == expected.keys(), (name, got.keys() ^ expected.keys())
        assert not differ, (name, differ)


def test_down_and_up_keeps_every_run_the_study_and_the_artifacts_and_recommend_answers(stack):
    import optuna

    _, before = trial_runs(stack.mlflow, "stack")
    study_before = optuna.load_study(study_name="stack", storage=stack.optuna).trials
    stack("down", timeout=600)  # the volumes stay
    assert not answers(f"{stack.mlflow}/health")
    TIMINGS["stack_restart_s"] = stack.up()
    client, after = trial_runs(stack.mlflow, "stack")
    assert {r.info.run_id for r in after} == {r.info.run_id for r in before}
    assert [t.state for t in optuna.load_study(study_name="stack", storage=stack.optuna).trials] == [
        t.state for t in study_before
    ]
    record = json.loads(Path(client.download_artifacts(after[0].info.run_id, "result.json")).read_text())
    assert record["tasks"] == ["brick", "grass"]
    done = sh(str(Path(sys.executable).parent / "cvad"), "recommend", "--tracking-uri", stack.mlflow, check=False)
    assert done.returncode == 0 and "padim" in done.stdout.lower(), done.stdout + done.stderr


def test_the_stacks_dashboard_answers_in_a_real_browser(stack, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require(chromium is not None, "Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(stack.dashboard, timeout=120_000)
        alert = page.locator("[data-testid='stAlert']").first
        alert.wait_for(timeout=120_000)
        assert "padim" in alert.inner_text().lower()
        page.screenshot(path=str(tmp_path / "stack-dashboard.png"), full_page=True)
        browser.close()
