"""``dogkit prepare``: from the official archives, a local folder or archive, or any class-folder
tree to a checked, de-duplicated, stratified train/val/test manifest.

Outputs (all written atomically, ``dataset.json`` last so that its presence means "complete"):
``manifest.csv``, ``classes.json``, ``rejects.csv``, ``scan.csv`` (decode cache), ``dataset.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..atomic import atomic_write_csv, atomic_write_text
from ..errors import DogkitError
from ..settings import SettingError, at_least, one_of, writable
from ..text import shown, utf8
from .annotations import AnnotationError, find_annotation, fit_boxes, parse_voc
from .archives import is_archive, safe_extract
from .cache import MIN_CACHE_SIZE, CacheInfo, build_cache
from .dataset import CROP_MODES, DEFAULT_DATASET_DIR, ClassInfo, Record, load_dataset, manifest_text, stored_path
from .download import download_all, stanford_dogs_files
from .folders import discover, entries
from .limits import limits
from .scan import ScanResult, load_scan_cache, save_scan_cache, scan_files
from .split import DEFAULT_RATIOS, SPLITS, stratified_split

SPLIT_MODES = ("random", "official")
NO_LISTS = ("--split official needs Stanford's train_list.mat and test_list.mat (lists.tar) beside Images/; "
            "use --split random for other datasets.")
# Reject reasons of duplicates start with these; the summary counts them by this prefix.
DUPLICATE = "duplicate"
CROSS_CLASS = "identical image in several classes"


@dataclass
class PrepareConfig:
    sources: list[Path] = field(default_factory=list)  # empty: download the official archives
    out: Path = DEFAULT_DATASET_DIR
    seed: int = 0
    ratios: tuple[float, float, float] = DEFAULT_RATIOS
    split: str = "random"
    crop: str = "none"
    cache_size: int | None = None
    workers: int | None = None
    download_dir: Path | None = None  # default: <out>/downloads
    force: bool = False

    def __post_init__(self) -> None:
        """Every value checked where it is made, before anything is downloaded, extracted or written."""
        one_of(self, "split", SPLIT_MODES)
        one_of(self, "crop", CROP_MODES)
        at_least(self, MIN_CACHE_SIZE, "cache_size")
        at_least(self, 1, "workers")
        at_least(self, 0, "seed")
        ratios = tuple(self.ratios)
        if len(ratios) != 3 or not all(math.isfinite(r) and r > 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
            raise SettingError("ratios", f"must be three positive fractions adding up to 1, got {self.ratios!r}")
        for name, path in (("out", self.out), *(("sources", p) for p in self.sources)):
            if not utf8(str(path)):
                raise SettingError(name, f"{shown(path)} is not valid UTF-8; rename it or choose another folder")
        writable(self, "out", folder=True)
        writable(self, "download_dir", folder=True)


@dataclass
class Layout:
    """Where a dataset's parts are: Stanford's ``Images/`` + ``Annotation/`` + lists, or class folders."""

    images_root: Path
    annotations_root: Path | None = None
    lists_root: Path | None = None
    kind: str = "class-folders"


@dataclass
class PrepareResult:
    out: Path
    counts: dict[str, int]
    classes: int
    rejects: dict[str, int]
    duplicate_groups: int
    duplicates_excluded: int
    scanned: int  # images decoded in this run (0 when everything came from the scan cache)
    scan_seconds: float
    up_to_date: bool = False
    cache: CacheInfo | None = None

    @property
    def scan_images_per_s(self) -> float:
        return self.scanned / self.scan_seconds if self.scan_seconds > 0 else 0.0


# ----------------------------------------------------------------------------- sources


def _child_dir(folder: Path, *names: str) -> Path | None:
    wanted = {n.lower() for n in names}
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.lower() in wanted:
            return child
    return None


def locate_layout(folder: Path, skip: frozenset[Path] = frozenset()) -> Layout:
    """Recognise Stanford's layout (``Images/``, ``Annotation/``, ``*_list.mat``) or a class-folder tree,
    looking through wrapper folders that hold a single sub-folder and nothing else (dogkit's outputs aside)."""
    for _ in range(4):
        images = _child_dir(folder, "Images")
        if images is not None:
            lists = folder if (folder / "train_list.mat").is_file() else _child_dir(folder, "lists")
            return Layout(images, _child_dir(folder, "Annotation", "Annotations"), lists, "stanford-dogs")
        children = entries(folder, skip)
        # A wrapper holds one folder, and that folder holds only folders (a lone class folder holds files).
        if len(children) == 1 and children[0].is_dir() and all(c.is_dir() for c in entries(children[0], skip)):
            folder = children[0]
            continue
        break
    return Layout(folder)


def own_folders(cfg: PrepareConfig) -> frozenset[Path]:
    """The folders this run writes, which discovery must not read as classes."""
    return frozenset(p.resolve() for p in (cfg.out, cfg.download_dir) if p is not None)


def resolve_source(cfg: PrepareConfig) -> tuple[Layout, str]:
    """Turn --source (or nothing: the official download) into a Layout; returns it and a description."""
    if not cfg.sources:
        download_dir = cfg.download_dir or cfg.out / "downloads"
        raw = cfg.out / "raw"
        for archive in download_all(stanford_dogs_files(), download_dir):
            safe_extract(archive, raw)
        return locate_layout(raw), "official Stanford Dogs archives"
    for src in cfg.sources:
        if not src.exists():
            raise DogkitError(f"--source {shown(src)} does not exist")
    if len(cfg.sources) == 1 and cfg.sources[0].is_dir():
        return locate_layout(cfg.sources[0], own_folders(cfg)), str(cfg.sources[0].resolve())
    not_archives = [shown(s) for s in cfg.sources if not (s.is_file() and is_archive(s))]
    if not_archives:
        raise DogkitError(
            "--source must be one folder, or one or more archives (.tar, .tar.gz, .tgz, .zip); "
            f"got {', '.join(not_archives)}"
        )
    raw = cfg.out / "raw" / _archive_stem(cfg.sources[0])
    for archive in cfg.sources:
        safe_extract(archive, raw)
    return locate_layout(raw), ", ".join(str(s.resolve()) for s in cfg.sources)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def inputs_fingerprint(layout: Layout, files: dict[str, int], cfg: PrepareConfig,
                       left_out: list[tuple[str, str, str]] = ()) -> str:
    """Hash of everything the outputs depend on: file listing (size, mtime), the files left out by name,
    annotations, options."""
    h = hashlib.sha256()
    for rel, _, reason in left_out:
        h.update(f"{rel}\0{reason}\n".encode("utf-8", "surrogateescape"))
    for rel in sorted(files):
        try:
            st = (layout.images_root / rel).stat()
        except OSError:  # a broken link or a loop: its own entry stands in
            st = (layout.images_root / rel).lstat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for root in (layout.annotations_root, layout.lists_root):
        if root is not None:
            for dirpath, _, filenames in sorted(os.walk(root)):
                for name in sorted(filenames):
                    st = os.stat(os.path.join(dirpath, name))
                    h.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    options = {"seed": cfg.seed, "ratios": cfg.ratios, "split": cfg.split, "crop": cfg.crop, "version": __version__,
               "limits": limits().__dict__}
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- annotations & splits


def read_boxes(layout: Layout, rel: str, scan: ScanResult) -> tuple[list, str | None]:
    if layout.annotations_root is None:
        return [], None
    folder, _, name = rel.partition("/")
    path = find_annotation(layout.annotations_root, folder, Path(name).name)
    if path is None:
        return [], None
    try:
        size, boxes = parse_voc(path)
    except AnnotationError as e:
        return [], str(e)
    return fit_boxes(boxes, size, (scan.width, scan.height)), None


def official_lists(lists_root: Path) -> dict[str, str]:
    """{'<class folder>/<file>': 'train'|'test'} from Stanford's train_list.mat / test_list.mat."""
    from scipy.io import loadmat

    assignment = {}
    for split in ("train", "test"):
        path = lists_root / f"{split}_list.mat"
        try:
            mat = loadmat(str(path))
            entries = mat["file_list"].ravel()
        except (OSError, KeyError, ValueError) as e:
            raise DogkitError(f"cannot read {shown(path)}: {shown(e)}") from e
        for entry in entries:
            assignment[str(entry.ravel()[0] if hasattr(entry, "ravel") else entry).replace("\\", "/")] = split
    return assignment


def assign_splits(cfg: PrepareConfig, layout: Layout, kept: dict[str, int], classes: list[ClassInfo]):
    """Returns ({path: split}, [(path, reason)] for images the official lists do not name)."""
    folder_of = {c.index: c.folder for c in classes}
    if cfg.split == "random":
        by_class = defaultdict(list)
        for rel, label in kept.items():
            by_class[folder_of[label]].append(rel)
        return stratified_split(by_class, cfg.ratios, cfg.seed), []
    if layout.lists_root is None:
        raise DogkitError(NO_LISTS)
    official = official_lists(layout.lists_root)
    assignment, unlisted, train_by_class = {}, [], defaultdict(list)
    for rel, label in kept.items():
        split = official.get(rel)
        if split is None:
            unlisted.append((rel, "not in the official train/test lists"))
        elif split == "test":
            assignment[rel] = "test"
        else:
            train_by_class[folder_of[label]].append(rel)
    # Validation is carved from the official training images, in the train:val proportion asked for.
    train_val = (cfg.ratios[0], cfg.ratios[1])
    assignment.update(stratified_split(train_by_class, train_val, cfg.seed, names=("train", "val")))
    return assignment, unlisted


# ----------------------------------------------------------------------------- outputs


def write_rejects(path: Path, rows: list[tuple[str, str, str]]) -> None:
    # Names come from outside: escaped, so that every row is one line of UTF-8 whatever the file was called.
    atomic_write_csv(path, ("path", "class_folder", "reason"), sorted(tuple(map(shown, row)) for row in rows))


def find_duplicates(ok: list[ScanResult], files: dict[str, int], classes: list[ClassInfo]):
    """Identical files: within one class keep the first and drop the rest; across classes drop all,
    since the same picture under two labels would leak between train and test."""
    groups = defaultdict(list)
    for r in ok:
        groups[r.sha256].append(r.path)
    dropped, n_groups = {}, 0
    for paths in groups.values():
        if len(paths) < 2:
            continue
        n_groups += 1
        paths = sorted(paths)
        labels = {files[p] for p in paths}
        if len(labels) > 1:
            names = ", ".join(sorted(classes[i].folder for i in labels))
            for p in paths:
                dropped[p] = f"{CROSS_CLASS} ({names}): {', '.join(paths)}"
        else:
            for p in paths[1:]:
                dropped[p] = f"{DUPLICATE} of {paths[0]}"
    return dropped, n_groups


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Check the options, find the images, scan them, drop what is unusable, split, and write the manifest,
    classes, rejects and ``dataset.json`` (each atomically). Nothing is redone when the inputs are unchanged."""
    limits()  # a malformed DOGKIT_MAX_* variable is an error now, not half-way through the scan
    out = cfg.out
    layout, source = resolve_source(cfg)
    if cfg.split == "official" and layout.lists_root is None:  # known now: fail before the scan, not after
        raise DogkitError(NO_LISTS)
    if not utf8(str(layout.images_root)):  # a wrapper folder's name, which dataset.json would have to hold
        raise DogkitError(f"{shown(layout.images_root)} is not valid UTF-8; rename it")
    classes, files, left_out = discover(layout.images_root, own_folders(cfg))
    fingerprint = inputs_fingerprint(layout, files, cfg, left_out)
    result = None if cfg.force else _up_to_date(out, fingerprint)
    if result is None:
        out.mkdir(parents=True, exist_ok=True)
        scan_cache = {} if cfg.force else load_scan_cache(out / "scan.csv")
        start = time.perf_counter()
        scans, decoded = scan_files(layout.images_root, sorted(files), workers=cfg.workers, cache=scan_cache)
        scan_seconds = time.perf_counter() - start
        save_scan_cache(out / "scan.csv", scans)
        kept, by_path, rejects, dupes = _usable(out, scans, files, left_out, classes)
        assignment, unlisted = assign_splits(cfg, layout, kept, classes)
        rejects += [(p, classes[files[p]].folder, reason) for p, reason in unlisted]
        records, annotation_errors = _records(layout, assignment, kept, by_path, classes)
        manifest = manifest_text(records)
        info = _dataset_info(cfg, layout, source, classes, records, rejects, dupes, len(files), annotation_errors)
        info |= {"manifest_sha256": hashlib.sha256(manifest.encode("utf-8")).hexdigest(),
                 "inputs_fingerprint": fingerprint}
        classes_json = [{"index": c.index, "name": c.name, "folder": c.folder} for c in classes]
        write_rejects(out / "rejects.csv", rejects)
        atomic_write_text(out / "classes.json", json.dumps(classes_json, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(out / "manifest.csv", manifest)
        atomic_write_text(out / "dataset.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        result = _result_from_info(out, info)
        result.scanned, result.scan_seconds = decoded, scan_seconds
    if cfg.cache_size:
        result.cache = build_cache(load_dataset(out), cfg.cache_size, cfg.crop, workers=cfg.workers)
    return result


def _up_to_date(out: Path, fingerprint: str) -> PrepareResult | None:
    """The previous result when ``dataset.json`` was written from these very inputs and settings."""
    info_path = out / "dataset.json"
    if not info_path.is_file():
        return None
    try:
        previous = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if previous.get("inputs_fingerprint") != fingerprint or not (out / "manifest.csv").is_file():
        return None
    result = _result_from_info(out, previous)
    result.up_to_date = True
    return result


def _usable(out: Path, scans: list[ScanResult], files: dict[str, int], left_out: list[tuple[str, str, str]],
            classes: list[ClassInfo]):
    """(kept {path: label}, scans by path, rejects, (duplicate groups, duplicates dropped)); an error, with
    ``rejects.csv`` written, when a class has no usable image left."""
    rejects = list(left_out)
    ok = []
    for s in scans:
        if s.ok:
            ok.append(s)
        else:
            rejects.append((s.path, classes[files[s.path]].folder, s.error))
    dropped, n_groups = find_duplicates(ok, files, classes)
    rejects += [(p, classes[files[p]].folder, reason) for p, reason in dropped.items()]
    kept = {s.path: files[s.path] for s in ok if s.path not in dropped}
    without = [shown(c.folder) for c in classes if not any(label == c.index for label in kept.values())]
    if without:
        write_rejects(out / "rejects.csv", rejects)
        raise DogkitError(f"{len(without)} class(es) have no usable image left: {', '.join(without[:10])}. "
                          f"See {shown(out / 'rejects.csv')} for the reasons.")
    return kept, {s.path: s for s in ok}, rejects, (n_groups, len(dropped))


def _records(layout: Layout, assignment: dict[str, str], kept: dict[str, int], by_path: dict[str, ScanResult],
             classes: list[ClassInfo]) -> tuple[list[Record], list[str]]:
    """The manifest's records, in path order, with their boxes; and the annotation files that failed."""
    records, annotation_errors = [], []
    for rel in sorted(assignment):
        scan = by_path[rel]
        boxes, error = read_boxes(layout, rel, scan)
        if error:
            annotation_errors.append(error)
        label = kept[rel]
        records.append(Record(rel, label, classes[label].name, assignment[rel], scan.width, scan.height,
                              tuple(boxes), scan.sha256, scan.format, scan.orientation))
    return records, annotation_errors


def _dataset_info(cfg: PrepareConfig, layout: Layout, source: str, classes: list[ClassInfo], records: list[Record],
                  rejects: list, dupes: tuple[int, int], scanned: int, annotation_errors: list[str]) -> dict:
    counts = Counter(r.split for r in records)
    return {
        "dogkit_version": __version__,
        "source": source,
        "layout": layout.kind,
        "images_root": stored_path(layout.images_root, cfg.out),
        "annotations_root": stored_path(layout.annotations_root, cfg.out) if layout.annotations_root else None,
        "seed": cfg.seed,
        "ratios": list(cfg.ratios),
        "split": cfg.split,
        "crop": cfg.crop,
        # Every reader turns images upright by their EXIF Orientation (the spec of models trained on it says so).
        "exif_orientation": "apply",
        "num_classes": len(classes),
        "counts": {s: counts.get(s, 0) for s in SPLITS} | {"total": len(records)},
        "images_with_boxes": sum(1 for r in records if r.boxes),
        "annotation_errors": len(annotation_errors),
        "rejects": dict(sorted(Counter(_reason_kind(reason) for _, _, reason in rejects).items())),
        "duplicate_groups": dupes[0],
        "duplicates_excluded": dupes[1],
        "scanned_files": scanned,
    }


def _reason_kind(reason: str) -> str:
    """Group reject reasons for the summary: 'duplicate of a/b.jpg' → 'duplicate'."""
    for kind in (DUPLICATE, CROSS_CLASS):
        if reason.startswith(kind):
            return kind
    return reason


def _result_from_info(out: Path, info: dict) -> PrepareResult:
    return PrepareResult(out, {s: info["counts"][s] for s in (*SPLITS, "total")}, info["num_classes"],
                         info["rejects"], info["duplicate_groups"], info["duplicates_excluded"], 0, 0.0)
