"""Choosing what to deploy: trials from MLflow, Pareto fronts and budget recommendations.

One implementation for ``cvad recommend`` and the dashboard. Loading turns MLflow runs (the
layout of ``cvad.tracking``) into a table with one row per trial, every figure in the paper's units
(MB = 2^20 bytes, GFLOPs = 2 x multiply-adds) whichever record schema logged it, so that trials of
old and new sweeps and the published figures compare. Everything else is a function of that
table; all but the projection to more tasks (which prices configurations) is tested on hand-made rows.

A recommendation is the Pareto-optimal set (quality up, MB down, GFLOPs down) of the finished
trials that fit the budget, best quality first; each entry says what it wins and what it costs
against the one before it. Trials are ranked only against trials of the same task stream (the
dataset and its ordered task list): figures on different streams do not compare.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cvad.metrics import DETECTION_METRICS, FORGETTING_METRICS, METRIC_LABELS
from cvad.pareto import pareto_front
from cvad.published import PUBLISHED, PublishedCell
from cvad.titles import backbone_title, method_title

QUALITY_METRICS = DETECTION_METRICS  # what a recommendation may maximise
DEFAULT_METRIC = "pixel_f1"
TABLE_METRICS = (
    *QUALITY_METRICS,
    *FORGETTING_METRICS,
    "memory_mb",
    "gflops",
    "latency_ms",
    "latency_noisy",
    "wall_seconds",
)
# What deploying a trial takes: its stored detector's file (``detector_mb``), and what ``cvad export`` measured.
DEPLOYMENT_METRICS = (
    "detector_mb",
    "export_onnx_mb",
    "export_onnx_latency_ms",
    "export_torchscript_mb",
    "export_torchscript_latency_ms",
)


MB_SCHEMA_1 = 1e6 / 2**20  # schema 1 records count MB as 10^6 bytes and GFLOPs as multiply-adds (GMACs)
PRICED_PARTS = ("model.", "backbone.name", "strategy.", "dataset.image_size")  # the params that set a price


def published_name(cell: PublishedCell) -> str | None:
    """The overlay's label for a headline cell (MVTec AD, MobileNetV2; Tiny-Dinomaly on DeiT-Tiny), else None."""
    if cell.dataset != "mvtec":
        return None
    if cell.backbone == "mobilenetv2_100":
        return cell.row
    if (cell.row, cell.backbone) == ("Dinomaly, replay 100", "deit_tiny_patch16_224"):
        return "Tiny-Dinomaly (DeiT-Tiny), replay 100"
    return None


# The paper's headline figures on MVTec AD in its units (MB = 2^20 bytes, GFLOPs = 2 x multiply-adds), the units
# of the trial table. Published numbers, never measured here: the dashboard draws them only as a labelled reference.
PUBLISHED_MVTEC = pd.DataFrame(
    [(published_name(c), c.image_f1, c.pixel_f1, c.gflops, c.memory_mb) for c in PUBLISHED if published_name(c)],
    columns=["name", "image_f1", "pixel_f1", "gflops", "memory_mb"],
)


class SelectionError(RuntimeError):
    """Nothing to select from; the message says what to run."""


@dataclass(frozen=True)
class Stream:
    """What a trial learned and was scored on: the dataset (a folder dataset with its root) and the tasks in order."""

    dataset: str
    root: str | None = None  # folder datasets only: the folder is the dataset
    tasks: tuple[str, ...] | None = None  # None: not recorded (a trial that never wrote its record)

    def describe(self, names: int = 3) -> str:
        """'folder /data/parts: 16 tasks (bolt, gear, nut, ...)'."""
        where = f"{self.dataset} {self.root}" if self.root else self.dataset or "dataset not recorded"
        if self.tasks is None:
            return f"{where}: tasks not recorded"
        shown = ", ".join(self.tasks[:names]) + (", ..." if len(self.tasks) > names else "")
        return f"{where}: {len(self.tasks)} task{'s' if len(self.tasks) != 1 else ''} ({shown})"

    def as_record(self) -> dict:
        return {"dataset": self.dataset, "root": self.root, "tasks": None if self.tasks is None else list(self.tasks)}


def streams(trials: pd.DataFrame) -> list[Stream]:
    """The task streams of the trials, most trials first and those without a task list last: stream N of
    ``cvad recommend --stream N``."""
    counts = trials["stream"].value_counts(sort=False)
    return sorted(counts.index, key=lambda s: (s.tasks is None, -counts[s], s.dataset, s.root or "", s.tasks or ()))


def of_stream(trials: pd.DataFrame, stream: Stream) -> pd.DataFrame:
    """The trials of one task stream."""
    return trials[trials["stream"].map(lambda s: s == stream)]


