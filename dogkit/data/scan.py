"""Integrity scan: every candidate file is read, hashed and fully decoded once, in parallel.

Results are cached in ``scan.csv`` keyed by (path, size, mtime), so re-running ``prepare`` with
another seed or ratio decodes nothing again.
"""

from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import cv2

from ..atomic import atomic_write_csv
from ..progress import progress_bar
from ..system import available_cpus
from .budget import Budget, budget_bytes, file_cost
from .images import ImageError, decode_rgb, detect_format, exif_orientation, read_file
from .limits import LIMIT_REASONS, limits


@dataclass
class ScanResult:
    path: str  # relative to the images root, with forward slashes
    size: int
    mtime_ns: int
    sha256: str = ""
    format: str = ""
    width: int = 0  # as stored (before any EXIF turn)
    height: int = 0
    error: str = ""  # empty when the image is usable
    orientation: int = 1  # the EXIF Orientation tag still to apply (1 = as stored)

    @property
    def ok(self) -> bool:
        return not self.error


def scan_file(root: Path, rel: str) -> ScanResult:
    path = root / rel
    policy = limits()
    try:
        data, st = read_file(path, policy)  # size limit checked from fstat before a byte is read
    except ImageError as e:
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = 0, 0
        return ScanResult(rel, size, mtime, error=e.reason)
    result = ScanResult(rel, st.st_size, st.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())
    result.format = detect_format(data[:16]) or ""
    try:
        image = decode_rgb(data, policy=policy)
    except ImageError as e:
        result.error = e.reason
        return result
    result.height, result.width = image.shape[:2]
    result.orientation = exif_orientation(data)
    return result


def load_scan_cache(path: Path) -> dict[str, ScanResult]:
    if not path.is_file():
        return {}
    cache = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                r = ScanResult(
                    row["path"], int(row["size"]), int(row["mtime_ns"]), row["sha256"], row["format"],
                    int(row["width"]), int(row["height"]), row["error"], int(row["orientation"]),
                )
                cache[r.path] = r
    except (KeyError, ValueError, csv.Error):
        return {}  # an unreadable cache only costs a rescan
    return cache


def save_scan_cache(path: Path, results: list[ScanResult]) -> None:
    atomic_write_csv(path, [f.name for f in fields(ScanResult)],
                     (astuple(r) for r in sorted(results, key=lambda r: r.path)))


def scan_files(
    root: Path, rels: list[str], *, workers: int | None = None, cache: dict[str, ScanResult] | None = None
) -> tuple[list[ScanResult], int]:
    """Scan ``rels`` under ``root``; entries of ``cache`` whose size and mtime still match are reused.

    Returns the results in the order of ``rels`` and how many files were decoded afresh."""
    cache = cache or {}
    results: dict[str, ScanResult] = {}
    todo = []
    for rel in rels:
        hit = cache.get(rel)
        if hit is not None and not hit.error.startswith(LIMIT_REASONS):  # limits may have been raised since
            try:
                st = (root / rel).stat()
            except OSError:
                st = None
            if st is not None and st.st_size == hit.size and st.st_mtime_ns == hit.mtime_ns:
                results[rel] = hit
                continue
        todo.append(rel)
    if todo:
        workers = workers or available_cpus()
        # Decoding runs in OpenCV with the GIL released; one OpenCV thread per worker avoids
        # oversubscribing the cores with OpenCV's own pool.
        previous = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            budget = Budget(budget_bytes())  # decoded bytes in flight, whatever the number of threads

            def scan(rel: str) -> ScanResult:
                with budget.held(file_cost(root / rel)):
                    return scan_file(root, rel)

            with ThreadPoolExecutor(max_workers=workers) as pool, progress_bar("Scanning images", len(todo)) as bar:
                for result in pool.map(scan, todo):
                    results[result.path] = result
                    bar.advance()
        finally:
            cv2.setNumThreads(previous)
    return [results[rel] for rel in rels], len(todo)
