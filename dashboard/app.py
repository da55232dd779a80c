"""cvad dashboard: what to deploy under a memory and compute budget.

Launched by ``cvad dashboard`` (``streamlit run dashboard/app.py -- --tracking-uri URI``).
It only renders: trials come from MLflow through ``cvad.selection``, which also holds the
Pareto and budget logic shared with ``cvad recommend``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from cvad.metrics import DETECTION_METRICS, FORGETTING_METRICS, METRIC_LABELS, forgetting_per_task
from cvad.selection import (
    DEFAULT_METRIC,
    PUBLISHED_MVTEC,
    QUALITY_METRICS,
    Budget,
    SelectionError,
    load_trials,
    of_stream,
    pareto_mask,
    project_to_tasks,
    recommend,
    streams,
    version_table,
)  # fmt: skip
from cvad.tracking import TrackingError, TrackingStore, resolve_tracking_uri

st.set_page_config(page_title="cvad: what to deploy", layout="wide")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracking_uri_from_args() -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tracking-uri")
    known, _ = parser.parse_known_args(sys.argv[1:])
    return resolve_tracking_uri(known.tracking_uri)


@st.cache_data(ttl=30, show_spinner="reading trials from MLflow ...")
def cached_trials(uri: str, sweeps: tuple[str, ...]) -> pd.DataFrame:
    return load_trials(uri, list(sweeps) or None)


@st.cache_data(max_entries=8, show_spinner="pricing each configuration after N tasks ...")
def cached_projection(trials: pd.DataFrame, tasks: int) -> pd.DataFrame:
    """Kept until the trials change: pricing builds each configuration's model (seconds each)."""
    return project_to_tasks(trials, tasks)


@st.cache_resource
def store(uri: str) -> TrackingStore:
    """The tracking store the dashboard reads matrices, curves and overlays from (one per URI)."""
    return TrackingStore(uri)


@st.cache_resource
def downloads() -> tempfile.TemporaryDirectory:
    """One folder for the artifacts the dashboard shows, kept while it runs and removed when it stops."""
    return tempfile.TemporaryDirectory(prefix="cvad-dashboard-")


def downloaded(run_id: str) -> Path:
    """Where a run's artifacts are downloaded (a folder per run: two runs' overlays share file names)."""
    folder = Path(downloads().name) / run_id
    folder.mkdir(exist_ok=True)
    return folder


AXIS_LABELS = {"memory_mb": "memory (MB = 2^20 bytes)", "gflops": "GFLOPs per image (2 x multiply-adds)"}


def log_axis(values: pd.Series) -> bool:
    """Log scale when the values span more than a decade."""
    positive = values[values > 0]
    return len(positive) > 1 and positive.max() / positive.min() > 10


def pareto_figure(trials: pd.DataFrame, metric: str, x: str, front: pd.Series, published: bool) -> go.Figure:
    shown = pd.concat([trials[x], PUBLISHED_MVTEC[x]]) if published else trials[x]
    figure = px.scatter(
        trials, x=x, y=metric, color="model", symbol="backbone", hover_name="name",
        hover_data={"config": True, "sweep": True, "trial": True, "model": False, "backbone": False},
        log_x=log_axis(shown), labels={x: AXIS_LABELS[x], metric: METRIC_LABELS[metric]},
    )  # fmt: skip
    # This chart's own front (quality vs this cost alone) as a staircase: each step is the best quality
    # reachable up to that cost. The three-objective front is marked apart: its points need not join up here.
    own = trials[pareto_mask(trials, metric, costs=(x,))].sort_values(x)
    figure.add_trace(
        go.Scatter(
            x=own[x], y=own[metric], mode="lines", line_shape="hv", name=f"front: {METRIC_LABELS[metric]} vs this axis",
            line={"color": "black", "dash": "dot"},
        )
    )  # fmt: skip
    marked = trials[front]
    figure.add_trace(
        go.Scatter(
            x=marked[x], y=marked[metric], mode="markers", name="on the 3-objective front (quality, MB, GFLOPs)",
            marker={"size": 14, "symbol": "circle-open", "color": "black"},
        )
    )  # fmt: skip
    if published and metric in PUBLISHED_MVTEC:
        figure.add_trace(
            go.Scatter(
                x=PUBLISHED_MVTEC[x], y=PUBLISHED_MVTEC[metric], mode="markers+text", text=PUBLISHED_MVTEC["name"],
                textposition="top center", name="published (paper, MVTec AD)",
                marker={"symbol": "x", "color": "grey", "size": 10},
            )
        )  # fmt: skip
    figure.update_layout(height=460, legend={"font": {"size": 10}})
    return figure