def one_stream(trials: pd.DataFrame) -> Stream | None:
    """The one task stream of the trials (None if there are none); refuses trials of several."""
    found = streams(trials)
    if len(found) > 1:
        listed = "; ".join(f"{n}. {s.describe()}" for n, s in enumerate(found, 1))
        raise SelectionError(f"trials of {len(found)} task streams do not compare; rank each on its own: {listed}")
    return found[0] if found else None


def display_name(row: dict) -> str:
    """'PaSTe + MobileNetV2, replay 40' from a trial row."""
    params = row.get("params") or {}
    model = method_title(row["model"])
    if row["model"] == "padim":
        model = (
            "PaDiM-Lite" if params.get("model.params.covariance") == "diagonal" else "PaDiM"
        ) + f" {params.get('model.params.continual', '')}".rstrip()
    elif row["model"] == "patchcore":
        variant = {"cl": "CL", "cl++": "CL++"}.get(params.get("model.params.continual"), "")
        bank = params.get("model.params.bank_size")
        model = f"PatchCore{variant} {bank}" if bank not in (None, "None") else f"PatchCore{variant}"
    elif row["model"] == "dinomaly" and row["backbone"] == "deit_tiny_patch16_224":
        model = "Tiny-Dinomaly"
    strategy = row.get("strategy") or ""
    if strategy == "replay":
        strategy = f"replay {params.get('strategy.replay_size', '?')}"
    return f"{model} + {backbone_title(row['backbone'])}, {strategy}"


def load_trials(tracking_uri: str, experiments: list[str] | None = None) -> pd.DataFrame:
    """Every trial run of the chosen sweeps (default: all) as a table, failed ones included."""
    from mlflow.tracking import MlflowClient

    from cvad.tracking import check_server

    check_server(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri.removeprefix("sqlite:///")  # relative, or absolute after sqlite:////
        if not os.path.isfile(path):
            raise SelectionError(f"no MLflow store at {path}; run a sweep first, e.g. `cvad sweep sweeps/edge.yaml`")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri)
    found = client.search_experiments()
    if experiments:
        missing = sorted(set(experiments) - {e.name for e in found})
        if missing:
            names = ", ".join(sorted(e.name for e in found)) or "none"
            raise SelectionError(f"no sweep named {', '.join(missing)} in {tracking_uri}; sweeps there: {names}")
        found = [e for e in found if e.name in experiments]
    runs = (
        client.search_runs(
            [e.experiment_id for e in found], filter_string="tags.`cvad.role` = 'trial'", max_results=50000
        )
        if found
        else []
    )
    if not runs:
        raise SelectionError(f"no cvad trials in {tracking_uri}; run a sweep first, e.g. `cvad sweep sweeps/edge.yaml`")
    names = {e.experiment_id: e.name for e in found}
    rows = []
    for run in runs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        dataset = tags.get("cvad.dataset") or params.get("dataset.name", "")
        root = params.get("dataset.root") if dataset == "folder" else None
        row = {
            "run_id": run.info.run_id,
            "sweep": names.get(run.info.experiment_id, ""),
            "trial": int(tags.get("cvad.trial", -1)),
            "status": run.info.status,
            "model": tags.get("cvad.model", ""),
            "backbone": tags.get("cvad.backbone", ""),
            "strategy": tags.get("cvad.strategy", ""),
            "dataset": dataset,
            "stream": Stream(dataset, root, listed_tasks(params, dataset) or recorded_tasks(tracking_uri, run)),
            "pretrained": tags.get("cvad.pretrained") == "true",
            "schema": schema_of(tags, metrics),
            "error": tags.get("cvad.error"),
            "pruned": tags.get("cvad.pruned"),  # why a sweep priced it over budget and never trained it
            "detector": tags.get("cvad.detector"),  # "stored": the run holds detector.pt
            "registered": tags.get("cvad.registered"),  # NAME:VERSION in the MLflow model registry
            "params": dict(run.data.params),
            "experiment_id": run.info.experiment_id,
        }
        row.update({m: metrics.get(m) for m in (*TABLE_METRICS, *DEPLOYMENT_METRICS)})
        row["gmacs"] = metrics.get("gmacs")
        if row["schema"] == 1 and row["memory_mb"] is not None:
            row.update(memory_mb=row["memory_mb"] * MB_SCHEMA_1, gflops=2 * row["gflops"], gmacs=row["gflops"])
        row["name"] = display_name(row)
        rows.append(row)
    table = pd.DataFrame(rows).astype({"schema": "Int64"})
    table["stream"] = complete_streams(table)
    return table.sort_values(["sweep", "trial"]).reset_index(drop=True)


