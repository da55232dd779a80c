"""``cvad learn``: a saved detector learns the next task exactly as ``cvad run`` learns it within the stream.

For every method and variant the contract test covers, under fine-tuning and replay, a stream run whole and
the same stream run one task and then learned one more give the same matrices, thresholds, fitted state and
replay buffer. Then what ``cvad learn`` refuses, what it reports when an earlier task's data is gone, and the
command itself end to end.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_contract import CASES, IDS
from typer.testing import CliRunner

from cvad.backbones.weights import RandomWeightsWarning
from cvad.cli import cli
from cvad.config import validate_config
from cvad.data.builtin import BuiltinDataset
from cvad.detector import DETECTOR_FILE, load_detector
from cvad.learning import LearnError, learn_task
from cvad.record import TrialRecord
from cvad.trial import run_trial
from support import VIT, tiny_config

pytestmark = pytest.mark.slow  # every test here trains
STRATEGIES = [{"name": "finetune"}, {"name": "replay", "replay_size": 4}]


def stream_config(cache, categories: list[str], method: str, backbone: str, params: dict, strategy: dict) -> dict:
    return tiny_config(
        cache,
        dataset={"builtin": {"categories": categories}},
        model={"name": method, "params": params},
        backbone={"name": backbone, "weights": "random" if backbone == VIT else "imagenet"},
        strategy=strategy,
    )


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return function(*args, **kwargs)


def assert_same_detector(left, right) -> None:
    state, other = left.model.fitted_state(), right.model.fitted_state()
    assert state.keys() == other.keys()
    for key in state:
        assert torch.equal(state[key], other[key]), key
    assert left.thresholds == right.thresholds
    assert (left.replay is None) == (right.replay is None)
    if left.replay is not None:
        assert len(left.replay.stored) == len(right.replay.stored)
        assert all(torch.equal(a, b) for a, b in zip(left.replay.stored, right.replay.stored))  # pixels or JPEG bytes
        assert torch.equal(left.replay.task_ids, right.replay.task_ids)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s["name"] for s in STRATEGIES])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_learning_the_next_task_equals_running_the_whole_stream(case, strategy, builtin_cache, tmp_path):
    _, method, backbone, params = case
    whole_config = validate_config(
        stream_config(builtin_cache, ["brick", "hex_nut"], method, backbone, params, strategy)
    )
    whole = quietly(run_trial, whole_config, output_dir=tmp_path / "whole")
    first_config = validate_config(stream_config(builtin_cache, ["brick"], method, backbone, params, strategy))
    quietly(run_trial, first_config, output_dir=tmp_path / "first")
    learned = quietly(
        learn_task, quietly(load_detector, tmp_path / "first" / DETECTOR_FILE), "hex_nut", tmp_path / "next"
    )

    assert learned.record.config == whole.config  # the config cvad run would be given for the whole stream
    assert learned.record.tasks == whole.tasks
    assert learned.record.matrices == whole.matrices
    assert learned.record.thresholds == whole.thresholds
    assert learned.record.final == whole.final
    assert_same_detector(
        quietly(load_detector, tmp_path / "next" / DETECTOR_FILE),
        quietly(load_detector, tmp_path / "whole" / DETECTOR_FILE),
    )
    assert (tmp_path / "first" / "result.json").read_text() == TrialRecord.read(
        tmp_path / "first" / "result.json"
    ).to_text()


COMPRESSED = [
    (
        {"name": "patchcore", "params": {"continual": "cl++", "bank_size": 300}},
        {"memory": "pq", "pq_subvectors": 8, "pq_centroids": 16, "replay": "jpeg", "backbone": "int8"},
    ),
    ({"name": "patchcore", "params": {"continual": "cl", "bank_size": 300}}, {"memory": "int8", "backbone": "fp16"}),
    ({"name": "padim", "params": {"n_features": 16}}, {"memory": "fp16", "replay": "jpeg"}),
]


@pytest.mark.parametrize("model, compression", COMPRESSED, ids=["pq-jpeg-int8", "cl-int8-fp16", "padim-fp16-jpeg"])
def test_a_compressed_detector_learns_the_next_task_as_the_whole_stream_does(
    model, compression, builtin_cache, tmp_path
):
    def config(categories):
        return validate_config(
            tiny_config(
                builtin_cache, dataset={"builtin": {"categories": categories}}, model=model,
                strategy={"name": "replay", "replay_size": 4}, compression=compression,
            )
        )  # fmt: skip

    whole = run_trial(config(["brick", "hex_nut"]), output_dir=tmp_path / "whole")
    run_trial(config(["brick"]), output_dir=tmp_path / "first")
    learned = learn_task(load_detector(tmp_path / "first" / DETECTOR_FILE), "hex_nut", tmp_path / "next")
    assert (
        learned.record.matrices == whole.matrices
        and learned.record.efficiency["memory_bytes_by_part"] == (whole.efficiency["memory_bytes_by_part"])
    )
    assert_same_detector(
        load_detector(tmp_path / "next" / DETECTOR_FILE), load_detector(tmp_path / "whole" / DETECTOR_FILE)
    )


def test_a_chain_of_learns_equals_the_run_and_leaves_each_source_as_it_was(builtin_cache, tmp_path):
    raw = tiny_config(builtin_cache, strategy={"name": "replay", "replay_size": 4})
    whole = run_trial(validate_config(raw), output_dir=tmp_path / "whole")  # brick, hex_nut, grass
    first = tiny_config(builtin_cache, dataset={"builtin": {"categories": ["brick"]}}, strategy=raw["strategy"])
    run_trial(validate_config(first), output_dir=tmp_path / "s1")
    before = (tmp_path / "s1" / DETECTOR_FILE).read_bytes()
    learn_task(load_detector(tmp_path / "s1" / DETECTOR_FILE), "hex_nut", tmp_path / "s2")
    done = learn_task(load_detector(tmp_path / "s2" / DETECTOR_FILE), "grass", tmp_path / "s3")
    assert (tmp_path / "s1" / DETECTOR_FILE).read_bytes() == before
    assert done.record.matrices == whole.matrices and done.record.thresholds == whole.thresholds
    assert [s.trained_on for s in done.record.steps] == ["brick", "hex_nut", "grass"]
    assert_same_detector(
        load_detector(tmp_path / "s3" / DETECTOR_FILE), load_detector(tmp_path / "whole" / DETECTOR_FILE)
    )
    # the replay buffer is in the file and in memory_mb
    assert done.record.efficiency["memory_bytes_by_part"]["replay_buffer"] == 4 * 3 * 64 * 64


@pytest.fixture(scope="module")
def one_task_run(builtin_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-task")
    raw = tiny_config(builtin_cache, dataset={"builtin": {"categories": ["brick"]}})
    run_trial(validate_config(raw), output_dir=out)
    return out


def test_a_task_already_learned_is_refused(one_task_run, tmp_path):
    with pytest.raises(LearnError, match="already learned brick"):
        learn_task(load_detector(one_task_run / DETECTOR_FILE), "brick", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_joint_detector_is_refused_with_what_to_do_instead(builtin_cache, tmp_path):
    raw = tiny_config(builtin_cache, dataset={"builtin": {"categories": ["brick"]}}, strategy={"name": "joint"})
    run_trial(validate_config(raw), output_dir=tmp_path / "joint")
    with pytest.raises(LearnError, match="trained jointly.*run the whole stream again"):
        learn_task(load_detector(tmp_path / "joint" / DETECTOR_FILE), "grass", tmp_path / "next")


def test_a_detector_file_of_another_format_is_refused(one_task_run, tmp_path):
    content = torch.load(one_task_run / DETECTOR_FILE, weights_only=True)
    old = {k: v for k, v in content.items() if k not in ("thresholds", "replay", "record")}
    torch.save(old | {"format": "cvad-detector/1"}, tmp_path / "old.pt")
    with pytest.raises(LearnError, match="cvad-detector/1 file.*cannot learn another task"):
        learn_task(load_detector(tmp_path / "old.pt"), "grass", tmp_path / "next")
    result = CliRunner().invoke(
        cli, ["learn", str(tmp_path / "old.pt"), "--task", "grass", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "cannot learn another task" in result.output


def test_an_earlier_task_whose_data_is_gone_is_reported_not_evaluated(tmp_path, builtin_cache):
    generated = BuiltinDataset(validate_config(tiny_config(builtin_cache)).dataset.builtin, builtin_cache).root
    layout, other = tmp_path / "line", tmp_path / "other-line"
    shutil.copytree(generated, layout, ignore=shutil.ignore_patterns("hex_nut"))  # folder datasets, MVTec layout
    shutil.copytree(generated / "hex_nut", other / "hex_nut")  # the next product arrives in another folder
    folder = {"name": "folder", "root": str(layout), "tasks": ["brick"], "image_size": 64, "batch_size": 6}
    run_trial(validate_config(tiny_config(None, dataset=folder)), output_dir=tmp_path / "first")
    learned = learn_task(load_detector(tmp_path / "first" / DETECTOR_FILE), "hex_nut", tmp_path / "second", root=other)
    assert learned.record.steps[-1].data_root == str(other) and learned.record.config["dataset"]["root"] == str(layout)
    shutil.rmtree(layout / "brick")  # the first product's images are gone from this machine
    said = []
    done = learn_task(load_detector(tmp_path / "second" / DETECTOR_FILE), "grass", tmp_path / "third", say=said.append)
    assert done.not_evaluated == ["brick"] and "brick: not evaluated" in said[0]
    pixel_f1 = done.record.matrices["pixel_f1"]
    assert pixel_f1[2][0] is None and pixel_f1[2][1] is not None and pixel_f1[2][2] is not None  # hex_nut: its root


def test_cvad_learn_prints_the_new_row_forgetting_and_update_cost(one_task_run, tmp_path):
    result = CliRunner().invoke(cli, ["learn", str(one_task_run), "--task", "grass", "--out", str(tmp_path / "n")])
    assert result.exit_code == 0, result.output
    assert "After learning grass (step 2)" in result.output and "forgetting (pixel_f1)" in result.output
    assert "update:" in result.output and "peak memory rise" in result.output
    record = TrialRecord.read(tmp_path / "n" / "result.json")
    assert record.tasks == ["brick", "grass"] and record.steps[-1].update_peak_mb is not None


def test_each_learn_registers_a_version_with_its_row_and_the_dashboard_shows_them(one_task_run, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from cvad.selection import version_table
    from cvad.tracking import TrackingStore

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    source = one_task_run
    for task in ("grass", "hex_nut"):
        out = tmp_path / task
        args = ["learn", str(source), "--task", task, "--out", str(out), "--register", "line", "--tracking-uri", uri]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert "registered line version" in result.output and "is_defect, defect_masks" in result.output
        source = out
    versions = version_table(TrackingStore(uri), "line")
    assert versions["version"].tolist() == [1, 2] and versions["learned"].tolist() == ["grass", "hex_nut"]
    assert versions["tasks"].tolist() == [2, 3] and versions["task_list"].iloc[-1] == "brick+grass+hex_nut"
    record = TrialRecord.read(tmp_path / "hex_nut" / "result.json")
    assert versions["pixel_f1"].iloc[-1] == pytest.approx(sum(record.matrices["pixel_f1"][2]) / 3)
    assert versions["image_threshold"].iloc[-1] == pytest.approx(record.thresholds["image"][-1])
    assert versions["update_seconds"].iloc[-1] == pytest.approx(record.steps[-1].train_seconds)
    assert versions["forgetting_pixel_f1"].iloc[-1] == pytest.approx(record.final["forgetting_pixel_f1"])

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    at = AppTest.from_file(str(Path(__file__).parents[1] / "dashboard" / "app.py"), default_timeout=120).run()
    assert not at.exception
    table = at.dataframe[-1].value
    assert table["learned"].tolist() == ["grass", "hex_nut"] and "update_seconds" in table
    assert len(at.get("plotly_chart")) == 1  # the metrics over versions
