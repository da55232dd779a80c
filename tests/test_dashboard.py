"""The dashboard on a real MLflow store filled by a real small sweep: AppTest, then a real browser."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cvad.selection import Budget, load_trials, of_stream, project_to_tasks, recommend, streams
from support import log_trial, require, run_sweep, tiny_sweep

pytestmark = pytest.mark.slow  # every test here reads a real sweep's store

APP = str(Path(__file__).parents[1] / "dashboard" / "app.py")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def store(tmp_path_factory, builtin_cache) -> str:
    root = tmp_path_factory.mktemp("dashboard-store")
    raw = tiny_sweep(
        "dash",
        builtin_cache,
        space={
            "model": [
                {"name": "padim", "params": {"n_features": 8, "continual": ["unimodal", "multimodal"]}},
                {"name": "patchcore", "params": {"continual": "cl++", "bank_size": [20, 200]}},
            ]
        },
    )
    outcome = run_sweep(raw, root)
    assert outcome.completed == 4
    return f"sqlite:///{root / 'mlflow.db'}"


def app(uri: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what `cvad dashboard --tracking-uri` passes, for reruns too
    return AppTest.from_file(APP, default_timeout=120).run()


def test_app_recommends_what_cvad_recommend_does(store, monkeypatch):
    at = app(store, monkeypatch)
    assert not at.exception
    trials = load_trials(store)
    everything = recommend(trials, "pixel_f1", Budget(max_mb=1e9, max_gflops=1e9))
    assert at.success[0].value.endswith(everything.summary().split(": ", 1)[1])
    smallest = trials["memory_mb"].min()
    at.number_input(key="max_mb").set_value(round(smallest + 0.005, 2)).run()
    tight = recommend(
        trials,
        "pixel_f1",
        Budget(max_mb=round(smallest + 0.005, 2), max_gflops=at.number_input(key="max_gflops").value),
    )
    assert tight.picks.loc[0, "memory_mb"] == smallest
    assert at.success[0].value == tight.summary()
    pareto_tab = at.tabs[1]
    assert len(pareto_tab.get("plotly_chart")) == 3  # MB front, GFLOPs front, 3-D view


def test_app_projects_to_more_tasks_before_the_budget_and_the_charts(store, monkeypatch):
    at = app(store, monkeypatch)
    at.number_input(key="tasks").set_value(30).run()
    at.checkbox[0].check().run()  # the paper's published figures
    assert not at.exception
    projected = project_to_tasks(load_trials(store), 30)
    assert at.success[0].value == recommend(projected, "pixel_f1").summary() + " (MB and GFLOPs projected to 30 tasks)"
    memory_chart = at.get("plotly_chart")[0].proto.spec
    assert "memory (MB = 2^20 bytes)" in memory_chart and "PaSTe, replay 100" in memory_chart
    assert "GFLOPs per image (2 x multiply-adds)" in at.get("plotly_chart")[1].proto.spec


def test_projection_prices_each_trials_own_configuration(store):
    from mlflow.tracking import MlflowClient

    from cvad.config import validate_config
    from cvad.cost import price_config

    projected = project_to_tasks(load_trials(store), 6)
    assert projected["projection_error"].isna().all() and projected["projected_tasks"].eq(6).all()
    multimodal = projected[projected["params"].map(lambda p: p["model.params.continual"] == "multimodal")].iloc[0]
    assert multimodal["memory_mb"] > multimodal["measured_memory_mb"]  # one Gaussian per task: 6 instead of 2
    result = json.loads(Path(MlflowClient(store).download_artifacts(multimodal["run_id"], "result.json")).read_text())
    price = price_config(validate_config(result["config"]), 6)  # the config as run, not as read back from the params
    assert (multimodal["memory_mb"], multimodal["gflops"]) == (price["memory_mb"], price["gflops"])
    logged = result["efficiency"]
    assert (multimodal["measured_memory_mb"], multimodal["measured_gflops"]) == (logged["memory_mb"], logged["gflops"])


def test_cli_recommend_projects_to_more_tasks(store):
    from typer.testing import CliRunner

    from cvad.cli import cli

    trials = load_trials(store)
    multimodal = trials[trials["params"].map(lambda p: p["model.params.continual"] == "multimodal")].iloc[0]
    budget = f"{multimodal['memory_mb'] + 0.001:.3f}"  # fits as measured after 2 tasks, not after 30
    args = ["recommend", "--tracking-uri", store, "--max-mb", budget, "--json"]
    measured = json.loads(CliRunner().invoke(cli, args).stdout)
    result = CliRunner().invoke(cli, [*args, "--tasks", "30"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    expected = recommend(project_to_tasks(trials, 30), "pixel_f1", Budget(max_mb=float(budget)))
    assert answer["projected_tasks"] == 30
    assert answer["summary"] == expected.summary() + " (MB and GFLOPs projected to 30 tasks)"
    assert [p["run_id"] for p in answer["picks"]] == list(expected.picks["run_id"])
    assert answer["picks"][0]["memory_mb"] == pytest.approx(expected.picks.loc[0, "memory_mb"])
    assert answer["excluded"]["over budget"] > measured["excluded"]["over budget"]
    assert multimodal["run_id"] not in {p["run_id"] for p in answer["picks"]}


def test_continual_view_opens_on_the_top_pick_with_curves_matrices_and_overlays(store, monkeypatch):
    at = app(store, monkeypatch)
    top = recommend(load_trials(store), "pixel_f1", Budget(max_mb=1e9, max_gflops=1e9)).picks.iloc[0]
    chooser = at.multiselect(key="continual_trials")
    assert chooser.value == [f"{top['name']}  #{top['trial']}"]  # not empty until the user picks
    assert not at.exception
    assert len(at.get("plotly_chart")) == 3 + 5  # + curve, heatmap, forgetting bars, update cost, threshold drift
    assert len(at.get("image")) == 4  # the overlays: 2 tasks x 2 defective images
    stepped = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    stepped = [
        f for f in stepped if f["layout"].get("xaxis", {}).get("title", {}).get("text") in ("after task", "step")
    ]
    assert len(stepped) == 2 and all(f["layout"]["xaxis"]["dtick"] == 1 for f in stepped)  # never a tick at 1.5
    chooser.set_value([chooser.options[-1]]).run()
    assert not at.exception and len(at.get("plotly_chart")) == 3 + 5


def test_recommendation_says_how_to_deploy_each_pick(store, tmp_path, monkeypatch):
    """The top pick's stored detector, export figures, registered model and export command; a runner-up without a
    detector or an export says so and how to get one."""
    import shlex

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from cvad.config import load_config

    copy = tmp_path / "mlflow.db"  # the shared store's runs stay without exports
    shutil.copy(store.removeprefix("sqlite:///"), copy)
    uri = f"sqlite:///{copy}"
    picks = recommend(load_trials(uri), "pixel_f1").picks
    assert len(picks) >= 2
    top, runner_up = picks.iloc[0], picks.iloc[1]
    mlflow = MlflowClient(uri)
    exported = {"export_onnx_mb": 1.25, "export_onnx_latency_ms": 3.5, "export_torchscript_mb": 2.5}  # cvad export's
    now = int(time.time() * 1000)
    mlflow.log_batch(top["run_id"], metrics=[Metric(k, v, now, 0) for k, v in exported.items()])
    mlflow.set_tag(top["run_id"], "cvad.detector", "stored")
    mlflow.set_tag(top["run_id"], "cvad.registered", "dash-pick:3")
    if runner_up["detector"] == "stored":  # as a run whose detector its sweep did not keep
        mlflow.delete_tag(runner_up["run_id"], "cvad.detector")
    at = app(uri, monkeypatch)
    assert not at.exception
    first, second = at.tabs[0].expander[:2]
    facts = first.markdown[0].value
    assert f"stored in its run (`detector.pt`, {top['detector_mb']:.3g} MB)" in facts
    assert f"{top['memory_mb']:.3g} MB, {top['gflops']:.3g} GFLOPs" in facts
    assert "ONNX 1.25 MB, 3.5 ms per image; TorchScript 2.5 MB (median" in facts and "`dash-pick:3`" in facts
    command = f"cvad export {top['run_id']} --format onnx --register dash-pick --tracking-uri {shlex.quote(uri)}"
    assert first.code[0].value == command
    facts = second.markdown[0].value
    assert "not kept" in facts and "`sweep.detectors: all`" in facts and "not exported yet" in facts
    download, rerun, export = second.code[0].value.splitlines()
    assert f"--run-id {runner_up['run_id']} --artifact-path config.yaml" in download
    config = Path(mlflow.download_artifacts(runner_up["run_id"], "config.yaml", str(tmp_path)))
    folder = f"trial-{runner_up['run_id'][:8]}"
    assert rerun == f"cvad run {folder}/config.yaml --out {folder}/run" and load_config(config)
    assert export == f"cvad export {folder}/run --format onnx"


def copied_store(store: str, folder: Path) -> tuple:
    """A copy of the sweep's store in ``folder``: its URI, a TrackingStore on it, the sweep's experiment and run."""
    from cvad.tracking import TrackingStore

    copy = folder / "mlflow.db"
    shutil.copy(store.removeprefix("sqlite:///"), copy)
    uri = f"sqlite:///{copy}"
    tracker = TrackingStore(uri)
    experiment = tracker.open_experiment("dash")
    return uri, tracker, experiment, tracker.sweep_run(experiment)


@pytest.fixture(scope="module")
def two_streams(store, tmp_path_factory) -> str:
    """A copy of the sweep's store plus one trial of the same sweep on another task list (a resumed 'tasks: all')."""
    from cvad.tracking import Tag

    uri, tracker, experiment, parent = copied_store(store, tmp_path_factory.mktemp("two-streams"))
    config = {
        "dataset": {"name": "builtin", "tasks": ["brick"]}, "model": {"name": "padim", "params": {}},
        "backbone": {"name": "mobilenetv2_100"}, "strategy": {"name": "finetune"},
    }  # fmt: skip
    figures = {"pixel_f1": 0.99, "image_f1": 0.99, "memory_mb": 0.01, "gflops": 0.01}
    # Would top any front, but it learned one task, not two.
    log_trial(tracker, experiment, parent, 9, config, None, ["brick"], figures, sweep="dash", **{Tag.SCHEMA: "2"})
    return uri