def matrix_frame(uri: str, run_id: str, metric: str) -> pd.DataFrame | None:
    try:
        path = store(uri).download(run_id, f"matrices/{metric}.csv", downloaded(run_id))
    except Exception:  # an older or failed run without matrices
        return None
    return pd.read_csv(path, index_col=0)


def continual_view(uri: str, trials: pd.DataFrame, metric: str, top: pd.Series | None) -> None:
    """Curves, matrices, forgetting and overlays of the chosen trials; opens on the recommendation's top pick."""
    finished = trials[trials["status"].eq("FINISHED")]
    labels = finished["name"] + "  #" + finished["trial"].astype(str)
    opening = [f"{top['name']}  #{top['trial']}"] if top is not None else []
    chosen = st.multiselect(
        "trials", labels, default=[label for label in opening if label in set(labels)], max_selections=6,
        key="continual_trials",
    )  # fmt: skip
    if not chosen:
        st.info("Pick trials to see each metric after every task, the task × task matrix and forgetting.")
        return
    rows = finished[(finished["name"] + "  #" + finished["trial"].astype(str)).isin(chosen)]
    curves = []
    for _, row in rows.iterrows():
        for step, value in store(uri).metric_history(row["run_id"], metric):
            curves.append(
                {
                    "trial": f"{row['name']} #{row['trial']}",
                    "after task": step + 1,
                    METRIC_LABELS[metric]: value,
                }
            )
    if curves:
        st.plotly_chart(
            whole_steps(
                px.line(
                    pd.DataFrame(curves),
                    x="after task",
                    y=METRIC_LABELS[metric],
                    color="trial",
                    markers=True,
                    title=f"{METRIC_LABELS[metric]} averaged over the tasks seen",
                )
            ),
            width="stretch",
        )
    for _, row in rows.iterrows():
        st.subheader(f"{row['name']}  (trial {row['trial']})")
        matrix = matrix_frame(uri, row["run_id"], metric)
        left, right = st.columns(2)
        if matrix is not None:
            left.plotly_chart(
                px.imshow(
                    matrix,
                    text_auto=".2f",
                    color_continuous_scale="Viridis",
                    labels={"x": "evaluated on", "y": "after training on"},
                    title="task × task",
                ),
                width="stretch",
            )
            forgetting = forgetting_per_task(matrix.astype(object).where(matrix.notna(), None).to_numpy().tolist())
            right.plotly_chart(
                px.bar(
                    x=matrix.columns[: len(forgetting)],
                    y=forgetting,
                    labels={"x": "task", "y": "forgetting"},
                    title="forgetting per task (best earlier - final)",
                ),
                width="stretch",
            )
        update_view(uri, row["run_id"])
        overlays = store(uri).artifact_paths(row["run_id"], "overlays")
        if overlays:
            st.caption("image | ground truth | anomaly map")
            cols = st.columns(min(3, len(overlays)))
            for i, path in enumerate(overlays[:6]):
                image = store(uri).download(row["run_id"], path, downloaded(row["run_id"]))
                cols[i % len(cols)].image(str(image), caption=Path(path).stem)


def whole_steps(figure: go.Figure) -> go.Figure:
    """An x axis of tasks, steps or versions: ticks on whole numbers only (never "after task 1.5")."""
    return figure.update_xaxes(dtick=1, tick0=1, tickformat="d")


def update_view(uri: str, run_id: str) -> None:
    """What each training step (an update on the device) cost, and how each task's image threshold moved."""
    left, right = st.columns(2)
    costs = [
        {"step": step + 1, "cost": label, "value": value}
        for metric, label in (("step_update_seconds", "seconds"), ("step_update_peak_mb", "peak memory rise, MB"))
        for step, value in store(uri).metric_history(run_id, metric)
    ]
    if costs:
        left.plotly_chart(
            whole_steps(
                px.bar(
                    pd.DataFrame(costs),
                    x="step",
                    y="value",
                    color="cost",
                    barmode="group",
                    title="update cost per step",
                )
            ),
            width="stretch",
        )
    drift = matrix_frame(uri, run_id, "image_threshold")
    if drift is not None:
        right.plotly_chart(
            px.imshow(
                drift,
                text_auto=".3g",
                color_continuous_scale="Cividis",
                title="image threshold each task's held-out images give (deployed: the diagonal)",
                labels={"x": "task", "y": "after training on"},
            ),  # fmt: skip
            width="stretch",
        )