def listed_tasks(params: dict[str, str], dataset: str) -> tuple[str, ...] | None:
    """The task list a trial's params spell out: ``dataset.tasks`` as a list, or the built-in categories for 'all'."""
    from cvad.tracking import param_value

    tasks = param_value(params.get("dataset.tasks", "all"))
    if tasks == "all" and dataset == "builtin":
        tasks = param_value(params.get("dataset.builtin.categories", "None"))
    return tuple(tasks) if isinstance(tasks, list) else None


def recorded_tasks(tracking_uri: str, run) -> tuple[str, ...] | None:
    """The tasks a trial ran on, from its ``result.json`` (for 'all' on a folder, a preset, runs of older versions)."""
    from mlflow.artifacts import download_artifacts

    if "cvad.pretrained" not in run.data.tags:  # set with the record: none was logged (pruned, failed)
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        try:  # by the artifact URI: a few ms, where a download by run id looks the run up again
            uri = f"{run.info.artifact_uri}/result.json"
            path = download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri)
        except Exception:  # a record whose artifacts are gone
            return None
        return tuple(json.loads(Path(path).read_text())["tasks"])


def complete_streams(table: pd.DataFrame) -> pd.Series:
    """Streams with a task list for trials without one (pruned, or failed before their record) where their sweep
    ran the same dataset on one task list only; others keep 'tasks not recorded'."""
    known = table[table["stream"].map(lambda s: s.tasks is not None)]
    lists: dict[tuple, set[Stream]] = {}
    for sweep, stream in zip(known["sweep"], known["stream"]):
        lists.setdefault((sweep, stream.dataset, stream.root), set()).add(stream)

    def complete(sweep: str, stream: Stream) -> Stream:
        candidates = lists.get((sweep, stream.dataset, stream.root), set())
        return next(iter(candidates)) if stream.tasks is None and len(candidates) == 1 else stream

    return pd.Series([complete(w, s) for w, s in zip(table["sweep"], table["stream"])], index=table.index)


def schema_of(tags: dict, metrics: dict) -> int | None:
    """The record schema of a trial's figures: its ``cvad.schema`` tag; 1 for runs logged before the tag existed."""
    if "cvad.schema" in tags:
        return int(tags["cvad.schema"])
    return 1 if "memory_mb" in metrics else None  # None: no record was logged (a failed trial)


def project_to_tasks(trials: pd.DataFrame, tasks: int) -> pd.DataFrame:
    """The trials with MB and GFLOPs re-priced after ``tasks`` tasks (``cvad.cost.price_config``), measured ones kept.

    Answers "best under 20 MB after 30 products" from sweeps run on fewer tasks. Each trial's configuration is
    read back from its MLflow params (only the parts that set the price) and priced once per distinct one. A trial
    whose configuration cannot be priced keeps its measured figures and says why in ``projection_error``.
    """
    from cvad.config import validate_config
    from cvad.cost import price_config
    from cvad.tracking import param_value, unflatten

    out = trials.copy()
    out["measured_memory_mb"], out["measured_gflops"] = trials["memory_mb"], trials["gflops"]
    out["projected_tasks"] = pd.Series(pd.NA, index=out.index, dtype="Int64")
    out["projection_error"] = None
    prices: dict[str, dict | str] = {}
    for index, row in trials[trials["status"].eq("FINISHED")].iterrows():
        raw = unflatten({k: param_value(v) for k, v in row["params"].items() if k.startswith(PRICED_PARTS)})
        key = json.dumps(raw, sort_keys=True)
        if key not in prices:
            try:
                prices[key] = price_config(validate_config(raw), tasks)
            except Exception as exc:  # one configuration that no longer prices must not hide the others
                prices[key] = f"{type(exc).__name__}: {exc}"
        price = prices[key]
        if isinstance(price, str):
            out.at[index, "projection_error"] = price
            continue
        out.loc[index, ["memory_mb", "gflops", "gmacs"]] = [price["memory_mb"], price["gflops"], price["gmacs"]]
        out.at[index, "projected_tasks"] = tasks
    return out


