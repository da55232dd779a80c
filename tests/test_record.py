"""The trial record and the task stream: the one definition of each, read back whatever wrote it."""

from __future__ import annotations

import json

import pytest

from cvad.record import RECORD_METRICS, RecordError, StepRecord, TrialRecord
from cvad.stream import TaskStream

SCHEMA_2 = {
    "schema": 2, "cvad_version": "0.1.0", "seed": 3, "config": {"seed": 3}, "tasks": ["a", "b"],
    "matrices": {"pixel_f1": [[0.5, None], [0.4, 0.6]]},
    "final": {"pixel_f1": 0.5, "image_f1": None, "forgetting_pixel_f1": 0.1},
    "efficiency": {
        "memory_mb": 2.0, "memory_bytes": 2 * 2**20, "gflops": 0.8, "gmacs": 0.4, "latency_ms": 5.0,
        "latency_iqr_ms": 0.5, "latency_noisy": False, "memory_breakdown_mb": {"backbone": 1.5, "memory_bank": 0.5},
    },
    "weights": {"pretrained": True},
    "steps": [{"step": 0, "trained_on": "a", "train_images": 4, "train_seconds": 1.0, "eval_seconds": 0.5}],
    "wall_seconds": {"train": 1.0, "eval": 0.5, "total": 2.0},
    "warnings": [],
}  # fmt: skip


def test_a_record_reads_back_what_it_writes(tmp_path):
    record = TrialRecord.from_dict(SCHEMA_2)
    assert record.tasks == ["a", "b"] and record.steps == (StepRecord(0, "a", 4, 1.0, 0.5),)
    record.write(tmp_path / "result.json")
    assert TrialRecord.read(tmp_path / "result.json") == record
    new_step_fields = {"held_out_images": 0, "update_peak_mb": None, "update_state_mb": None, "data_root": None}
    assert json.loads((tmp_path / "result.json").read_text()) == SCHEMA_2 | {
        "steps": [SCHEMA_2["steps"][0] | {"replay_per_task": None} | new_step_fields],
        "thresholds": None,
    }
    drift = {"image_threshold": [[1.0, None], [1.5, 2.0]], "pixel_threshold": [[0.5, None], [0.6, 0.7]]}
    calibrated = {"image": [1.0, 2.0], "pixel": [0.5, 0.7], "image_fpr": 0.05, "pixel_fpr": 0.01, "matrices": drift}
    with_thresholds = TrialRecord.from_dict(SCHEMA_2 | {"thresholds": calibrated})
    assert TrialRecord.from_text(with_thresholds.to_text()) == with_thresholds
    assert with_thresholds.matrix_csv("image_threshold") == "after_step,a,b\na,1.000000,\nb,1.500000,2.000000\n"


def test_a_schema_1_record_is_read_in_the_papers_units():
    old = json.loads(json.dumps(SCHEMA_2))
    old.pop("schema")  # schema 1 records carried no schema field at first
    old["efficiency"] |= {"memory_mb": 2**21 / 1e6, "gflops": 0.4, "memory_breakdown_mb": {"backbone": 2**21 / 1e6}}
    record = TrialRecord.from_dict(old)
    assert record.schema == 2
    assert record.efficiency["memory_mb"] == pytest.approx(2.0)
    assert record.efficiency["gflops"] == pytest.approx(0.8) and record.efficiency["gmacs"] == pytest.approx(0.4)
    assert record.efficiency["memory_breakdown_mb"]["backbone"] == pytest.approx(2.0)


def test_metrics_are_looked_up_where_the_record_keeps_them():
    record = TrialRecord.from_dict(SCHEMA_2)
    assert record.metric("pixel_f1") == 0.5 and record.metric("image_f1") is None
    assert record.metric("memory_mb") == 2.0 and record.metric("latency_ms") == 5.0
    assert set(RECORD_METRICS) >= {"pixel_f1", "forgetting_pixel_f1", "memory_mb", "gflops"}
    logged = record.final_metrics()
    assert logged["memory_mb.memory_bank"] == 0.5 and logged["latency_noisy"] == 0.0
    assert "image_f1" not in logged and logged["wall_seconds"] == 2.0
    assert record.matrix_csv("pixel_f1") == "after_step,a,b\na,0.500000,\nb,0.400000,0.600000\n"


def test_a_file_that_is_not_a_record_is_named(tmp_path):
    (tmp_path / "result.json").write_text('{"tasks": []}')
    with pytest.raises(RecordError, match=r"result\.json: not a cvad result record \(KeyError"):
        TrialRecord.read(tmp_path / "result.json")
    with pytest.raises(RecordError, match="no result record at"):
        TrialRecord.read(tmp_path / "missing.json")


def test_a_stream_is_its_dataset_its_tasks_and_a_folder_datasets_root():
    parts = TaskStream("folder", "/data/parts", ("bolt", "gear"), digest="abc")
    assert parts == TaskStream("folder", "/data/parts", ("bolt", "gear"))  # the digest is not its identity
    assert parts != TaskStream("folder", "/elsewhere", ("bolt", "gear"))  # a folder is its own dataset
    assert TaskStream("mvtec", "/a", ("bottle",)) == TaskStream("mvtec", "/b", ("bottle",))  # a benchmark is not
    assert TaskStream("builtin", None, ("a", "b")) != TaskStream("builtin", None, ("b", "a"))  # order matters
    assert len({parts, TaskStream("folder", "/data/parts", ("bolt", "gear"))}) == 1
    assert parts.name == "folder:bolt+gear" and parts.describe() == "folder /data/parts: 2 tasks (bolt, gear)"
    assert TaskStream("folder", "/d").describe() == "folder /d: tasks not recorded"
