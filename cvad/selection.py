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
import math
from dataclasses import dataclass
from functools import partial

import pandas as pd

from cvad.catalog import config_name
from cvad.metrics import DETECTION_METRICS, FORGETTING_METRICS, METRIC_LABELS, QUALITY_METRICS
from cvad.pareto import pareto_front
from cvad.published import PUBLISHED, PublishedCell
from cvad.record import paper_units
from cvad.stream import TaskStream
from cvad.tracking import Tag, TrackingError, TrackingStore
from cvad.tracking.params import config_of

DEFAULT_METRIC = "pixel_f1"
TABLE_METRICS = (
    *DETECTION_METRICS,
    *FORGETTING_METRICS,
    "memory_mb",
    "gflops",
    "latency_ms",
    "latency_noisy",
    "wall_seconds",
    "update_seconds",
    "update_peak_mb",
    "update_state_mb",
)
# What deploying a trial takes: its stored detector's file (``detector_mb``), and what ``cvad export`` measured.
DEPLOYMENT_METRICS = (
    "detector_mb",
    "export_onnx_mb",
    "export_onnx_latency_ms",
    "export_torchscript_mb",
    "export_torchscript_latency_ms",
)


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


def streams(trials: pd.DataFrame) -> list[TaskStream]:
    """The task streams of the trials, most trials first and those without a task list last: stream N of
    ``cvad recommend --stream N``."""
    counts = trials["stream"].value_counts(sort=False)
    return sorted(counts.index, key=lambda s: (s.tasks is None, -counts[s], s.dataset, s.folder or "", s.tasks or ()))


def of_stream(trials: pd.DataFrame, stream: TaskStream) -> pd.DataFrame:
    """The trials of one task stream."""
    return trials[trials["stream"].map(lambda s: s == stream)]


def one_stream(trials: pd.DataFrame) -> TaskStream | None:
    """The one task stream of the trials (None if there are none); refuses trials of several."""
    found = streams(trials)
    if len(found) > 1:
        listed = "; ".join(f"{n}. {s.describe()}" for n, s in enumerate(found, 1))
        raise SelectionError(f"trials of {len(found)} task streams do not compare; rank each on its own: {listed}")
    return found[0] if found else None


def load_trials(tracking_uri: str, experiments: list[str] | None = None) -> pd.DataFrame:
    """Every trial run of the chosen sweeps (default: all) as a table, failed ones included."""
    try:
        store = TrackingStore(tracking_uri, must_exist=True)
        runs = store.trial_runs(experiments)
    except TrackingError as exc:
        raise SelectionError(str(exc)) from None
    if not runs:
        raise SelectionError(f"no cvad trials in {tracking_uri}; run a sweep first, e.g. `cvad sweep sweeps/edge.yaml`")
    rows = []
    for run in runs:
        tags, metrics = run.tags, run.metrics
        row = {
            "run_id": run.run_id,
            "sweep": run.sweep,
            "trial": int(tags.get(Tag.TRIAL, -1)),
            "status": run.status,
            "model": tags.get(Tag.MODEL, ""),
            "backbone": tags.get(Tag.BACKBONE, ""),
            "strategy": tags.get(Tag.STRATEGY, ""),
            "dataset": run.stream.dataset,
            "stream": run.stream,
            # True/False once the record said which weights ran; None: it never trained (pruned, failed early)
            "pretrained": {"true": True, "false": False}.get(tags.get(Tag.PRETRAINED)),
            "schema": run.schema,
            "error": tags.get(Tag.ERROR),
            "pruned": tags.get(Tag.PRUNED),  # why a sweep priced it over budget and never trained it
            "detector": tags.get(Tag.DETECTOR),  # "stored": the run holds detector.pt
            "registered": tags.get(Tag.REGISTERED),  # NAME:VERSION in the MLflow model registry
            "params": run.params,
            "experiment_id": run.experiment_id,
        }
        row.update({m: metrics.get(m) for m in (*TABLE_METRICS, *DEPLOYMENT_METRICS)})
        memory_mb, gflops, gmacs = paper_units(row["schema"], row["memory_mb"], row["gflops"])
        row.update(memory_mb=memory_mb, gflops=gflops, gmacs=gmacs if row["schema"] == 1 else metrics.get("gmacs"))
        row["name"] = display_name(row)
        rows.append(row)
    table = pd.DataFrame(rows).astype({"schema": "Int64"})
    table["stream"] = complete_streams(table)
    return table.sort_values(["sweep", "trial"]).reset_index(drop=True)


