"""A gate for tests that stop a sweep at a chosen moment, put on PYTHONPATH of the processes they start.

With ``CVAD_TEST_GATE=DIR`` in the environment, every process that imports ``cvad.sweep.worker`` (the
Ray workers of a driver the test started) runs trials numbered ``CVAD_TEST_GATE_FROM`` (default 1) and
up only once ``DIR/open`` exists; each such trial first writes ``DIR/waiting.N``, holding its host's name. So
a test knows a trial is running, and where, and cannot finish, until the test has done what it must (kill the
driver, stop a server, kill a worker, fill a disk): no race against the machine's speed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import socket
import sys
import time
from pathlib import Path

GATED_MODULE = "cvad.sweep.worker"


def gated(run_trial_for_sweep):
    gate, first = Path(os.environ["CVAD_TEST_GATE"]), int(os.environ.get("CVAD_TEST_GATE_FROM", "1"))

    def run(config, number, *args, **kwargs):
        if number >= first:
            (gate / f"waiting.{number}").write_text(socket.gethostname())
            while not (gate / "open").exists():
                time.sleep(0.05)
        return run_trial_for_sweep(config, number, *args, **kwargs)

    return run


class GateFinder(importlib.abc.MetaPathFinder):
    """Finds ``cvad.sweep.worker`` as usual, then wraps its trial function once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != GATED_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_gate(module):
            exec_module(module)
            module.run_trial_for_sweep = gated(module.run_trial_for_sweep)

        spec.loader.exec_module = exec_and_gate
        return spec


if os.environ.get("CVAD_TEST_GATE"):
    sys.meta_path.insert(0, GateFinder())
