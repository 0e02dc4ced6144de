"""Is the model looking at the dog? Class activation maps scored against the dataset's boxes; numpy and OpenCV.

Two scores per image, on the normalised map of the true class laid on the photo (``dogkit.deploy.explain``):

- *energy in boxes*: the share of the map's mass that falls inside the union of the dogs' boxes (within the part
  of the photo the model saw);
- *box IoU ≥ 0.5*: the standard weakly-supervised localisation test (Zhou et al., CVPR 2016): threshold the map at
  ``fraction`` of its peak, take the bounding box of the largest connected region, and count a hit when it
  overlaps a true box with IoU ≥ 0.5 ("GT-known"); "top-1 loc" also needs the top-1 answer to be right.

The same pipeline scores a baseline that knows nothing about the image: a centred Gaussian (σ a quarter of the
seen square's side) in place of the map. A model whose maps do not beat it is not shown to look at the dog.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..data.annotations import Box
from ..data.images import orient, oriented_size
from .explain import normalise, on_photo, seen_region
from .preprocess import PreprocessSpec

FRACTION = 0.2  # of the map's peak, as Zhou et al.
MAX_SIDE = 512  # photos are scored at most this size: IoU and energy shares hardly move, memory stays small
IOU_HIT = 0.5

XYXY = tuple[int, int, int, int]  # x0, y0, x1, y1; x1 and y1 exclusive, as the boxes' slices


def oriented_boxes(boxes: tuple[Box, ...] | list[Box], width: int, height: int, orientation: int) -> list[XYXY]:
    """Boxes given in the stored pixels, in the frame of the image as ``orient`` turns it."""
    if orientation in (0, 1):
        return [(b.xmin, b.ymin, b.xmax, b.ymax) for b in boxes]
    out = []
    for b in boxes:  # turn a mask of the box the way the image turns: one rule for all eight orientations
        mask = np.zeros((height, width), np.uint8)
        mask[b.ymin: b.ymax, b.xmin: b.xmax] = 1
        ys, xs = np.nonzero(orient(mask, orientation))
        if len(xs):
            out.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return out


def iou(a: XYXY, b: XYXY) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def map_box(photo_map: np.ndarray, fraction: float = FRACTION) -> XYXY | None:
    """The bounding box of the largest connected region at or above ``fraction`` of the map's peak."""
    peak = np.nanmax(photo_map) if np.isfinite(photo_map).any() else np.nan
    if not np.isfinite(peak) or peak <= 0:
        return None
    mask = (np.nan_to_num(photo_map, nan=-1.0) >= fraction * peak).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    x, y, w, h, _ = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))]
    return int(x), int(y), int(x + w), int(y + h)


def energy_inside(photo_map: np.ndarray, boxes: list[XYXY]) -> float:
    """The share of the map's mass inside the union of ``boxes`` (NaN pixels, unseen, count for neither)."""
    values = np.nan_to_num(photo_map, nan=0.0)
    total = float(values.sum())
    if total <= 0:
        return 0.0
    inside = np.zeros(values.shape, bool)
    for x0, y0, x1, y1 in boxes:
        inside[max(0, y0): y1, max(0, x0): x1] = True
    return float(values[inside].sum() / total)


def centre_prior(height: int, width: int, spec: PreprocessSpec) -> np.ndarray:
    """The baseline map: a centred Gaussian over the seen region, σ a quarter of its sides, NaN outside."""
    top, left, rows, cols = seen_region(height, width, spec)
    y = (np.arange(rows, dtype=np.float32) + 0.5 - rows / 2) / (rows / 4)
    x = (np.arange(cols, dtype=np.float32) + 0.5 - cols / 2) / (cols / 4)
    out = np.full((height, width), np.nan, np.float32)
    # normalised as the maps are (0 at its lowest, 1 at its peak), so its floor adds no mass outside the boxes
    out[top: top + rows, left: left + cols] = normalise(np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)))
    return out


def scores(photo_map: np.ndarray, boxes: list[XYXY], fraction: float = FRACTION) -> tuple[float, float]:
    """(energy in boxes, best IoU of the map's box with a true box) for one image."""
    found = map_box(photo_map, fraction)
    best = max((iou(found, b) for b in boxes), default=0.0) if found else 0.0
    return energy_inside(photo_map, boxes), best


@dataclass
class Localisation:
    """Scores accumulated image by image; ``summary`` is what eval and the report print."""

    fraction: float = FRACTION
    energy: list[float] = field(default_factory=list)
    best_iou: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    baseline_energy: list[float] = field(default_factory=list)
    baseline_iou: list[float] = field(default_factory=list)

    def add(self, photo_map: np.ndarray, boxes: list[XYXY], correct: bool, prior: np.ndarray) -> None:
        """One image: the true class's map on the photo, its boxes, whether top-1 was right, the baseline map."""
        if not boxes:
            return
        energy, best = scores(photo_map, boxes, self.fraction)
        base_energy, base_best = scores(prior, boxes, self.fraction)
        self.energy.append(energy)
        self.best_iou.append(best)
        self.correct.append(bool(correct))
        self.baseline_energy.append(base_energy)
        self.baseline_iou.append(base_best)

    def add_record(self, cam: np.ndarray, record, correct: bool, spec: PreprocessSpec, oriented: bool) -> None:
        """One image of a dataset (a ``dogkit.data.dataset.Record`` with boxes, loaded whole): ``cam`` is its
        true class's map; ``oriented``: the image was turned upright as its EXIF tag says (the spec's rule)."""
        if not record.boxes:
            return
        tag = record.orientation if oriented else 1
        width, height = oriented_size(record.width, record.height, tag)
        boxes = oriented_boxes(record.boxes, record.width, record.height, tag)
        scale = min(1.0, MAX_SIDE / max(width, height))
        if scale < 1.0:
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            boxes = [tuple(round(v * scale) for v in b) for b in boxes]
        self.add(on_photo(cam, height, width, spec), boxes, correct, centre_prior(height, width, spec))

    def summary(self) -> dict:
        n = len(self.energy)
        if not n:
            return {"images": 0}
        hits = np.asarray(self.best_iou) >= IOU_HIT
        base_hits = np.asarray(self.baseline_iou) >= IOU_HIT
        out = {"images": n, "fraction": self.fraction, "iou_hit": IOU_HIT,
               "energy_in_boxes": float(np.mean(self.energy)), "gt_known_loc": float(hits.mean()),
               "top1_loc": float((hits & np.asarray(self.correct)).mean()), "mean_iou": float(np.mean(self.best_iou)),
               "baseline": {"name": "centred Gaussian (σ = side/4)",
                            "energy_in_boxes": float(np.mean(self.baseline_energy)),
                            "gt_known_loc": float(base_hits.mean()), "mean_iou": float(np.mean(self.baseline_iou))}}
        out["beats_baseline"] = bool(out["energy_in_boxes"] > out["baseline"]["energy_in_boxes"]
                                     and out["gt_known_loc"] > out["baseline"]["gt_known_loc"])
        return out