def test_stream_selector_filters_every_view(two_streams, monkeypatch):
    trials = load_trials(two_streams)
    sweep_stream, lone = streams(trials)
    assert [len(of_stream(trials, s)) for s in (sweep_stream, lone)] == [4, 1]
    at = app(two_streams, monkeypatch)
    assert not at.exception
    selector = at.selectbox(key="stream")
    assert selector.options == [f"{sweep_stream.describe()} (4 trial(s))", "builtin: 1 task (brick) (1 trial(s))"]
    assert selector.value == sweep_stream  # the stream with the most trials
    assert at.success[0].value == recommend(of_stream(trials, sweep_stream)).summary()
    assert len(at.dataframe[-1].value) == 4  # the runs table
    selector.select(lone).run()
    assert not at.exception
    assert at.success[0].value == recommend(of_stream(trials, lone)).summary()
    assert len(at.dataframe[-1].value) == 1 and len(at.tabs[1].get("plotly_chart")) == 3


def test_empty_and_unreachable_stores_explain_what_to_run(tmp_path, monkeypatch):
    at = app(f"sqlite:///{tmp_path / 'missing.db'}", monkeypatch)
    assert not at.exception and "cvad sweep" in at.info[0].value
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    at = app(f"http://127.0.0.1:{port}", monkeypatch)
    assert not at.exception and "unreachable" in at.info[0].value


