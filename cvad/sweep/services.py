"""The services a sweep driver writes to (the MLflow tracking store, the Optuna study's storage) and what it
does when one goes away: wait for it a bounded time, saying so, then stop with ``ServiceLost``.

Every call the driver makes to either goes through ``Patience.call``: a call that fails because its
service is lost (``Service.lost``: a server that does not answer, a database connection that broke, a
sqlite file that is locked or on a full disk) is retried until the service answers again or
``Patience.seconds`` have passed; any other error is the caller's, at once. ``Patient`` puts a whole
object (``TrackingStore``) behind it; ``PatientStorage`` does the same for an Optuna storage, so that
the study, its trials and ``tell`` go through it without each call site knowing.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from optuna.storages import BaseStorage

from cvad.sweep.study import SweepError

DEFAULT_WAIT = 120.0  # seconds a driver waits for a lost service (cvad sweep --service-wait)
SAY_EVERY = 10.0  # seconds between "still waiting" lines


def caused_by(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` or an exception it was raised from or during is one of ``types``."""
    return any(isinstance(error, types) for error in chain(exc))


def chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in found):
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def short_error(exc: BaseException) -> str:
    """The part of an error a user needs: the OS's words where there are some (``[Errno 111] Connection refused``),
    else the first line of the innermost cause (the database driver's, not the wrapper's)."""
    errors = chain(exc)
    for error in errors:
        found = re.findall(r"\[Errno -?\d+\] [^'\")\]]+", str(error))
        if found:
            return found[-1].strip()
    lines = [line.strip() for line in str(errors[-1]).splitlines() if line.strip()]
    line = lines[0] if lines else type(errors[-1]).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def shown_url(url: str) -> str:
    """A store's URL as it may be printed: without its password."""
    if "://" not in url or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: only the part before the host stays hidden
        parsed = urlparse(url)
        return url.replace(parsed.netloc, f"***@{parsed.hostname}")


def answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether an HTTP tracking server answers its health check."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def database_errors() -> tuple[type[BaseException], ...]:
    """A database connection that broke or a database file that cannot be written now (locked, disk full)."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    return (StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


@dataclass(frozen=True)
class Service:
    """A store the driver writes to, named as the user knows it."""

    name: str  # "the MLflow tracking server at http://..." / "the Optuna study storage sqlite:///..."
    uri: str

    @classmethod
    def tracking(cls, uri: str) -> Service:
        kind = "tracking server" if cls.is_http(uri) else "tracking store"
        return cls(f"the MLflow {kind} at {shown_url(uri)}", uri)

    @classmethod
    def study(cls, url: str) -> Service:
        return cls(f"the Optuna study storage {shown_url(url)}", url)

    @staticmethod
    def is_http(uri: str) -> bool:
        return urlparse(uri).scheme in ("http", "https")

    def lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the service is away (worth waiting for), not that the call itself was wrong."""
        if self.is_http(self.uri):
            status = getattr(exc, "get_http_status_code", lambda: 0)()
            return status >= 500 or not answers(self.uri)
        return caused_by(exc, database_errors())


class ServiceLost(SweepError):
    """A service stayed away longer than the driver waits."""

    def __init__(self, service: Service, cause: BaseException, waited: float) -> None:
        self.service, self.cause, self.waited = service, cause, waited
        super().__init__(f"lost {service.name} ({short_error(cause)}) and it did not come back within {waited:.0f} s")


class Patience:
    """How long the driver waits for a lost service; ``say`` receives what it is waiting for."""

    def __init__(self, seconds: float, say: Callable[[str], None]) -> None:
        self.seconds, self.say = seconds, say

    def call(self, service: Service, function: Callable, *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``, retried while ``service`` is lost, for up to ``seconds``."""
        started = said = None
        pause = 0.5
        while True:
            try:
                result = function(*args, **kwargs)
            except Exception as exc:
                if not service.lost(exc):
                    raise
                now = time.monotonic()
                if started is None:
                    started = said = now
                    if self.seconds > 0:
                        self.say(
                            f"lost {service.name} ({short_error(exc)}): waiting up to {self.seconds:.0f} s for it "
                            "to come back; running trials go on"
                        )
                elif now - said >= SAY_EVERY:
                    said = now
                    self.say(f"still waiting for {service.name} ({now - started:.0f} of {self.seconds:.0f} s)")
                if now - started >= self.seconds:
                    raise ServiceLost(service, exc, now - started) from None
                time.sleep(min(pause, max(0.0, started + self.seconds - now)))
                pause = min(pause * 2, 5.0)
                continue
            if started is not None and self.seconds > 0:
                self.say(f"{service.name} answers again after {time.monotonic() - started:.0f} s")
            return result

    @contextlib.contextmanager
    def none(self) -> Iterator[None]:
        """Calls inside fail at once: for what a driver that is stopping still tries to write."""
        seconds, self.seconds = self.seconds, 0.0
        try:
            yield
        finally:
            self.seconds = seconds


class Patient:
    """``target`` with every method call made through ``patience`` for ``service``."""

    def __init__(self, target: Any, service: Service, patience: Patience) -> None:
        self.target, self.service, self.patience = target, service, patience

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.target, name)
        if not callable(value):
            return value
        return lambda *args, **kwargs: self.patience.call(self.service, value, *args, **kwargs)


class PatientStorage(BaseStorage):
    """An Optuna storage whose every call goes through ``patience`` (see ``delegate``)."""

    def __init__(self, inner: BaseStorage, service: Service, patience: Patience) -> None:
        self.inner, self.service, self.patience = inner, service, patience


def delegate(name: str) -> Callable:
    def method(self: PatientStorage, *args: Any, **kwargs: Any) -> Any:
        return self.patience.call(self.service, getattr(self.inner, name), *args, **kwargs)

    method.__name__ = name
    return method


for _name in [n for n in dir(BaseStorage) if not n.startswith("_")]:
    setattr(PatientStorage, _name, delegate(_name))
PatientStorage.__abstractmethods__ = frozenset()


def patient_storage(url: str, patience: Patience) -> PatientStorage:
    """The Optuna storage at ``url`` (cached as Optuna caches it) behind ``patience``; opening it waits too."""
    import optuna

    service = Service.study(url)
    inner = patience.call(service, optuna.storages.get_storage, url)
    return PatientStorage(inner, service, patience)