def display_name(row: dict) -> str:
    """'PaSTe + MobileNetV2, replay 40 (jpeg replay)' from a trial row (its tags and flattened params)."""
    config = config_of(row.get("params") or {}, ("model.", "strategy.", "compression."))
    config.setdefault("model", {})["name"] = row["model"]
    config.setdefault("backbone", {})["name"] = row["backbone"]
    config.setdefault("strategy", {})["name"] = row.get("strategy") or ""
    return config_name(config)


def complete_streams(table: pd.DataFrame) -> pd.Series:
    """Streams with a task list for trials without one (pruned, or failed before their record) where their sweep
    ran the same dataset on one task list only; others keep 'tasks not recorded'."""
    known = table[table["stream"].map(lambda s: s.tasks is not None)]
    lists: dict[tuple, set[TaskStream]] = {}
    for sweep, stream in zip(known["sweep"], known["stream"]):
        lists.setdefault((sweep, stream.dataset, stream.folder), set()).add(stream)

    def complete(sweep: str, stream: TaskStream) -> TaskStream:
        candidates = lists.get((sweep, stream.dataset, stream.folder), set())
        return next(iter(candidates)) if stream.tasks is None and len(candidates) == 1 else stream

    return pd.Series([complete(w, s) for w, s in zip(table["sweep"], table["stream"])], index=table.index)


def project_to_tasks(trials: pd.DataFrame, tasks: int) -> pd.DataFrame:
    """The trials with MB and GFLOPs re-priced after ``tasks`` tasks (``cvad.cost.price_config``), measured ones kept.

    Answers "best under 20 MB after 30 products" from sweeps run on fewer tasks. Each trial's configuration is
    read back from its MLflow params (only the parts that set the price) and priced once per distinct one. A trial
    whose configuration cannot be priced keeps its measured figures and says why in ``projection_error``.
    """
    from cvad.config import validate_config
    from cvad.cost import price_config

    out = trials.copy()
    out["measured_memory_mb"], out["measured_gflops"] = trials["memory_mb"], trials["gflops"]
    out["projected_tasks"] = pd.Series(pd.NA, index=out.index, dtype="Int64")
    out["projection_error"] = None
    prices: dict[str, dict | str] = {}
    for index, row in trials[trials["status"].eq("FINISHED")].iterrows():
        raw = config_of(row["params"], PRICED_PARTS)
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
    """What a pick must fit: memory and compute per image on the device, a quality floor, and what learning the
    next product may cost there (the largest step's wall seconds and peak memory rise)."""

    max_mb: float | None = None
    max_gflops: float | None = None
    min_image_f1: float | None = None
    max_update_s: float | None = None
    max_update_mb: float | None = None

    def describe(self) -> str:
        parts = []
        if self.max_mb is not None:
            parts.append(f"under {self.max_mb:g} MB")
        if self.max_gflops is not None:
            parts.append(f"under {self.max_gflops:g} GFLOPs")
        if self.min_image_f1 is not None:
            parts.append(f"image F1 at least {self.min_image_f1:g}")
        if self.max_update_s is not None:
            parts.append(f"updates within {self.max_update_s:g} s")
        if self.max_update_mb is not None:
            parts.append(f"updates within {self.max_update_mb:g} MB of peak memory")
        return ", ".join(parts) or "any budget"


@dataclass
class Recommendation:
    """The Pareto-optimal trials within a budget, best first, with the reason for each."""

    metric: str
    budget: Budget
    picks: pd.DataFrame  # rows of the trial table plus a "why" column
    excluded: dict[str, int]  # reason -> number of trials
    stream: TaskStream | None  # the task stream of every trial considered (None: there were none)

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
    if budget.max_update_s is not None:  # a trial that never measured its update cost cannot be shown to fit
        fits &= candidates["update_seconds"].fillna(math.inf) <= budget.max_update_s
    if budget.max_update_mb is not None:
        fits &= candidates["update_peak_mb"].fillna(math.inf) <= budget.max_update_mb
    excluded["over budget"] = int((~fits).sum())
    inside = candidates[fits]
    front = inside[pareto_mask(inside, metric)]
    dominated = len(inside) - len(front)
    excluded["dominated by another that fits"] = dominated
    picks = front.sort_values([metric, "memory_mb", "gflops", "trial"], ascending=[False, True, True, True]).copy()
    picks["why"] = reasons(picks, metric)
    return Recommendation(metric, budget, picks.reset_index(drop=True), excluded, stream)


