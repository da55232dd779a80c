"""Dataset sources: built-in (generated), MVTec AD, VisA and any folder in MVTec layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from cvad.data.base import CategorySplit, DatasetError, ImageDataset, Sample, check_split
from cvad.data.presets import TASK_PRESETS
from cvad.stream import TaskStream, stream_digest

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


def task_names(config: DatasetConfig, available: list[str]) -> list[str]:
    """The categories a dataset section names, in task order (``all`` and presets resolved)."""
    if config.tasks == "all":
        return available
    if isinstance(config.tasks, str):
        return list(TASK_PRESETS[config.tasks])
    return list(config.tasks)


def load_task_stream(config: DatasetConfig, progress: Callable[[str], None] | None = None) -> TaskStream:
    """The configured categories, in task order, each checked and read."""
    source = open_dataset(config, progress)
    available = source.categories()
    names = task_names(config, available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DatasetError(
            f"dataset.tasks names categories {unknown} that dataset '{config.name}' does not have"
            f"{' at ' + str(config.root) if config.root else ''}; available: {', '.join(available)}"
        )
    splits = [source.load(name) for name in names]
    for split in splits:
        check_split(split)
    return TaskStream.of(config, splits)


__all__ = [
    "CategorySplit",
    "DatasetError",
    "DatasetSource",
    "ImageDataset",
    "Sample",
    "TaskStream",
    "load_task_stream",
    "open_dataset",
    "stream_digest",
]
