"""A task stream: the dataset, its folder, the ordered tasks and the digest of its file list.

Torch-free, so that selection and the dashboard group trials by it without loading any model.

The one definition of "what a trial learned and was scored on": ``load_task_stream`` returns it, the
sweep pins its task lists, MLflow lists it as a run's dataset input, selection groups trials by it and
the registry tags versions with it. Two streams are the same stream when their dataset, tasks in order
and (for a folder dataset, where the folder is the dataset) root agree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cvad.config import DatasetConfig
    from cvad.data.base import CategorySplit


@dataclass(frozen=True, eq=False)
class TaskStream:
    """The ordered tasks of a dataset; ``splits`` holds their images when the stream was listed here."""

    dataset: str  # builtin | mvtec | visa | folder
    root: str | None = None  # the dataset folder (None for the built-in data)
    tasks: tuple[str, ...] | None = None  # None: not recorded (a trial that never wrote its record)
    digest: str | None = None  # stream_digest of the file list, when known
    source: str | None = None  # where the images are: the dataset folder, or the built-in cache folder
    images: int | None = None  # training and test images over all tasks, when known
    splits: tuple[CategorySplit, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, config: DatasetConfig, splits: list[CategorySplit]) -> TaskStream:
        root = None if config.root is None else str(config.root)
        source = root if root is not None else str(splits[0].train[0].image.parents[3])
        images = sum(len(split.train) + len(split.test) for split in splits)
        tasks = tuple(split.name for split in splits)
        return cls(config.name, root, tasks, stream_digest(splits), source, images, tuple(splits))

    # -- identity ------------------------------------------------------------------------------
    @property
    def folder(self) -> str | None:
        """The root where it names the dataset (a folder dataset); a benchmark's root is only where it lies."""
        return self.root if self.dataset == "folder" else None

    @property
    def identity(self) -> tuple:
        return (self.dataset, self.folder, self.tasks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskStream) and self.identity == other.identity

    def __hash__(self) -> int:
        return hash(self.identity)

    # -- how it is shown and stored ----------------------------------------------------------------
    @property
    def name(self) -> str:
        """'builtin:brick+grass': the stream as MLflow's Dataset column shows it."""
        return f"{self.dataset}:{'+'.join(self.tasks or ())}"

    def describe(self, names: int = 3) -> str:
        """'folder /data/parts: 16 tasks (bolt, gear, nut, ...)'."""
        where = f"{self.dataset} {self.folder}" if self.folder else self.dataset or "dataset not recorded"
        if self.tasks is None:
            return f"{where}: tasks not recorded"
        shown = ", ".join(self.tasks[:names]) + (", ..." if len(self.tasks) > names else "")
        return f"{where}: {len(self.tasks)} task{'s' if len(self.tasks) != 1 else ''} ({shown})"

    def as_record(self) -> dict[str, Any]:
        tasks = None if self.tasks is None else list(self.tasks)
        return {"dataset": self.dataset, "root": self.folder, "tasks": tasks}

    def profile(self) -> str:
        """What MLflow keeps as the dataset input's profile: the tasks and the image count."""
        return json.dumps({"tasks": list(self.tasks or ()), "images": self.images})


def section_key(config: DatasetConfig) -> str:
    """What decides a dataset section's task list: source, root, ``tasks`` (and a built-in set's categories), as text.

    The sweep pins one concrete task list per key; the key is what the study stores them under.
    """
    key: dict[str, Any] = {
        "name": config.name,
        "root": None if config.root is None else str(config.root),
        "tasks": config.tasks,
    }
    if config.name == "builtin":
        key["categories"] = list(config.builtin.categories)
    return json.dumps(key, sort_keys=True)


def stream_digest(splits: list[CategorySplit] | tuple[CategorySplit, ...]) -> str:
    """A short digest of a stream's file list (category, split and path below the category, in task order).

    Two streams with the same files in the same order share it wherever their folders are; a file
    added, removed or renamed changes it. Contents are not read (a digest of the list, not the pixels).
    """
    digest = hashlib.sha256()
    for split in splits:
        for part, samples in (("train", split.train), ("test", split.test)):
            for sample in samples:
                for path in (sample.image, sample.mask):
                    if path is not None:
                        parts = path.parts
                        below = (
                            parts[len(parts) - 1 - parts[::-1].index(split.name) :]
                            if split.name in parts
                            else parts[-1:]
                        )
                        digest.update(f"{part}:{'/'.join(below)}\n".encode())
    return digest.hexdigest()[:16]
