"""cvad: continual visual anomaly detection on the edge."""

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("cvad")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def cache_root() -> Path:
    """Where cvad keeps what it can rebuild (generated data, frozen features): ``$CVAD_CACHE``,
    else ``~/.cache/cvad``."""
    base = os.environ.get("CVAD_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "cvad"
