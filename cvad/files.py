"""Writing files so that a reader never sees half of one: a temporary file renamed over the target."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` all at once (a temporary file renamed over it): readers never see half a file."""
    path = Path(path)
    mode = "wb" if isinstance(text, bytes) else "w"
    tmp = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    except BaseException:  # a full disk fails the write, not just the rename: leave no partial file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
