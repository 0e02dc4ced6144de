"""The prepared dataset as the rest of dogkit reads it: manifest rows, classes, images.

``dogkit prepare`` writes these files; training, evaluation and the cache only read them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import csv_text
from ..errors import DogkitError
from ..text import shown
from .annotations import Box, format_boxes, main_box, parse_boxes
from .images import orient, read_image
from .split import SPLITS

MANIFEST_FIELDS = ("path", "label", "class_name", "split", "width", "height", "boxes", "sha256", "format",
                   "orientation")
# Manifests written before the EXIF orientation was recorded lack its column (their datasets ignore the tag).
OPTIONAL_FIELDS = ("orientation",)
CROP_MODES = ("none", "boxes")
DEFAULT_DATASET_DIR = Path("artifacts/data/stanford-dogs")
LISTED_LINES = 5  # line numbers a manifest error lists per problem


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
    read_sha256: str | None = None  # of manifest.csv's bytes as read, which may differ from what prepare wrote

    @property
    def manifest_sha256(self) -> str | None:
        """The hash of the manifest these records came from (a hand-edited one is not the one prepared)."""
        return self.read_sha256 or self.info.get("manifest_sha256")

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
        boxes are in the stored pixels' frame, and the crop turns with the image. Images of a dataset whose files
        were never scanned (``info["scanned"]`` false: a class-folder tree) get the scan's truncation checks."""
        image, tag = read_image(self.image_path(record), check=not self.info.get("scanned", True))
        if (box := record.crop_box(crop or self.crop)) is not None:
            image = np.ascontiguousarray(image[box.ymin: box.ymax, box.xmin: box.xmax])
        return orient(image, tag) if (self.orients if orientation is None else orientation) else image


def manifest_text(records: list[Record]) -> str:
    return csv_text(MANIFEST_FIELDS, ([r.path, r.label, r.class_name, r.split, r.width, r.height,
                                       format_boxes(list(r.boxes)), r.sha256, r.format, r.orientation]
                                      for r in records))


def parse_manifest(path: Path) -> tuple[list[Record], list[int], str]:
    """The records, the line each ends on, and the SHA-256 of the very bytes they were parsed from."""
    try:
        data = Path(path).read_bytes()
        reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
        missing = set(MANIFEST_FIELDS) - set(OPTIONAL_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise DogkitError(f"{shown(path)} is not a dogkit manifest (missing columns: {', '.join(sorted(missing))})")
        records, lines = [], []
        for row in reader:
            try:
                records.append(Record(
                    row["path"], int(row["label"]), row["class_name"], row["split"], int(row["width"]),
                    int(row["height"]), tuple(parse_boxes(row["boxes"])), row["sha256"], row["format"],
                    int(row.get("orientation") or 1),
                ))
            except (TypeError, ValueError) as e:  # a short row gives None; a bad number, ValueError
                raise DogkitError(f"cannot read manifest {shown(path)} line {reader.line_num}: {shown(e)}") from e
            lines.append(reader.line_num)
    except (OSError, ValueError, csv.Error) as e:
        raise DogkitError(f"cannot read manifest {shown(path)}: {shown(e)}") from e
    return records, lines, hashlib.sha256(data).hexdigest()


def _lines(lines: list[int]) -> str:
    listed = ", ".join(map(str, lines[:LISTED_LINES]))
    more = f" and {len(lines) - LISTED_LINES} more" if len(lines) > LISTED_LINES else ""
    return f"line{'s' if len(lines) > 1 else ''} {listed}{more}"


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _same_file(path: str) -> str:
    """One spelling of a manifest path: ``./x.jpg``, ``x.jpg``, ``a//x.jpg`` and ``a/./x.jpg`` name one file, and
    a test image listed again under another spelling must not be trained on."""
    return "/".join(part for part in path.split("/") if part not in ("", "."))


def manifest_problems(records: list[Record], lines: list[int], classes: list[ClassInfo],
                      images_root: Path) -> list[str]:
    """What makes a (hand-edited) manifest unusable, one phrase per kind of problem; found before training
    starts, not when an epoch reaches the row. Files are only stat-ed: the scan decoded them already."""
    problems, first, duplicates = [], {}, []
    for rec, line in zip(records, lines):
        key = _same_file(rec.path)
        if key in first:
            duplicates.append(line)
        first.setdefault(key, line)
    if duplicates:
        problems.append(f"{_lines(duplicates)}: a path listed on an earlier line (each image may appear once)")
    n = len(classes)
    if bad := [line for rec, line in zip(records, lines) if not 0 <= rec.label < n]:
        problems.append(f"{_lines(bad)}: a label outside 0-{n - 1} (classes.json has {n} classes)")
    if bad := [(line, rec.split) for rec, line in zip(records, lines) if rec.split not in SPLITS]:
        problems.append(f"{_lines([b[0] for b in bad])}: an unknown split ({shown(repr(bad[0][1]))}; "
                        f"the splits are {', '.join(SPLITS)})")
    trained = {rec.label for rec in records if rec.split == "train"}
    if without := [shown(c.name) for c in classes if c.index not in trained]:
        problems.append(f"{len(without)} class(es) without a training image: {', '.join(without[:LISTED_LINES])}")
    outside = {line for rec, line in zip(records, lines) if Path(rec.path).is_absolute() or ".." in rec.path.split("/")}
    if outside:
        problems.append(f"{_lines(sorted(outside))}: a path outside the images folder")
    missing = [(line, rec.path) for rec, line in zip(records, lines)
               if line not in outside and not _is_file(images_root / rec.path)]
    if missing:
        problems.append(f"{_lines([m[0] for m in missing])}: no such image file in {shown(images_root)} "
                        f"(first: {shown(missing[0][1])})")
    return problems


def stored_path(path: Path, base: Path) -> str:
    """A path as dataset.json keeps it: relative to the dataset folder when inside it, so both can move."""
    path, base = path.resolve(), base.resolve()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


def load_dataset(dataset_dir: str | os.PathLike = DEFAULT_DATASET_DIR) -> Dataset:
    root = Path(dataset_dir)
    info_path = root / "dataset.json"
    try:
        found = info_path.is_file()
    except OSError as e:  # a name too long, a loop of links: is_file raises what it cannot answer
        raise DogkitError(f"cannot look in {shown(root)} for a prepared dataset: {e.strerror or e}") from e
    if not found:
        raise DogkitError(f"no prepared dataset in {shown(root)} (dataset.json is missing). Run `dogkit prepare` "
                          "first.")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        classes = [ClassInfo(c["index"], c["name"], c["folder"])
                   for c in json.loads((root / "classes.json").read_text(encoding="utf-8"))]
    except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: a classes.json that is not a list of objects
        raise DogkitError(f"{shown(root)} holds an unreadable dataset ({shown(e)}); run `dogkit prepare "
                          "--force`.") from e
    images_root = Path(info["images_root"])
    if not images_root.is_absolute():
        images_root = root / images_root
    manifest = root / "manifest.csv"
    records, lines, sha256 = parse_manifest(manifest)
    if problems := manifest_problems(records, lines, classes, images_root):
        raise DogkitError(f"{shown(manifest)} is not usable: {'; '.join(problems)}. Fix those lines, or run "
                          "`dogkit prepare --force` to write it again.")
    return Dataset(root, images_root, classes, records, info, sha256)