def usable(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Finished trials with the quality metric, MB and GFLOPs all measured."""
    ok = trials["status"].eq("FINISHED")
    for column in (metric, "memory_mb", "gflops"):
        ok &= trials[column].notna() & trials[column].map(lambda v: v is not None and math.isfinite(v))
    return trials[ok]


def pareto_mask(trials: pd.DataFrame, metric: str, costs: tuple[str, ...] = ("memory_mb", "gflops")) -> pd.Series:
    """True for the trials on the front of (metric up, each cost down) among the usable ones (of one stream).

    The default is the recommendation's three-objective front; ``costs=("memory_mb",)`` gives the front a
    quality-vs-MB chart shows on its own.
    """
    one_stream(trials)
    candidates = usable(trials, metric)
    points = candidates[[metric, *costs]].to_numpy().tolist()
    front = candidates.index[pareto_front(points, [True] + [False] * len(costs))]
    return trials.index.isin(front)


@dataclass(frozen=True)
class Budget:
    max_mb: float | None = None
    max_gflops: float | None = None
    min_image_f1: float | None = None

    def describe(self) -> str:
        parts = []
        if self.max_mb is not None:
            parts.append(f"under {self.max_mb:g} MB")
        if self.max_gflops is not None:
            parts.append(f"under {self.max_gflops:g} GFLOPs")
        if self.min_image_f1 is not None:
            parts.append(f"image F1 at least {self.min_image_f1:g}")
        return ", ".join(parts) or "any budget"


@dataclass
class Recommendation:
    """The Pareto-optimal trials within a budget, best first, with the reason for each."""

    metric: str
    budget: Budget
    picks: pd.DataFrame  # rows of the trial table plus a "why" column
    excluded: dict[str, int]  # reason -> number of trials
    stream: Stream | None  # the task stream of every trial considered (None: there were none)

    def summary(self) -> str:
        if self.picks.empty:
            return f"{self.budget.describe()}: no finished trial fits; loosen the budget or run more configurations"
        best = self.picks.iloc[0]
        return (
            f"{self.budget.describe()}: {best['name']}: {METRIC_LABELS[self.metric]} {best[self.metric]:.3f}, "
            f"{best['memory_mb']:.3g} MB, {best['gflops']:.3g} GFLOPs"
        )

    def as_records(self) -> list[dict]:
        columns = [
            "name",
            "sweep",
            "trial",
            "run_id",
            self.metric,
            "memory_mb",
            "gflops",
            "image_f1",
            "pretrained",
            "why",
        ]
        return json.loads(self.picks[columns].to_json(orient="records"))


def recommend(trials: pd.DataFrame, metric: str = DEFAULT_METRIC, budget: Budget = Budget()) -> Recommendation:
    """The recommendation among trials of one task stream (``of_stream`` picks them; several are refused)."""
    if metric not in QUALITY_METRICS:
        raise SelectionError(f"unknown metric {metric!r}; choose one of: {', '.join(QUALITY_METRICS)}")
    stream = one_stream(trials)
    pruned = trials["pruned"].notna() if "pruned" in trials else pd.Series(False, index=trials.index)
    excluded = {
        "failed or unfinished": int((~trials["status"].eq("FINISHED")).sum()),
        "pruned before training (priced over the sweep's budget)": int(pruned.sum()),
    }
    finished = trials[trials["status"].eq("FINISHED") & ~pruned]
    candidates = usable(finished, metric)
    excluded[f"{metric} not measured"] = len(finished) - len(candidates)
    fits = pd.Series(True, index=candidates.index)
    if budget.max_mb is not None:
        fits &= candidates["memory_mb"] <= budget.max_mb
    if budget.max_gflops is not None:
        fits &= candidates["gflops"] <= budget.max_gflops
    if budget.min_image_f1 is not None:
        fits &= candidates["image_f1"].fillna(-1) >= budget.min_image_f1
    excluded["over budget"] = int((~fits).sum())
    inside = candidates[fits]
    front = inside[pareto_mask(inside, metric)]
    dominated = len(inside) - len(front)
    excluded["dominated by another that fits"] = dominated
    picks = front.sort_values([metric, "memory_mb", "gflops", "trial"], ascending=[False, True, True, True]).copy()
    picks["why"] = reasons(picks, metric)
    return Recommendation(metric, budget, picks.reset_index(drop=True), excluded, stream)


def reasons(picks: pd.DataFrame, metric: str) -> list[str]:
    """What each pick wins and what it costs against the one ranked just above it."""
    label = METRIC_LABELS[metric]
    out = []
    previous = None
    for _, row in picks.iterrows():
        if previous is None:
            out.append(f"highest {label} within the budget")
        else:
            savings = []
            if row["memory_mb"] < previous["memory_mb"]:
                savings.append(
                    f"{previous['memory_mb'] - row['memory_mb']:.3g} MB less "
                    f"({row['memory_mb'] / previous['memory_mb']:.0%})"
                )
            if row["gflops"] < previous["gflops"]:
                savings.append(
                    f"{previous['gflops'] - row['gflops']:.3g} fewer GFLOPs ({row['gflops'] / previous['gflops']:.0%})"
                )
            cost = previous[metric] - row[metric]
            out.append(f"{' and '.join(savings) or 'no saving'} than the one above, for {cost:.3f} lower {label}")
        previous = row
    return out