EXPORT_FORMATS = {"onnx": "ONNX", "torchscript": "TorchScript"}  # cvad export --format: the metrics' infix, title


def number(value: float) -> str:
    """3 significant digits, without an exponent for the hundreds of MB a large memory bank takes."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def measured(value) -> bool:
    """A metric the run holds: runs without it read back as None or NaN."""
    return value is not None and pd.notna(value)


def registered_model_name(sweep: str) -> str:
    """The MLflow model a sweep's picks register as, each registration a version ('/' and ':' are not allowed)."""
    return re.sub(r"[/:\s]+", "-", sweep) + "-pick"


def deployment_facts(pick: pd.Series) -> str:
    """Markdown: the pick's stored detector, the trial's figures (as ranked), its exports and its registered model."""
    if pick["detector"] == "stored":
        detector = "stored in its run (`detector.pt`" + (
            f", {number(pick['detector_mb'])} MB)" if measured(pick["detector_mb"]) else ")"
        )
    else:
        detector = (
            "not kept: a sweep keeps the detectors of its Pareto front's trials by default "
            "(`sweep.detectors: all` keeps every one)"
        )
    ranked = [f"{number(pick['memory_mb'])} MB", f"{number(pick['gflops'])} GFLOPs"]
    if measured(pick["latency_ms"]):
        ranked.append(f"{number(pick['latency_ms'])} ms per image (PyTorch, batch 1)")
    exports = []
    for fmt, title in EXPORT_FORMATS.items():
        figures = [f"{number(pick[f'export_{fmt}_mb'])} MB"] if measured(pick[f"export_{fmt}_mb"]) else []
        if measured(pick[f"export_{fmt}_latency_ms"]):
            figures.append(f"{number(pick[f'export_{fmt}_latency_ms'])} ms per image")
        if figures:
            exports.append(f"{title} {', '.join(figures)}")
    exported = "; ".join(exports) + " (median at batch 1 on the exporting machine)" if exports else "not exported yet"
    lines = [f"- **detector**: {detector}", f"- **trial**: {', '.join(ranked)}", f"- **exported**: {exported}"]
    if measured(pick["registered"]):
        lines.append(f"- **registered model**: `{pick['registered']}`")
    return "\n".join(lines)


def deployment_view(uri: str, picks: pd.DataFrame) -> None:
    """Per pick (best first): what deploying it takes, and the command that ships it, ready to copy."""
    st.subheader("Deploying a pick")
    for rank, pick in picks.iterrows():
        label = f"{rank + 1}. {pick['name']}  (sweep {pick['sweep']}, trial {pick['trial']})"
        with st.expander(label, expanded=rank == 0):
            st.markdown(deployment_facts(pick))
            run_id, quoted_uri = pick["run_id"], shlex.quote(uri)
            if pick["detector"] == "stored":
                st.caption("Export it to one verified file and register it in the MLflow model registry:")
                name = shlex.quote(registered_model_name(pick["sweep"]))
                command = f"cvad export {run_id} --format onnx --register {name} --tracking-uri {quoted_uri}"
            else:
                st.caption("Train its configuration again with `cvad run` (which keeps the detector) and export that:")
                folder = f"trial-{run_id[:8]}"
                command = (
                    f"MLFLOW_TRACKING_URI={quoted_uri} mlflow artifacts download --run-id {run_id} "
                    f"--artifact-path config.yaml --dst-path {folder}\n"
                    f"cvad run {folder}/config.yaml --out {folder}/run\n"
                    f"cvad export {folder}/run --format onnx"
                )
            st.code(command, language="bash")


VERSION_METRICS = ("pixel_f1", "image_f1", "pixel_aupro", "image_f1_calibrated", "image_fpr", "pixel_f1_calibrated")


