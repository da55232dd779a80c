"""Finished trials whose record could not reach the tracking store: kept on the driver's disk until it can.

A driver that loses its MLflow store stops; each trial that finished but was not yet recorded is
written to ``store_dir/unsent/<run id>/`` (its result record, artifact files and the worker that ran
it), all at once (a folder renamed into place). ``--resume`` sends them before anything else, so
the trial counts as finished once, never reruns, and the folder is removed once its run holds it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cvad.record import RECORD_FILE, TrialRecord

if TYPE_CHECKING:
    from cvad.sweep.worker import TrialOutput

WORKER_FILE = "worker"
FILES = "files"


class UnsentRecords:
    """The unsent trial outputs of one store folder, by MLflow run id."""

    def __init__(self, store_dir: Path) -> None:
        self.root = store_dir / "unsent"

    def keep(self, run_id: str, output: TrialOutput) -> Path:
        """Write ``output`` for run ``run_id``; raises OSError (e.g. a full disk), leaving nothing half-written."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=self.root))
        try:
            (staging / RECORD_FILE).write_text(output.record.to_text())
            (staging / WORKER_FILE).write_text(output.worker)
            for relative, data in output.artifacts.items():
                path = staging / FILES / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            target = self.root / run_id
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def run_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def output(self, run_id: str) -> TrialOutput:
        from cvad.sweep.worker import TrialOutput

        folder = self.root / run_id
        files = folder / FILES
        artifacts = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        record = TrialRecord.read(folder / RECORD_FILE)
        return TrialOutput(record, artifacts, (folder / WORKER_FILE).read_text())

    def drop(self, run_id: str) -> None:
        shutil.rmtree(self.root / run_id, ignore_errors=True)
