"""One driver per sweep: the hold a driver keeps on its study while it drives it.

The hold is a study attribute (``driver``), so every driver of the study sees it wherever the study
lives (a sqlite file, PostgreSQL). A driver takes it after opening the study and before asking it for
anything, renews it as it runs (``beat``), checks it is still its own before each trial it asks for,
and gives it back when it stops. A second driver is refused while the holder lives. A hold whose holder
is gone (killed, even by SIGKILL) is taken over with a message: on the holder's own host when its
process is no longer there, from another host when it has not renewed the hold for ``STALE_AFTER``.

Two drivers starting at the same instant both write; each reads the hold back after ``SETTLE`` seconds
and only the one whose write stayed goes on, so at most one ever asks the study for a trial.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import optuna

from cvad.sweep.study import SweepError

HOLD_ATTR = "driver"  # study attribute: the Driver that holds the sweep, or None
BEAT_SECONDS = 15.0  # how often a driver renews its hold
STALE_AFTER = 600.0  # a hold from another host not renewed for this long is taken over
SETTLE = 0.25  # seconds between writing a hold and reading it back


class SweepHeld(SweepError):
    """Another driver holds the sweep."""


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), so a reused pid is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it is there
        return True
    return True


def clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Driver:
    """A driver process, as its hold records it."""

    host: str
    pid: int
    since: float  # time.time() when it took the hold
    beat: float  # time.time() of its last renewal
    token: str  # tells two drivers of one host and pid apart (a reused pid)
    started: str | None  # its process start (``process_start``), where /proc has it

    @classmethod
    def this_process(cls) -> Driver:
        now = time.time()
        pid = os.getpid()
        return cls(socket.gethostname(), pid, now, now, uuid.uuid4().hex, process_start(pid))

    def alive(self, now: float) -> bool:
        """Whether the holder may still be driving: its process is there (same host), or it renewed lately."""
        if self.host == socket.gethostname():
            if not pid_alive(self.pid):
                return False
            return self.started is None or process_start(self.pid) in (None, self.started)
        return now - self.beat < STALE_AFTER

    def describe(self, now: float) -> str:
        return (
            f"pid {self.pid} on host {self.host}, driving it since {clock(self.since)} "
            f"(last renewed {now - self.beat:.0f} s ago)"
        )


class SweepHold:
    """This driver's hold on one study."""

    def __init__(self, study: optuna.Study, name: str, say) -> None:
        self.study, self.name, self.say = study, name, say
        self.mine = Driver.this_process()
        self.held = False

    def holder(self) -> Driver | None:
        found = self.study.user_attrs.get(HOLD_ATTR)
        return Driver(**found) if found else None

    def take(self) -> None:
        """Take the hold, or raise ``SweepHeld`` naming the driver that has it."""
        now = time.time()
        current = self.holder()
        if current is not None and current.alive(now):
            raise self.refusal(current, now)
        if current is not None:
            self.say(
                f"sweep {self.name}: taking over from {current.describe(now)}: that driver is no longer running; "
                "the trials it left running are settled below"
            )
        self.study.set_user_attr(HOLD_ATTR, asdict(self.mine))
        time.sleep(SETTLE)
        current = self.holder()
        if current is None or current.token != self.mine.token:
            raise self.refusal(current, time.time()) if current else SweepHeld(f"sweep {self.name}: the hold was lost")
        self.held = True

    def refusal(self, holder: Driver, now: float) -> SweepHeld:
        return SweepHeld(
            f"sweep {self.name} is being driven by {holder.describe(now)}; one driver at a time: wait for it to "
            f"finish, or stop it (Ctrl-C) and resume. A driver that died is taken over by the next --resume "
            f"(on another host, {STALE_AFTER / 60:.0f} min after its last renewal)"
        )

    def check(self) -> None:
        """Before asking for a trial: the hold must still be this driver's, or it stops."""
        current = self.holder()
        if current is None or current.token != self.mine.token:
            self.held = False
            who = current.describe(time.time()) if current else "nobody"
            raise SweepHeld(
                f"sweep {self.name}: this driver no longer holds the sweep (now held by {who}); it stops asking "
                "for trials so that no configuration runs twice"
            )

    def renew(self) -> None:
        """Every ``BEAT_SECONDS``: check the hold and write that this driver is still alive."""
        if time.time() - self.mine.beat < BEAT_SECONDS:
            return
        self.check()
        self.mine = Driver(**{**asdict(self.mine), "beat": time.time()})
        self.study.set_user_attr(HOLD_ATTR, asdict(self.mine))

    def release(self) -> None:
        """Give the hold back, if it is still this driver's."""
        if self.held:
            current = self.holder()
            if current is not None and current.token == self.mine.token:
                self.study.set_user_attr(HOLD_ATTR, None)
            self.held = False