def registry_view(uri: str, metric: str) -> None:
    """A registered model's versions (one per task learned on the line): tasks added, the metric over versions,
    thresholds, forgetting and what each update cost."""
    try:
        registry = TrackingStore(uri, must_exist=True)  # a reader: a store that is not there is not created
        names = registry.registered_models()
    except TrackingError:  # the store itself is missing or unreachable: the message above says so
        return
    if not names:
        st.info("No model is registered yet: `cvad export ... --register NAME` or `cvad learn ... --register NAME`.")
        return
    name = st.selectbox("registered model", names, key="registered_model")
    versions = version_table(registry, name)
    if versions.empty:
        st.info(f"{name} has no versions.")
        return
    shown = [m for m in (metric, *VERSION_METRICS) if m in versions]
    chart = versions.melt(id_vars=["version", "learned"], value_vars=list(dict.fromkeys(shown)), var_name="metric")
    figure = px.line(
        chart, x="version", y="value", color="metric", markers=True, hover_data=["learned"],
        labels={"value": "mean over the tasks seen (last matrix row)"},
    )  # fmt: skip
    st.plotly_chart(whole_steps(figure), width="stretch")
    columns = ["version", "tasks", "learned", *dict.fromkeys(shown), *FORGETTING_METRICS]
    columns += ["image_threshold", "pixel_threshold", "update_seconds", "update_peak_mb", "memory_mb", "task_list"]
    st.dataframe(versions[[c for c in columns if c in versions]], hide_index=True, width="stretch")
    st.caption(
        "Each `cvad learn --register` adds a version: the task it learned, the metrics after it on every task seen, "
        "forgetting, the new task's thresholds and what its update took (wall seconds, peak memory rise)."
    )


