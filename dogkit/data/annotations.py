"""Bounding boxes from Stanford Dogs' PASCAL-VOC XML, and the compact form they take in the manifest."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Box:
    xmin: int
    ymin: int
    xmax: int
    ymax: int

    @property
    def area(self) -> int:
        return max(0, self.xmax - self.xmin) * max(0, self.ymax - self.ymin)


class AnnotationError(ValueError):
    pass


def parse_voc(path: Path) -> tuple[tuple[int, int] | None, list[Box]]:
    """Return ((width, height) or None, boxes). ``<filename>`` is never read: some official files
    hold a literal ``%s`` there, so the image id always comes from the file name."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise AnnotationError(f"{path}: {e}") from e
    size = None
    w, h = root.findtext("size/width"), root.findtext("size/height")
    if w and h:
        try:
            size = (int(float(w)), int(float(h)))
        except ValueError:
            size = None
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            coords = [int(round(float(bb.findtext(k, "")))) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as e:
            raise AnnotationError(f"{path}: bad box coordinate ({e})") from e
        boxes.append(Box(*coords))
    return size, boxes


def fit_boxes(boxes: list[Box], annotated_size: tuple[int, int] | None, image_size: tuple[int, int]) -> list[Box]:
    """Rescale boxes when the image was resized after annotation, clip them to the image, drop empty ones."""
    width, height = image_size
    sx = sy = 1.0
    if annotated_size and annotated_size != image_size and min(annotated_size) > 0:
        sx, sy = width / annotated_size[0], height / annotated_size[1]
    fitted = []
    for b in boxes:
        box = Box(
            min(max(int(round(b.xmin * sx)), 0), width),
            min(max(int(round(b.ymin * sy)), 0), height),
            min(max(int(round(b.xmax * sx)), 0), width),
            min(max(int(round(b.ymax * sy)), 0), height),
        )
        if box.area > 0:
            fitted.append(box)
    return fitted


def find_annotation(annotations_root: Path, class_folder: str, image_name: str) -> Path | None:
    """Stanford Dogs keeps ``Annotation/<class>/<image id>`` with no extension; accept ``.xml`` too."""
    stem = Path(image_name).stem
    for candidate in (annotations_root / class_folder / stem, annotations_root / class_folder / f"{stem}.xml"):
        if candidate.is_file():
            return candidate
    return None


def format_boxes(boxes: list[Box]) -> str:
    return ";".join(f"{b.xmin} {b.ymin} {b.xmax} {b.ymax}" for b in boxes)


def parse_boxes(text: str) -> list[Box]:
    return [Box(*map(int, part.split())) for part in text.split(";") if part.strip()]


def main_box(boxes: list[Box]) -> Box | None:
    """The dog to crop to when an image has several: the largest box (first one on ties)."""
    return max(boxes, key=lambda b: b.area, default=None)
