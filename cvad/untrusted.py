"""Reading a torch file cvad did not necessarily write (a detector, a checkpoint, a cache entry): tensors and plain
data only, and in cvad's words when the file is anything else.

``torch.load(weights_only=True)`` refuses a pickle that names code (``os.system``, a class to rebuild), but its
message advises turning that protection off; cvad never does, and never repeats the advice. It says what the
file names instead, that cvad never runs such files, where the file came from, and what to do.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any


class UntrustedFileError(ValueError):
    """A file that is not tensors and plain data; the message says what was found and what to do."""


def found_code(error: BaseException) -> str | None:
    """The code a refused pickle names (``posix.system``), from torch's refusal; None when it names none."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None


def not_torch(path: Path, what: str, origin: str, why: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"{path} ({what}, from {origin}) is not a PyTorch file cvad can read ({why[:200]}); it may be cut short or "
        "another kind of file: get it again, or give the file the tool wrote"
    )


def load_untrusted(path: Path, what: str, origin: str) -> Any:
    """``torch.load`` of ``path`` (``what`` it should be, ``origin``: where it came from, in words), weights only.

    Raises FileNotFoundError for a missing file and ``UntrustedFileError`` for any file that is not a torch file of
    tensors and plain data.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = found_code(exc)
        if code is None:  # no code named: bytes that are no pickle torch writes
            raise not_torch(path, what, origin, "not a pickle of tensors") from None
        raise UntrustedFileError(
            f"{path} ({what}, from {origin}) holds code objects: its pickle names `{code}`, which loading it would "
            "run. cvad never runs such files; it reads tensors and plain data only. Get the file again from a "
            "source you trust (a file cvad wrote holds no code), or delete it"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise not_torch(path, what, origin, first) from None
