"""What an update costs in process memory: the peak resident-set rise while it runs.

On Linux the kernel keeps the process's high-water mark (``VmHWM``) and lets a process reset it to
the current resident set (writing ``5`` to ``/proc/self/clear_refs``), so the peak of one step is
read exactly, with no sampling thread. Where that is not possible (another OS, a locked-down
``/proc``), a thread samples the resident set every 5 ms instead and the report says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
SAMPLE_SECONDS = 0.005


def _status_kb(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _resident_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import resource  # no /proc: the best this OS gives is the lifetime peak

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_high_water_mark() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


@dataclass
class PeakRise:
    """Filled in when the measured block ends: seconds, and how far the resident set rose above its start."""

    seconds: float = 0.0
    rise_bytes: int = 0
    method: str = ""  # "high-water mark" or "sampled every 5 ms"


@contextmanager
def peak_rise() -> Iterator[PeakRise]:
    """Measure the wall time and peak resident-set rise of the ``with`` block."""
    report = PeakRise()
    start = _resident_bytes()
    exact = _reset_high_water_mark()
    peak = [start]
    stop = threading.Event()
    sampler = None
    if not exact:

        def sample() -> None:
            while not stop.wait(SAMPLE_SECONDS):
                peak[0] = max(peak[0], _resident_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    started = time.perf_counter()
    try:
        yield report
    finally:
        report.seconds = time.perf_counter() - started
        if sampler is not None:
            stop.set()
            sampler.join()
            top = max(peak[0], _resident_bytes())
        else:
            top = (_status_kb("VmHWM") or 0) * 1024
        report.rise_bytes = max(0, top - start)
        report.method = "high-water mark" if exact else f"sampled every {SAMPLE_SECONDS * 1000:g} ms"
