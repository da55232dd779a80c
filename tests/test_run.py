"""`cvad run` end to end on tiny built-in data: the record, determinism, strategies, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cvad.config import validate_config
from cvad.trial import run_trial
from support import tiny_config

DATA = {  # unequal training sets: the step sizes and replay shares below follow from them
    "batch_size": 8,
    "builtin": {
        "train_per_category": {"brick": 8, "hex_nut": 5, "grass": 6},
        "test_good_per_category": 3,
        "test_defects_per_category": 4,
    },
}


def trial(cache, **sections) -> dict:
    return run_trial(validate_config(tiny_config(cache, dataset=DATA, **sections)))


@pytest.mark.slow
def test_cli_writes_a_complete_result(builtin_cache, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(tiny_config(builtin_cache, dataset=DATA, strategy={"name": "finetune"})))
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cvad",
            "run",
            str(config),
            "--out",
            str(out),
            "--set",
            "seed=1",
            "measure_latency=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "step 3: training on grass" in done.stdout and "pixel F1" in done.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["tasks"] == ["brick", "hex_nut", "grass"]
    assert result["seed"] == result["config"]["seed"] == 1
    for name in ("image_f1", "pixel_f1", "image_auroc", "pixel_auroc"):
        matrix = result["matrices"][name]
        assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
        for t in range(3):
            assert all(v is not None for v in matrix[t][: t + 1])
            assert all(v is None for v in matrix[t][t + 1 :])
    assert set(result["final"]) >= {"image_f1", "pixel_f1", "image_auroc", "pixel_auroc", "forgetting_pixel_f1"}
    assert result["final"]["forgetting_pixel_f1"] is not None
    efficiency = result["efficiency"]
    assert efficiency["memory_mb"] == pytest.approx(sum(efficiency["memory_breakdown_mb"].values()))
    assert efficiency["gflops"] > 0 and efficiency["latency_ms"] > 0 and not efficiency["uncounted_ops"]
    assert (
        efficiency["gflops"] == 2 * efficiency["gmacs"]
        and efficiency["memory_mb"] == efficiency["memory_bytes"] / 2**20
    )
    assert result["schema"] == 2
    assert result["weights"]["kind"] == "imagenet" and result["weights"]["pretrained"]
    assert result["cvad_version"] and result["wall_seconds"]["total"] > 0
    assert (out / "config.yaml").exists()
    again = subprocess.run(
        [sys.executable, "-m", "cvad", "run", str(config), "--out", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 2 and "already holds a result" in again.stderr
    assert json.loads((out / "result.json").read_text()) == result  # nothing recorded is lost


def test_same_config_and_seed_give_the_same_metrics(builtin_cache):
    a, b = trial(builtin_cache), trial(builtin_cache)
    assert a.matrices == b.matrices
    assert a.efficiency["memory_bytes"] == b.efficiency["memory_bytes"]


def test_joint_fills_only_the_last_row(builtin_cache):
    result = trial(builtin_cache, strategy={"name": "joint"})
    matrix = result.matrices["pixel_f1"]
    assert all(v is None for row in matrix[:-1] for v in row)
    assert all(v is not None for v in matrix[-1])
    assert result.final["forgetting_pixel_f1"] is None
    step = result.steps[0]  # every task's images but those held out to calibrate on
    assert step.trained_on == "brick+hex_nut+grass" and step.train_images + step.held_out_images == 19


def test_replay_buffer_is_counted_in_memory(builtin_cache):
    result = trial(builtin_cache, strategy={"name": "replay", "replay_size": 4})
    assert result.efficiency["memory_bytes_by_part"]["replay_buffer"] == 4 * 3 * 64 * 64
    assert [s.replay_per_task for s in result.steps] == [[4], [2, 2], [2, 1, 1]]
    assert result.steps[1].train_images == 5 - 1 + 4  # hex_nut's images but the one held out, and the buffer


def test_patchcore_cl_plus_plus_routes_built_in_tasks(builtin_cache):
    result = trial(builtin_cache, model={"name": "patchcore", "params": {"continual": "cl++", "bank_size": 600}})
    routing = result.matrices["routing_accuracy"][-1]
    assert min(routing) >= 0.8  # chance is 1/3
    assert result.efficiency["memory_breakdown_mb"]["prototypes"] > 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cvad", *args], capture_output=True, text=True, timeout=120)


def test_bad_config_is_a_clear_error_without_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  name: padim\n  params:\n    n_feature: 10\n")
    done = run_cli("run", str(config), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "model.params.n_feature: unknown key" in done.stderr and "Traceback" not in done.stderr


def test_bad_dataset_folder_is_a_clear_error(tmp_path):
    config = tmp_path / "mvtec.yaml"
    config.write_text(f"dataset:\n  name: mvtec\n  root: {tmp_path / 'nowhere'}\n")
    done = run_cli("run", str(config), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert str(tmp_path / "nowhere") in done.stderr and "Traceback" not in done.stderr


def test_help_is_useful():
    done = run_cli("run", "--help")
    assert done.returncode == 0 and "--set" in done.stdout and "result.json" in done.stdout


# -- nothing lost: the record first, extras after, output folders checked before work --------


@pytest.mark.slow
def test_an_extra_that_cannot_be_written_is_a_warning_not_a_lost_run(builtin_cache, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "overlays").write_text("a file where the overlays folder would go")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(tiny_config(builtin_cache, dataset=DATA, strategy={"name": "joint"})))
    done = run_cli("run", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["final"]["pixel_f1"] is not None
    assert len(record["warnings"]) == 1 and record["warnings"][0].startswith("overlays not written")
    assert "WARNING: overlays not written" in done.stderr
    assert not list(out.glob(".result.json.*"))  # no temporary file left behind


def test_a_record_that_cannot_be_written_is_saved_elsewhere_and_named(tmp_path):
    from cvad.record import RecordWriteError, TrialRecord

    raw = {"config": {}, "tasks": ["a"], "matrices": {}, "final": {"pixel_f1": 0.5}, "efficiency": {}, "schema": 2}
    record = TrialRecord.from_dict(raw)
    target = tmp_path / "gone" / "result.json"  # its folder vanished: the write fails as on a full disk
    with pytest.raises(RecordWriteError, match="it was saved to (.*json)") as caught:
        record.write(target)
    saved = caught.value.args[0].split("it was saved to ")[1].split(":")[0]
    assert TrialRecord.read(saved) == record


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_an_output_that_cannot_take_the_result_is_refused_before_any_work(builtin_cache, tmp_path, kind):
    out = tmp_path / "taken" if kind == "file" else "/proc/cvad-out"  # /proc refuses new folders, even to root
    if kind == "file":
        out.write_text("not a folder")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(tiny_config(builtin_cache, dataset=DATA)))
    done = run_cli("run", str(config), "--out", str(out))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ("is a file; give a folder" if kind == "file" else "cannot write into --out") in done.stderr
    assert "training on" not in done.stdout


def test_a_failed_overwrite_keeps_the_earlier_result_and_its_config(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"earlier": true}')
    (out / "config.yaml").write_text("earlier: true\n")
    config = tmp_path / "mvtec.yaml"
    config.write_text(f"dataset:\n  name: mvtec\n  root: {tmp_path / 'nowhere'}\n")
    done = run_cli("run", str(config), "--out", str(out), "--overwrite")
    assert done.returncode == 2 and "nowhere" in done.stderr
    assert (out / "result.json").read_text() == '{"earlier": true}'
    assert (out / "config.yaml").read_text() == "earlier: true\n"  # still the config of the result beside it


def test_an_image_that_breaks_after_listing_stops_the_run_naming_it_and_keeps_the_earlier_result(tmp_path, monkeypatch):
    """A file that decoded at listing and is cut short mid-run (a copy still being written): exit 2 naming the file,
    no traceback, and the earlier result in the output folder untouched."""
    from typer.testing import CliRunner

    import cvad.cli.run as run_command
    from cvad.cli import cli
    from cvad.progress import TrainStarted
    from layouts import make_mvtec_tree

    root = make_mvtec_tree(tmp_path / "data", ("bottle", "wood"), n_train=3, n_test_good=1, n_defect=1)
    later = root / "wood" / "train" / "good" / "001.png"

    class BreaksAFileOnTheFirstStep(run_command.ProgressPrinter):
        def __call__(self, event) -> None:
            super().__call__(event)
            if isinstance(event, TrainStarted) and event.step == 0:
                later.write_bytes(later.read_bytes()[:100])  # wood is read in step 2, after the listing passed

    monkeypatch.setattr(run_command, "ProgressPrinter", BreaksAFileOnTheFirstStep)
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"earlier": true}')
    (out / "config.yaml").write_text("earlier: true\n")
    config = tmp_path / "mvtec.yaml"
    raw = tiny_config(None, dataset={"name": "mvtec", "root": str(root), "tasks": ["bottle", "wood"], "image_size": 32})
    config.write_text(json.dumps(raw))
    done = CliRunner().invoke(cli, ["run", str(config), "--out", str(out), "--overwrite"])
    assert done.exit_code == 2, done.output
    assert "step 1: training on bottle" in done.output and "step 2: training on wood" in done.output
    assert f"{later} no longer reads as an image" in done.output and "restore it" in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)  # no traceback
    assert (out / "result.json").read_text() == '{"earlier": true}'
    assert (out / "config.yaml").read_text() == "earlier: true\n"