def chosen_streams(trials: pd.DataFrame, stream: int | None = None) -> list[tuple[int, TaskStream]]:
    """Every task stream of the trials, or stream number ``stream`` only, numbered as ``streams`` lists them."""
    found = streams(trials)
    if stream is not None and not 1 <= stream <= len(found):
        listed = "; ".join(f"{n}. {s.describe()}" for n, s in enumerate(found, 1))
        raise SelectionError(
            f"--stream {stream}: these trials ran on {len(found)} task stream(s), choose one of: {listed}"
        )
    return list(enumerate(found, 1)) if stream is None else [(stream, found[stream - 1])]


def recommend_streams(
    trials: pd.DataFrame, chosen: list[tuple[int, TaskStream]], metric: str, budget: Budget
) -> list[tuple[int, Recommendation]]:
    """A recommendation for each chosen task stream, ranked on its own."""
    return [(n, recommend(of_stream(trials, s), metric, budget)) for n, s in chosen]


def difference(value: float, above: float, unit: str) -> tuple[str, str] | None:
    """How ``value`` differs from ``above`` in words: ("saves", "4.39 MB (60% less)") or ("costs", "11.1 MB more
    (+370%)"); None when equal.

    The percentage is of the pick above's figure: what is saved, or what is added, never the share kept."""
    if value == above:
        return None
    change = value - above
    share = abs(change) / above if above else None
    if change < 0:
        return "saves", f"{-change:.3g} {unit}" + (f" ({share:.0%} less)" if share is not None else "")
    return "costs", f"{change:.3g} {unit} more" + (f" (+{share:.0%})" if share is not None else "")


def reasons(picks: pd.DataFrame, metric: str) -> list[str]:
    """What each pick saves and what it costs more than the one ranked just above it (MB, GFLOPs and the metric)."""
    label = METRIC_LABELS[metric]
    out = []
    previous = None
    for _, row in picks.iterrows():
        if previous is None:
            out.append(f"highest {label} within the budget")
            previous = row
            continue
        said: dict[str, list[str]] = {"saves": [], "costs": []}
        for column, unit in (("memory_mb", "MB"), ("gflops", "GFLOPs")):
            found = difference(row[column], previous[column], unit)
            if found is not None:
                said[found[0]].append(found[1])
        lower = previous[metric] - row[metric]
        if lower > 0:
            said["costs"].append(f"{lower:.3f} lower {label}")
        parts = [f"{side} {' and '.join(items)}" for side, items in said.items() if items]
        if not parts:
            out.append(f"a tie with the one above (the same {label}, MB and GFLOPs)")
        else:
            same = [] if lower > 0 else [f"the same {label}"]
            out.append("against the one above: " + "; ".join(parts + same))
        previous = row
    return out


def tag_number(tags: dict[str, str], key: str) -> float | None:
    value = tags.get(key)
    return None if value in (None, "None") else float(value)


def version_table(store: TrackingStore, name: str) -> pd.DataFrame:
    """A registered model's versions, oldest first: the task each added, the mean of its last matrix row per metric,
    forgetting, the thresholds of the task it added and what that update cost (``cvad.tracking.registry`` tags)."""
    rows = []
    for version in store.model_versions(name):
        tags = version.tags
        number = partial(tag_number, tags)
        row = {"version": version.version, "tasks": number("task_count"), "learned": tags.get("learned")}
        for key, text in tags.items():
            if key.startswith("row."):
                values = [v for v in json.loads(text).values() if v is not None]
                row[key.removeprefix("row.")] = sum(values) / len(values) if values else None
        row |= {metric: number(f"metric.{metric}") for metric in FORGETTING_METRICS}
        for kind in ("image", "pixel"):
            thresholds = json.loads(tags.get(f"thresholds.{kind}", "[]"))
            row[f"{kind}_threshold"] = thresholds[-1] if thresholds else None
        row |= {
            "update_seconds": number("update.seconds"),
            "update_peak_mb": number("update.peak_mb"),
            "memory_mb": number("budget.memory_mb"),
            "task_list": tags.get("tasks", ""),
            "run_id": version.run_id,
        }
        rows.append(row)
    return pd.DataFrame(rows)
