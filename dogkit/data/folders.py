"""A class-folder tree read as a dataset's classes and files: one sub-folder per class, nothing decoded.

Shared by ``dogkit prepare`` (which then scans, de-duplicates and splits) and ``dogkit eval`` on a folder of
class folders, without the download and archive code that ``prepare`` also holds. dogkit's own outputs (a
prepared dataset, the folder a run writes) are never read as a class.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from ..errors import DogkitError
from ..text import shown, utf8
from .dataset import ClassInfo
from .images import is_candidate

STANFORD_FOLDER = re.compile(r"^n\d{8}-(.+)$")
MAX_LISTED = 5  # names an error message lists
NOT_UTF8 = "file name is not valid UTF-8; rename it"
# What makes a folder dogkit's own output (a prepared dataset), never a class of another dataset.
OWN_OUTPUT = ("dataset.json", "manifest.csv")


def is_own_output(path: Path, skip: frozenset[Path] = frozenset()) -> bool:
    """A folder dogkit writes (the --out of this run, or any prepared dataset): never part of a source, so
    that ``--out`` inside ``--source`` does not turn the outputs of one run into a class of the next."""
    try:
        return path.resolve() in skip or all((path / name).is_file() for name in OWN_OUTPUT)
    except OSError:
        return False


def entries(folder: Path, skip: frozenset[Path]) -> list[Path]:
    return [c for c in folder.iterdir() if is_candidate(c) and not (c.is_dir() and is_own_output(c, skip))]


def class_display_name(folder: str) -> str:
    """'n02085620-Chihuahua' → 'Chihuahua', 'n02085782-Japanese_spaniel' → 'Japanese spaniel';
    other folder names are used as they are."""
    m = STANFORD_FOLDER.match(folder)
    return m.group(1).replace("_", " ") if m else folder


def discover(images_root: Path, skip: frozenset[Path] = frozenset()
             ) -> tuple[list[ClassInfo], dict[str, int], list[tuple[str, str, str]]]:
    """Classes, {relative file path: class index} and the files left out before any is read (outside any
    class folder, or named in bytes that are not UTF-8), as rejects.csv rows. Folders in ``skip`` and
    dogkit's own outputs are not part of the dataset."""
    if not images_root.is_dir():
        raise DogkitError(f"{shown(images_root)} is not a folder")
    class_dirs = sorted((d for d in entries(images_root, skip) if d.is_dir()), key=lambda d: d.name)
    loose = sorted(f.name for f in images_root.iterdir() if f.is_file() and is_candidate(f))
    if not class_dirs:
        found = f" (it holds {len(loose)} loose files)" if loose else ""
        raise DogkitError(
            f"no class folders in {shown(images_root)}{found}. dogkit expects one sub-folder per class, "
            "e.g. Images/<breed>/<image>.jpg, or the Stanford Dogs layout (Images/, Annotation/)."
        )
    if len(class_dirs) == 1:
        raise DogkitError(f"only one class folder ({shown(class_dirs[0].name)}) in {shown(images_root)}: "
                          "a classifier needs two or more.")
    check_class_names(images_root, [d.name for d in class_dirs])
    classes, files, empty = [], {}, []
    left_out = [(name, "", NOT_UTF8 if not utf8(name) else "not inside a class folder") for name in loose]
    for index, d in enumerate(class_dirs):
        classes.append(ClassInfo(index, class_display_name(d.name), d.name))
        before = len(files) + len(left_out)
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                                 and not is_own_output(Path(dirpath) / n, skip))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                # FIFOs, broken links and link loops are kept: the scan rejects them with their kind,
                # so they are listed in rejects.csv instead of vanishing.
                if is_candidate(path) and not path.is_dir():
                    rel = path.relative_to(images_root).as_posix()
                    if utf8(rel):
                        files[rel] = index
                    else:  # no UTF-8 file (manifest, JSON, terminal) can hold its name
                        left_out.append((rel, d.name, NOT_UTF8))
        if len(files) + len(left_out) == before:
            empty.append(shown(d.name))
    if empty:
        raise DogkitError(f"{len(empty)} empty class folder(s) in {shown(images_root)}: {', '.join(empty[:10])}. "
                          "Remove them or add images.")
    names = Counter(c.name for c in classes)
    if clashes := [shown(n) for n, k in names.items() if k > 1]:
        raise DogkitError(f"class folders map to the same class name: {', '.join(clashes)}")
    return classes, files, left_out


def check_class_names(images_root: Path, folders: list[str]) -> None:
    """Class names go into the manifest, the model's metadata and every prediction: a folder name that is not
    UTF-8, or holds control or format characters (newlines, escapes, bidi overrides), is refused whole."""
    bad = [name for name in folders if shown(name) != name]
    if bad:
        listed = ", ".join(f"'{shown(n)}' ({'not valid UTF-8' if not utf8(n) else 'control characters'})"
                           for n in bad[:MAX_LISTED])
        more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DogkitError(f"{len(bad)} class folder name(s) in {shown(images_root)} cannot be class names: "
                          f"{listed}{more}. Rename them (class names go into the model and its output).")
