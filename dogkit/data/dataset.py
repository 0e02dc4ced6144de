"""The prepared dataset as the rest of dogkit reads it: manifest rows, classes, images.

``dogkit prepare`` writes these files; training, evaluation and the cache only read them.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import csv_text
from ..errors import DogkitError
from .annotations import Box, format_boxes, main_box, parse_boxes
from .images import orient, read_image

MANIFEST_FIELDS = ("path", "label", "class_name", "split", "width", "height", "boxes", "sha256", "format",
                   "orientation")
# Manifests written before the EXIF orientation was recorded lack its column (their datasets ignore the tag).
OPTIONAL_FIELDS = ("orientation",)
CROP_MODES = ("none", "boxes")
DEFAULT_DATASET_DIR = Path("artifacts/data/stanford-dogs")


@dataclass(frozen=True)
class Record:
    path: str  # relative to the images root, forward slashes
    label: int
    class_name: str
    split: str
    width: int
    height: int
    boxes: tuple[Box, ...] = ()
    sha256: str = ""
    format: str = ""
    orientation: int = 1  # EXIF Orientation of the file; width, height and boxes are in its stored pixels

    def crop_box(self, crop: str) -> Box | None:
        """The dog's box to cut out with ``crop='boxes'`` (None: the whole image is used)."""
        return main_box(list(self.boxes)) if crop == "boxes" else None


@dataclass(frozen=True)
class ClassInfo:
    index: int
    name: str
    folder: str


@dataclass
class Dataset:
    root: Path
    images_root: Path
    classes: list[ClassInfo]
    records: list[Record]
    info: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def crop(self) -> str:
        return self.info.get("crop", "none")

    @property
    def orients(self) -> bool:
        """Whether images are turned as their EXIF Orientation says (datasets prepared before: as stored)."""
        return self.info.get("exif_orientation", "ignore") == "apply"

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def image_path(self, record: Record) -> Path:
        return self.images_root / record.path

    def load_rgb(self, record: Record, crop: str | None = None, orientation: bool | None = None) -> np.ndarray:
        """The record's image as RGB uint8, cropped to its box when ``crop`` (default: the dataset's) is 'boxes',
        then turned upright when ``orientation`` (default: the dataset's rule) says so. The box is cut first:
        boxes are in the stored pixels' frame, and the crop turns with the image."""
        image, tag = read_image(self.image_path(record))
        if (box := record.crop_box(crop or self.crop)) is not None:
            image = np.ascontiguousarray(image[box.ymin: box.ymax, box.xmin: box.xmax])
        return orient(image, tag) if (self.orients if orientation is None else orientation) else image


def manifest_text(records: list[Record]) -> str:
    return csv_text(MANIFEST_FIELDS, ([r.path, r.label, r.class_name, r.split, r.width, r.height,
                                       format_boxes(list(r.boxes)), r.sha256, r.format, r.orientation]
                                      for r in records))


def read_manifest(path: Path) -> list[Record]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = set(MANIFEST_FIELDS) - set(OPTIONAL_FIELDS) - set(reader.fieldnames or ())
            if missing:
                raise DogkitError(f"{path} is not a dogkit manifest (missing columns: {', '.join(sorted(missing))})")
            return [
                Record(
                    row["path"], int(row["label"]), row["class_name"], row["split"], int(row["width"]),
                    int(row["height"]), tuple(parse_boxes(row["boxes"])), row["sha256"], row["format"],
                    int(row.get("orientation") or 1),
                )
                for row in reader
            ]
    except (OSError, ValueError, csv.Error) as e:
        raise DogkitError(f"cannot read manifest {path}: {e}") from e


def stored_path(path: Path, base: Path) -> str:
    """A path as dataset.json keeps it: relative to the dataset folder when inside it, so both can move."""
    path, base = path.resolve(), base.resolve()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


def load_dataset(dataset_dir: str | os.PathLike = DEFAULT_DATASET_DIR) -> Dataset:
    root = Path(dataset_dir)
    info_path = root / "dataset.json"
    if not info_path.is_file():
        raise DogkitError(f"no prepared dataset in {root} (dataset.json is missing). Run `dogkit prepare` first.")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        classes = [ClassInfo(c["index"], c["name"], c["folder"])
                   for c in json.loads((root / "classes.json").read_text(encoding="utf-8"))]
    except (OSError, ValueError, KeyError) as e:
        raise DogkitError(f"{root} holds an unreadable dataset ({e}); run `dogkit prepare --force`.") from e
    images_root = Path(info["images_root"])
    if not images_root.is_absolute():
        images_root = root / images_root
    return Dataset(root, images_root, classes, read_manifest(root / "manifest.csv"), info)
