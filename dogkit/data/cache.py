"""Optional image cache: every manifest image decoded once, shrunk and stored as raw uint8.

Training then reads pixels from a memory map instead of decoding JPEGs. Images keep their aspect
ratio (shorter side = ``size``) so random-resized crops still see the whole picture. The cache is
keyed by its parameters and the manifest's hash: a stale one is rebuilt, a current one reused.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..atomic import atomic_write_text, fsync_dir, pid_tag, remove_stale
from ..errors import DogkitError
from ..progress import progress_bar
from ..system import available_cpus
from ..text import shown
from .budget import BYTES_PER_PIXEL, Budget, budget_bytes
from .dataset import CROP_MODES, Dataset
from .images import ImageError, oriented_size, resize_shorter, scaled_size
from .limits import GIB, MIB, megabytes

CACHE_FORMAT = 1
MIN_CACHE_SIZE = 16  # pixels of the shorter side; below this no network input size is served
# Left free beside the cache for its index, its metadata and the file system's own bookkeeping.
HEADROOM = 16 * MIB


@dataclass
class CacheInfo:
    path: Path
    images: int
    bytes: int
    built: bool  # False when an up-to-date cache was reused
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")


def cache_dir(dataset: Dataset, size: int, crop: str) -> Path:
    return dataset.root / "cache" / f"{size}px-{crop}"


def _meta(dataset: Dataset, size: int, crop: str) -> dict:
    return {"format": CACHE_FORMAT, "size": size, "crop": crop, "resize": "shorter side, INTER_AREA, never enlarged",
            "manifest_sha256": dataset.manifest_sha256, "images": len(dataset.records),
            "exif_orientation": "apply" if dataset.orients else "ignore"}


def _target_shapes(dataset: Dataset, size: int, crop: str) -> np.ndarray:
    shapes = np.zeros((len(dataset.records), 2), dtype=np.int64)
    for i, rec in enumerate(dataset.records):
        box = rec.crop_box(crop)
        width, height = (box.xmax - box.xmin, box.ymax - box.ymin) if box else (rec.width, rec.height)
        if dataset.orients:  # the crop turns with the image
            width, height = oriented_size(width, height, rec.orientation)
        w, h = scaled_size(width, height, size)
        shapes[i] = (h, w)
    return shapes


def is_current(path: Path, meta: dict) -> bool:
    try:
        return json.loads((path / "meta.json").read_text(encoding="utf-8")) == meta
    except (OSError, ValueError):
        return False


def build_cache(dataset: Dataset, size: int, crop: str | None = None, *, workers: int | None = None) -> CacheInfo:
    """Build (or reuse) the cache for ``size`` and ``crop``; written to a temp folder, then renamed.

    The space is checked and the file's blocks reserved before a pixel is written, so a full disk is one
    error line, never a SIGBUS from a memory-mapped write; a build cut short leaves only a temp folder,
    which the next build removes."""
    crop = crop or dataset.crop
    if crop not in CROP_MODES:
        raise DogkitError(f"unknown crop mode {crop!r}; choose one of {', '.join(CROP_MODES)}")
    if size < MIN_CACHE_SIZE:
        raise DogkitError(f"--cache must be at least {MIN_CACHE_SIZE} pixels, got {size}")
    target = cache_dir(dataset, size, crop)
    meta = _meta(dataset, size, crop)
    start = time.perf_counter()
    if is_current(target, meta):
        return CacheInfo(target, len(dataset.records), (target / "images.u8").stat().st_size, False, 0.0)

    shapes = _target_shapes(dataset, size, crop)
    nbytes = shapes[:, 0] * shapes[:, 1] * 3
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)
    total = max(int(nbytes.sum()), 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, f".{glob.escape(target.name)}.*-*")  # builds of killed processes
    if target.exists():  # stale, so no reader may use it; its space goes to the new one
        shutil.rmtree(target)
    _check_space(target.parent, total)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-{pid_tag()}-", dir=target.parent))
    try:
        _reserve(tmp / "images.u8", total)
        _write_images(dataset, size, crop, tmp / "images.u8", offsets, shapes, workers)
        np.save(tmp / "index.npy", np.column_stack([offsets, shapes]))
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        _swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return CacheInfo(target, len(shapes), int(nbytes.sum()), True, time.perf_counter() - start)


def _amount(n: float) -> str:
    return f"{n / GIB:.1f} GB" if n >= GIB else megabytes(n)


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed + HEADROOM > free:
        raise DogkitError(f"the image cache needs {_amount(needed + HEADROOM)} in {shown(folder)} but only "
                          f"{_amount(free)} is free; free some space or choose a smaller --cache")


def _reserve(path: Path, nbytes: int) -> None:
    """Create the cache file with its blocks allocated. A memory map over a sparse file finds a full disk
    only when a write touches a block that cannot be had, and the kernel answers that with SIGBUS."""
    with open(path, "wb") as f:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:  # no way to reserve (macOS, Windows): sparse, as the file system allows
                f.truncate(nbytes)
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise DogkitError(f"cannot reserve {_amount(nbytes)} for the image cache in {shown(path.parent.parent)} "
                              f"({e.strerror or e}){'; free some space or choose a smaller --cache' if full else ''}. "
                              "Nothing was kept.") from e


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the complete cache into place; one built meanwhile by another process is moved aside first."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-{pid_tag()}-", dir=target.parent))
        os.replace(target, old / target.name)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    fsync_dir(target.parent)


def _write_images(dataset: Dataset, size: int, crop: str, path: Path, offsets: np.ndarray, shapes: np.ndarray,
                  workers: int | None) -> None:
    nbytes = shapes[:, 0] * shapes[:, 1] * 3
    data = np.memmap(path, dtype=np.uint8, mode="r+")  # "w+" would truncate the reserved file to a sparse one

    budget = Budget(budget_bytes())

    def fill(i: int) -> None:
        rec = dataset.records[i]
        try:
            with budget.held(rec.width * rec.height * BYTES_PER_PIXEL):  # the manifest knows each image's size
                image = resize_shorter(dataset.load_rgb(rec, crop), size)
        except ImageError as e:
            raise DogkitError(f"{dataset.image_path(rec)} changed since `dogkit prepare` ({e.reason}); "
                              "run `dogkit prepare` again.") from e
        if image.shape[:2] != tuple(shapes[i]):
            raise DogkitError(f"{dataset.image_path(rec)} is {image.shape[1]}x{image.shape[0]} but the manifest "
                              "says otherwise; run `dogkit prepare` again.")
        data[offsets[i]: offsets[i] + nbytes[i]] = image.reshape(-1)

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # parallelism comes from the worker threads
    try:
        with ThreadPoolExecutor(workers or available_cpus()) as pool, \
                progress_bar(f"Caching images at {size}px", len(shapes)) as bar:
            for _ in pool.map(fill, range(len(shapes))):
                bar.advance()
    finally:
        cv2.setNumThreads(previous)
    data.flush()


class ImageCache:
    """Read side: ``cache[i]`` is manifest row i's image (RGB uint8, HxWx3) as a zero-copy view."""

    def __init__(self, dataset: Dataset, size: int, crop: str | None = None):
        crop = crop or dataset.crop
        self.path = cache_dir(dataset, size, crop)
        if not is_current(self.path, _meta(dataset, size, crop)):
            raise DogkitError(f"no current image cache at {self.path}; run `dogkit prepare --cache {size}`.")
        self.index = np.load(self.path / "index.npy")
        self._data: np.memmap | None = None

    @property
    def data(self) -> np.memmap:
        # Opened on first use in each process: a memmap pickles as a full in-memory copy of the file, so a
        # loader worker started by spawn/forkserver would otherwise receive the whole cache.
        if self._data is None:
            self._data = np.memmap(self.path / "images.u8", dtype=np.uint8, mode="r")
        return self._data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        offset, h, w = (int(v) for v in self.index[i])
        return self.data[offset: offset + h * w * 3].reshape(h, w, 3)
