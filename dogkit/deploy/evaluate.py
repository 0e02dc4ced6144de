"""A model's logits on a split of the prepared dataset or on a class-folder tree, with ONNX Runtime alone.

``load_eval_data`` picks the images (a prepared dataset's split, or class folders matched to the model's
classes) for both ``dogkit eval`` backends; ``onnx_evaluation`` runs the exported model over them with the
preprocessing its metadata carries, scoring its activation maps against the dataset's boxes in the same pass.
No torch here: the torch backend is ``dogkit.training.evaluation``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape

from ..data.budget import file_cost
from ..data.dataset import Dataset, Record, load_dataset
from ..errors import DogkitError
from ..log import log
from ..progress import progress_bar
from ..text import shown
from .decode import iter_batches
from .localise import Localisation

Skipped = list[tuple[str, str]]


def folder_dataset(folder: Path, class_names: list[str], scan: bool = True) -> tuple[Dataset, Skipped]:
    """A class-folder tree as an ad-hoc 'test' split, its folders matched to the model's classes, and the files set
    aside with their reasons. Its files were never scanned: with ``scan``, they are here (as ``prepare`` scans),
    for a loader that cannot skip a bad image; without, the caller skips those that fail to decode."""
    from ..data.dataset import ClassInfo
    from ..data.folders import discover
    from ..data.scan import scan_files

    classes, files, loose = discover(folder)
    index = {name: i for i, name in enumerate(class_names)}
    label_of = {c.index: index.get(c.name, index.get(c.folder)) for c in classes}
    unknown = [shown(c.folder) for c in classes if label_of[c.index] is None]
    if unknown:
        raise DogkitError(f"class folders the model does not know: {', '.join(unknown[:10])}")
    skipped = [(shown(n), why) for n, _, why in loose]
    usable = sorted(files)
    if scan:
        scans, _ = scan_files(folder, usable)
        skipped = [(shown(s.path), s.error) for s in scans if not s.ok] + skipped
        usable = [s.path for s in scans if s.ok]
        if not usable:
            raise DogkitError(f"none of the {len(files)} files in {shown(folder)} is a usable image (first: "
                              f"{skipped[0][0]}: {skipped[0][1]})")
    records = [Record(rel, label_of[files[rel]], class_names[label_of[files[rel]]], "test", 0, 0) for rel in usable]
    infos = [ClassInfo(i, n, n) for i, n in enumerate(class_names)]
    return Dataset(folder, folder, infos, records, {"crop": "none", "scanned": scan}), skipped


def log_skipped(skipped: Skipped) -> None:
    for path, reason in skipped[:10]:
        log.warning(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}")
    if len(skipped) > 10:
        log.warning(f"[yellow]skipped[/] {len(skipped) - 10} more (all of them in metrics.json)")


def load_eval_data(data: Path, split: str, class_names: list[str], box_crop: str = "none", scan: bool = True
                   ) -> tuple[Dataset, list[Record], Skipped]:
    """The images to evaluate: a prepared dataset's split, or a class-folder tree (the files set aside are returned
    as (file, reason) and logged; ``scan``: see ``folder_dataset``)."""
    if (Path(data) / "dataset.json").is_file():
        dataset = load_dataset(data)
        if dataset.class_names != class_names:
            raise DogkitError(f"the model's {len(class_names)} classes differ from the dataset's "
                              f"{len(dataset.class_names)} in {shown(data)}; evaluate on the dataset it was trained on")
        records = dataset.split(split)
        if not records:
            raise DogkitError(f"{shown(data)} has no {split!r} images")
        return dataset, records, []
    if Path(data).is_dir():
        dataset, skipped = folder_dataset(Path(data), class_names, scan)
        log_skipped(skipped)
        if box_crop == "boxes":
            log.warning("[yellow]warning:[/] this model was trained on the dogs' box crops (--crop boxes); "
                        f"the photos in {escape(shown(data))} are used whole, so expect lower accuracy than on crops")
        return dataset, dataset.records, skipped
    raise DogkitError(f"{shown(data)} is neither a prepared dataset nor a folder of class folders")


@dataclass
class OnnxEvaluation:
    logits: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    skipped: Skipped
    temperature: float = 1.0
    threshold: float | None = None  # the stored "unsure" threshold (None: none stored)
    calibration: dict = field(default_factory=dict)  # what export stored; {} for models made before
    localisation: dict = field(default_factory=dict)  # Localisation.summary(), or {"unavailable": why}
    paths: list[str] = field(default_factory=list)  # each row's image, relative to the images root
    explains: bool = False  # the model has activation maps


def localisation_problem(model, dataset: Dataset, records: list[Record], localise: bool) -> str | None:
    """Why the maps cannot be scored against boxes here (None: they can)."""
    if not localise:
        return "skipped (--no-localise)"
    if not model.explains:
        return model.why_no_maps()
    if model.spec.box_crop == "boxes":
        return "the model sees the dog's box crop, so its maps cannot be scored against the box"
    if not any(r.boxes for r in records):
        return f"the images of {shown(dataset.root)} carry no boxes (a class-folder tree has none)"
    return None


def onnx_evaluation(model_path: Path, data: Path, split: str, batch_size: int, device: str = "cpu",
                    localise: bool = True) -> OnnxEvaluation:
    """The model's logits on the images and, where the model explains and the images have boxes, how well its
    true-class maps find the dogs: one inference per batch gives both (``run_maps``)."""
    from .runtime import OnnxClassifier

    model = OnnxClassifier(model_path, device=device)
    # A class-folder tree is not scanned first: an image that fails to decode is set aside here, decoded once.
    prepared = (Path(data) / "dataset.json").is_file()
    dataset, records, skipped = load_eval_data(data, split, model.class_names, model.spec.box_crop, scan=False)
    crop = model.spec.box_crop
    why_not = localisation_problem(model, dataset, records, localise)
    scored = Localisation() if why_not is None else None

    def load(rec: Record) -> np.ndarray:
        return model.preprocess(dataset.load_rgb(rec, crop, model.spec.orients))

    logits, labels, paths, failures = [], [], [], []
    with progress_bar(f"Evaluating {model_path.name} on {split}", len(records)) as bar:
        for good, batch, failed in iter_batches(records, load, batch_size,
                                                cost=lambda rec: file_cost(dataset.image_path(rec))):
            if failed and prepared:  # an image that went bad after its scan: the metrics would not be the split's
                rec, reason = failed[0]
                raise DogkitError(f"{shown(dataset.image_path(rec))}: {reason}; run `dogkit prepare` again")
            failures += [(shown(rec.path), reason) for rec, reason in failed]
            if batch is not None:
                if scored is not None:
                    out, cams = model.run_maps(batch)
                    for i, rec in enumerate(good):
                        scored.add_record(cams[i, rec.label], rec, int(out[i].argmax()) == rec.label, model.spec,
                                          model.spec.orients)
                else:
                    out = model.run(batch)
                logits.append(out)
                labels += [r.label for r in good]
                paths += [r.path for r in good]
            bar.advance(len(good) + len(failed))
    log_skipped(failures)
    if not logits:
        first = (failures + skipped)[0]
        raise DogkitError(f"none of the {len(records)} files in {shown(data)} is a usable image (first: {first[0]}: "
                          f"{first[1]})")
    if scored is not None and not scored.energy:
        why_not = "none of the images has a box"
    return OnnxEvaluation(np.concatenate(logits), np.array(labels), model.class_names, sorted(failures) + skipped,
                          model.temperature, model.threshold, model.calibration,
                          scored.summary() if why_not is None else {"unavailable": why_not}, paths,
                          model.explains)


def onnx_logits(model_path: Path, data: Path, split: str, batch_size: int, device: str = "cpu"):
    """(logits, labels, class names, skipped) alone, as export's calibration reads them: no maps scored."""
    result = onnx_evaluation(model_path, data, split, batch_size, device, localise=False)
    return result.logits, result.labels, result.class_names, result.skipped
