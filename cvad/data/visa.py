"""Reader for VisA as its authors ship it: images and masks per category, split by a csv file.

Layout::

    <root>/<category>/Data/Images/Normal/*.JPG
    <root>/<category>/Data/Images/Anomaly/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png      (class ids: 0 = background, >0 = defect)
    <root>/split_csv/1cls.csv                       (object,split,label,image,mask; paths relative to root)
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from cvad.data.base import CategorySplit, DatasetError, Sample

SPLIT_COLUMNS = ("object", "split", "label", "image", "mask")
SPLITS = ("train", "test")
LABELS = {"normal": 0, "anomaly": 1}
ANOMALY = "anomaly"  # VisA does not name defect types


@dataclass(frozen=True)
class SplitRow:
    """One row of the split file, with its line number for error messages."""

    line: int
    split: str
    label: int
    image: str
    mask: str


class VisA:
    """Reader for VisA; the split file decides which images train and which test."""

    def __init__(self, root: str | Path, *, split_csv: str | Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root {self.root} does not exist or is not a folder; "
                "pass the VisA folder that holds the category folders and split_csv/"
            )
        self.split_csv = Path(split_csv) if split_csv is not None else self.root / "split_csv" / "1cls.csv"
        if not self.split_csv.is_file():
            raise DatasetError(
                f"split file {self.split_csv} not found; VisA ships it as split_csv/1cls.csv, "
                "or pass split_csv= with a file of columns " + ",".join(SPLIT_COLUMNS)
            )
        self._rows = self._read_split_csv()

    def categories(self) -> list[str]:
        """Categories named in the split file, sorted."""
        return sorted(self._rows)

    def load(self, category: str) -> CategorySplit:
        """Normal training images and the labelled test set of one category, sorted by path."""
        if category not in self._rows:
            raise DatasetError(
                f"unknown category {category!r}: not in {self.split_csv}; "
                f"available: {', '.join(self.categories()) or 'none'}"
            )
        train: list[Sample] = []
        test: list[Sample] = []
        for row in self._rows[category]:
            sample = self._sample(row)
            if row.split == "train" and sample.label:
                raise DatasetError(
                    f"{self.split_csv} line {row.line}: anomalous image {sample.image} is in the train "
                    "split; training images must be normal: move it to test"
                )
            (train if row.split == "train" else test).append(sample)
        for name, samples in (("train", train), ("test", test)):
            if not samples:
                raise DatasetError(
                    f"{self.split_csv}: category {category!r} has no {name} rows; add rows with split={name} for it"
                )
        by_path = attrgetter("image")
        return CategorySplit(category, tuple(sorted(train, key=by_path)), tuple(sorted(test, key=by_path)), True)

    def _read_split_csv(self) -> dict[str, list[SplitRow]]:
        rows: dict[str, list[SplitRow]] = defaultdict(list)
        with self.split_csv.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            if any(column not in header for column in SPLIT_COLUMNS):
                raise DatasetError(
                    f"{self.split_csv}: header {','.join(header) or '(empty file)'} is wrong; "
                    f"expected columns {','.join(SPLIT_COLUMNS)}"
                )
            reader.fieldnames = header
            for record in reader:
                value = {column: (record.get(column) or "").strip() for column in SPLIT_COLUMNS}
                if value["split"] not in SPLITS:
                    raise DatasetError(
                        f"{self.split_csv} line {reader.line_num}: unknown split {value['split']!r}; "
                        f"use one of {', '.join(SPLITS)}"
                    )
                if value["label"] not in LABELS:
                    raise DatasetError(
                        f"{self.split_csv} line {reader.line_num}: unknown label {value['label']!r}; "
                        f"use one of {', '.join(LABELS)}"
                    )
                rows[value["object"]].append(
                    SplitRow(reader.line_num, value["split"], LABELS[value["label"]], value["image"], value["mask"])
                )
        return dict(rows)

    def _sample(self, row: SplitRow) -> Sample:
        image = self._existing_file(row, row.image, "image")
        if not row.label:
            if row.mask:
                raise DatasetError(
                    f"{self.split_csv} line {row.line}: normal image {image} has mask {row.mask!r}; "
                    "leave the mask column empty for normal images or label the row anomaly"
                )
            return Sample(image, 0, "good")
        if not row.mask:
            raise DatasetError(
                f"{self.split_csv} line {row.line}: anomalous image {image} has an empty mask column; "
                "give the path of its mask, relative to the dataset root"
            )
        return Sample(image, 1, ANOMALY, self._existing_file(row, row.mask, "mask"))

    def _existing_file(self, row: SplitRow, relative: str, column: str) -> Path:
        path = self.root / relative
        if not relative or not path.is_file():
            raise DatasetError(
                f"{self.split_csv} line {row.line}: {column} file {path} does not exist; "
                f"fix the {column} column (paths are relative to {self.root}) or restore the file"
            )
        return path