def main() -> None:
    st.title("cvad: what should the camera run?")
    uri = st.sidebar.text_input("MLflow tracking URI", tracking_uri_from_args())
    try:
        everything = cached_trials(uri, ())
    except (SelectionError, TrackingError) as exc:
        st.info(str(exc))
        if isinstance(exc, SelectionError):  # no sweep yet, but a line may already have registered versions
            st.header("Registered models")
            registry_view(uri, DEFAULT_METRIC)
        return
    except Exception as exc:  # an unreadable store must never show a traceback
        st.error(f"cannot read trials from {uri}: {exc}")
        return
    sweeps = st.sidebar.multiselect(
        "sweeps", sorted(everything["sweep"].unique()), default=sorted(everything["sweep"].unique())
    )
    tasks = st.sidebar.number_input(
        "project to N tasks", min_value=0, value=None, step=1, placeholder="as measured", key="tasks",
        help="re-price each trial's memory and GFLOPs after N tasks (0 or empty: as measured)",
    )  # fmt: skip
    if tasks:
        everything = cached_projection(everything, int(tasks))
    trials = everything[everything["sweep"].isin(sweeps)]
    labels = {s: f"{s.describe()} ({len(of_stream(trials, s))} trial(s))" for s in streams(trials)}
    stream = st.sidebar.selectbox(
        "task stream", list(labels), key="stream", format_func=labels.get,
        help="the dataset and its ordered task list: trials of different streams are never ranked together",
    )  # fmt: skip
    trials = of_stream(trials, stream).copy() if stream is not None else trials.copy()
    trials["config"] = trials["params"].map(lambda p: "<br>".join(f"{k}={v}" for k, v in sorted(p.items())))
    metric = st.sidebar.selectbox(
        "quality metric", QUALITY_METRICS, index=QUALITY_METRICS.index(DEFAULT_METRIC), format_func=METRIC_LABELS.get
    )
    # Empty budgets mean no limit: a default taken from the measured figures would cut trials projected to more tasks.
    max_mb = st.sidebar.number_input(
        "max memory (MB)", min_value=0.0, value=None, step=1.0, placeholder="no limit", key="max_mb",
        help="MB = 2^20 bytes",
    )  # fmt: skip
    max_gflops = st.sidebar.number_input(
        "max GFLOPs per image", min_value=0.0, value=None, step=0.1, placeholder="no limit", key="max_gflops",
        help="GFLOPs = 2 x multiply-adds",
    )  # fmt: skip
    min_image_f1 = st.sidebar.slider("min image F1", 0.0, 1.0, 0.0, 0.01, key="min_image_f1")
    max_update_s = st.sidebar.number_input(
        "max update seconds", min_value=0.0, value=None, step=1.0, placeholder="no limit", key="max_update_s",
        help="the largest training step's wall time: what learning the next product takes",
    )  # fmt: skip
    max_update_mb = st.sidebar.number_input(
        "max update memory (MB)", min_value=0.0, value=None, step=10.0, placeholder="no limit", key="max_update_mb",
        help="the largest training step's peak memory rise (MB = 2^20 bytes)",
    )  # fmt: skip
    published = st.sidebar.checkbox("show the paper's published figures (MVTec AD)", value=False)

    rec = recommend(trials, metric, Budget(max_mb, max_gflops, min_image_f1 or None, max_update_s, max_update_mb))
    tab_recommend, tab_pareto, tab_continual, tab_runs, tab_registry = st.tabs(
        ["Recommendation", "Pareto fronts", "Continual", "Runs", "Registered models"]
    )
    projected = f" (MB and GFLOPs projected to {tasks} tasks)" if tasks else ""
    with tab_recommend:
        (st.success if not rec.picks.empty else st.warning)(rec.summary() + projected)
        if not rec.picks.empty:
            st.dataframe(
                rec.picks[["name", metric, "memory_mb", "gflops", "image_f1", "pretrained", "why", "sweep", "trial"]],
                hide_index=True,
                width="stretch",
            )
        left_out = ", ".join(f"{n} {reason}" for reason, n in rec.excluded.items() if n)
        if left_out:
            st.caption(f"left out: {left_out}")
        if tasks and trials["projection_error"].notna().any():
            kept = trials[trials["projection_error"].notna()]
            reasons = "; ".join(f"{n}: {e}" for n, e in zip(kept["name"], kept["projection_error"]))
            st.warning(f"Kept as measured, not projected: {reasons}")
        random = trials[trials["pretrained"].eq(False)]  # None: never trained (pruned), so no weights ran
        if not random.empty:
            named = ", ".join(f"{n} #{t}" for n, t in zip(random["name"], random["trial"]))
            st.warning(
                f"{len(random)} trial(s) ran with random (untrained) backbone weights: {named}; "
                "their figures do not reflect a pretrained model."
            )
        if not rec.picks.empty:
            deployment_view(uri, rec.picks)
    usable = trials[trials["status"].eq("FINISHED") & trials[metric].notna()]
    with tab_pareto:
        if usable.empty:
            st.info(f"No finished trial has {METRIC_LABELS[metric]}.")
        else:
            front = pd.Series(pareto_mask(usable, metric), index=usable.index)
            left, right = st.columns(2)
            left.plotly_chart(pareto_figure(usable, metric, "memory_mb", front, published), width="stretch")
            right.plotly_chart(pareto_figure(usable, metric, "gflops", front, published), width="stretch")
            cube = px.scatter_3d(
                usable, x="memory_mb", y="gflops", z=metric, color="model", symbol="backbone", hover_name="name",
                log_x=log_axis(usable["memory_mb"]), log_y=log_axis(usable["gflops"]),
                labels={**AXIS_LABELS, metric: METRIC_LABELS[metric]},
            )  # fmt: skip
            cube.update_layout(height=560)
            st.plotly_chart(cube, width="stretch")
            if published:
                st.caption(
                    "Grey crosses: the paper's published numbers on MVTec AD (MobileNetV2 unless named), "
                    "not measured here."
                )
    with tab_continual:
        continual_view(uri, trials, metric, None if rec.picks.empty else rec.picks.iloc[0])
    with tab_runs:
        models = st.multiselect("models", sorted(trials["model"].unique()))
        statuses = st.multiselect("status", sorted(trials["status"].unique()))
        keep = pd.Series(True, index=trials.index)
        if models:
            keep &= trials["model"].isin(models)
        if statuses:
            keep &= trials["status"].isin(statuses)
        table = trials[keep]
        columns = ["sweep", "trial", "name", "status", *DETECTION_METRICS, *FORGETTING_METRICS, "memory_mb", "gflops"]
        columns += ["latency_ms", "latency_noisy", "update_seconds", "update_peak_mb", "pretrained", "schema", "error"]
        columns += ["pruned"]
        if tasks:
            columns += ["measured_memory_mb", "measured_gflops", "projected_tasks", "projection_error"]
        shown = table[columns].copy()
        if uri.startswith("http"):
            shown["mlflow"] = [
                f"{uri.rstrip('/')}/#/experiments/{e}/runs/{r}" for e, r in zip(table["experiment_id"], table["run_id"])
            ]
        st.dataframe(
            shown, hide_index=True, width="stretch", column_config={"mlflow": st.column_config.LinkColumn("MLflow")}
        )
        buffer = io.StringIO()
        shown.to_csv(buffer, index=False)
        st.download_button("download as CSV", buffer.getvalue(), file_name="cvad-trials.csv", mime="text/csv")
    with tab_registry:
        registry_view(uri, metric)


main()
