"""Dataset sources: built-in (generated), MVTec AD, VisA and any folder in MVTec layout."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from cvad.data.base import CategorySplit, DatasetError, ImageDataset, Sample, check_split
from cvad.data.presets import TASK_PRESETS

if TYPE_CHECKING:
    from cvad.config import DatasetConfig


class DatasetSource(Protocol):
    def categories(self) -> list[str]: ...

    def load(self, category: str) -> CategorySplit: ...


def open_dataset(config: DatasetConfig, progress: Callable[[str], None] | None = None) -> DatasetSource:
    """The source a dataset config names (the built-in one is generated on first use)."""
    if config.name == "builtin":
        from cvad.data.builtin import BuiltinDataset

        return BuiltinDataset(config.builtin, cache_dir=config.cache_dir, progress=progress)
    if config.name == "visa":
        from cvad.data.visa import VisA

        return VisA(config.root)
    from cvad.data.mvtec import FolderDataset, MVTecAD

    return MVTecAD(config.root) if config.name == "mvtec" else FolderDataset(config.root)


def load_task_stream(config: DatasetConfig, progress: Callable[[str], None] | None = None) -> list[CategorySplit]:
    """The configured categories, in task order, each checked and read."""
    source = open_dataset(config, progress)
    available = source.categories()
    if config.tasks == "all":
        names = available
    elif isinstance(config.tasks, str):
        names = list(TASK_PRESETS[config.tasks])
    else:
        names = list(config.tasks)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DatasetError(
            f"dataset.tasks names categories {unknown} that dataset '{config.name}' does not have"
            f"{' at ' + str(config.root) if config.root else ''}; available: {', '.join(available)}"
        )
    splits = [source.load(name) for name in names]
    for split in splits:
        check_split(split)
    return splits


def stream_digest(splits: list[CategorySplit]) -> str:
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


__all__ = [
    "CategorySplit",
    "DatasetError",
    "DatasetSource",
    "ImageDataset",
    "Sample",
    "load_task_stream",
    "open_dataset",
    "stream_digest",
]