def test_cli_recommend_json(store):
    out = subprocess.run(
        [sys.executable, "-m", "cvad", "recommend", "--tracking-uri", store, "--max-mb", "1000", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    answer = json.loads(out)
    assert answer["picks"] and answer["picks"][0]["why"] == "highest pixel F1 within the budget"
    assert answer["excluded"]["failed or unfinished"] == 0


def test_in_a_real_browser(store, tmp_path):
    require(CHROMIUM is not None, "Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "cvad", "dashboard", "--tracking-uri", store, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        trials = load_trials(store)
        budget = round(float(trials["memory_mb"].min()) + 0.005, 2)
        expected = recommend(trials, "pixel_f1", Budget(max_mb=budget)).picks.loc[0, "name"]
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}", timeout=60_000)
            alert = page.locator("[data-testid='stAlert']").first
            alert.wait_for(timeout=60_000)
            field = page.get_by_role("spinbutton", name="max memory (MB)")
            field.fill(str(budget))
            field.press("Enter")
            page.locator("[data-testid='stAlert']", has_text=f"under {budget:g} MB").first.wait_for(timeout=60_000)
            assert expected in alert.inner_text()
            # A results viewer: Streamlit's own "Deploy" button (a developer option) is not offered.
            assert page.locator("[data-testid='stAppDeployButton']").count() == 0
            page.get_by_role("tab", name="Pareto fronts").click()
            page.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # let plotly finish drawing before the picture
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
        print(f"screenshot: {shot}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=20)


def test_a_weights_warning_names_the_trials_it_is_true_of_and_a_pruned_trial_is_none(store, tmp_path, monkeypatch):
    """A pruned trial never ran, so it ran no weights: it carries no cvad.pretrained tag and warns of nothing."""
    import streamlit as st

    from cvad.tracking import Tag

    uri, tracker, experiment, parent = copied_store(store, tmp_path)
    config = {
        "dataset": {"name": "builtin", "tasks": ["brick", "grass"]}, "model": {"name": "cfa", "params": {}},
        "backbone": {"name": "mobilenetv2_100"}, "strategy": {"name": "finetune"},
    }  # fmt: skip
    (stream,) = streams(load_trials(store))  # both runs on the sweep's own stream, as a sweep logs them
    pruned = log_trial(tracker, experiment, parent, 7, config, sweep="dash", **{Tag.PRUNED: "99 MB > max_mb 20"})
    tracker.log_stream(pruned, stream)
    at = app(uri, monkeypatch)
    assert not at.exception and not [w for w in at.warning if "random" in w.value]
    figures = {"pixel_f1": 0.01, "image_f1": 0.01}
    cost = {"memory_mb": 0.5, "gflops": 0.1}
    random = log_trial(
        tracker, experiment, parent, 8, config, cost, ["brick", "grass"], figures, pretrained=False, sweep="dash"
    )
    tracker.log_stream(random, stream)
    st.cache_data.clear()  # the app caches the store's trials for a while, in this process too
    at = app(uri, monkeypatch)
    (warning,) = [w.value for w in at.warning if "random" in w.value]
    assert warning.startswith("1 trial(s) ran with random (untrained) backbone weights: CFA") and "#8" in warning
