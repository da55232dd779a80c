"""Which trials keep their fitted detector (``sweep.detectors``): all, none, or the Pareto front's.

``front`` stages each completed trial's ``detector.pt`` on the driver's disk
(``store_dir/detectors/<run id>.pt``) until the session ends (or is interrupted): the trials then on
the front get theirs logged to their runs and every staged file of the sweep is deleted. A front only
loses trials as trials are added, so a file not kept then is never needed later; files a killed driver
left staged are settled by ``--resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cvad.files import write_atomic
from cvad.sweep.services import ServiceLost, short_error
from cvad.sweep.study import SweepStudy, TrialAttrs
from cvad.tracking import TrackingStore


class DetectorKeeper:
    """``say`` receives what it kept; ``warn(text, run_id)`` what it could not keep."""

    def __init__(
        self,
        policy: str,
        store_dir: Path,
        store: TrackingStore,
        say: Callable[[str], None],
        warn: Callable[[str, str], None],
    ) -> None:
        self.policy, self.store_dir, self.store, self.say, self.warn = policy, store_dir, store, say, warn

    def staged(self, run_id: str) -> Path:
        """Where ``front`` keeps a completed trial's detector until the session knows the final front."""
        return self.store_dir / "detectors" / f"{run_id}.pt"

    def keep(self, run_id: str, data: bytes) -> None:
        """Log a completed trial's detector now (``all``), stage it until the front is known (``front``), or drop it."""
        if self.policy == "all":
            self.store.store_detector(run_id, data)
        elif self.policy == "front":
            path = self.staged(run_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)

    def keep_front(self, study: SweepStudy) -> None:
        """Log the staged detectors of the trials on the Pareto front to their runs; delete the sweep's staged files.

        Only this study's runs' files are touched: other sweeps in the same store stage theirs beside them.
        """
        run_ids = {TrialAttrs.of(t).run_id for t in study.trials()} - {None}
        staged = {run_id: path for run_id in run_ids if (path := self.staged(run_id)).is_file()}
        if not staged:
            return
        front = [run_id for t in study.best_trials() if (run_id := TrialAttrs.of(t).run_id) in staged]
        kept = []
        for run_id in front:
            try:
                self.store.store_detector(run_id, staged[run_id].read_bytes())
                kept.append(run_id)
            except ServiceLost:
                raise  # the staged files stay for --resume
            except Exception as exc:
                self.warn(f"the fitted detector of run {run_id} was not written to MLflow ({short_error(exc)})", run_id)
        for path in staged.values():
            path.unlink()
        if kept:
            self.say(
                f"kept the fitted detectors of {len(kept)} trial(s) on the Pareto front (detector.pt in their MLflow "
                "runs; export one with: cvad export RUN_ID --format onnx)"
            )
