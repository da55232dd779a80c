"""Files that are not what they claim: a detector or a checkpoint whose pickle names code, and files that are no
torch file at all. Each is refused in cvad's words, and the code is never run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvad.backbones.weights import WeightsError, read_state_dict
from cvad.detector import DetectorError, load_detector


class RunsACommand:
    """What an attacker saves: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious(path: Path, marker: Path) -> Path:
    torch.save({"format": "cvad-detector-2", "state": RunsACommand(marker)}, path)
    return path


@pytest.mark.parametrize("load, error", [(load_detector, DetectorError), (read_state_dict, WeightsError)])
def test_a_file_naming_code_is_refused_in_cvads_words_and_never_run(tmp_path, load, error):
    marker = tmp_path / "ran"
    path = malicious(tmp_path / "file.pt", marker)
    with pytest.raises(error) as refused:
        load(path)
    message = str(refused.value)
    assert not marker.exists()  # the command was never run
    assert f"{path}" in message and "holds code objects" in message and "`posix.system`" in message
    assert "cvad never runs such files" in message and "weights_only" not in message


@pytest.mark.parametrize("content", [b"", b"\x00\x01 not a pickle at all", b"PK\x03\x04 a zip cut short"])
def test_a_file_that_is_no_torch_file_is_named_with_what_to_do(tmp_path, content):
    path = tmp_path / "detector.pt"
    path.write_bytes(content)
    with pytest.raises(DetectorError, match=r"is not a PyTorch file cvad can read .*get it again") as refused:
        load_detector(path)
    assert "weights_only" not in str(refused.value) and "holds code" not in str(refused.value)


def test_cli_export_of_a_detector_naming_code_exits_2_naming_where_it_came_from(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "run"
    folder.mkdir()
    malicious(folder / "detector.pt", marker)
    result = subprocess.run(
        [sys.executable, "-m", "cvad", "export", str(folder), "--format", "onnx"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "holds code objects" in result.stderr and f"from the folder {folder}" in result.stderr
    assert "weights_only" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert not marker.exists()
