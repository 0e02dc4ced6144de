"""A model's logits on a split of the prepared dataset or on a class-folder tree, with ONNX Runtime alone.

``load_eval_data`` picks the images (a prepared dataset's split, or class folders matched to the model's
classes) for both ``dogkit eval`` backends; ``onnx_logits`` runs the exported model over them with the
preprocessing its metadata carries. No torch here: the torch backend is ``dogkit.training.evaluation``.
"""

from __future__ import annotations

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

Skipped = list[tuple[str, str]]


def folder_dataset(folder: Path, class_names: list[str]) -> tuple[Dataset, Skipped]:
    """A class-folder tree as an ad-hoc 'test' split, its folders matched to the model's classes. Its files were
    never scanned, so they are here (as ``prepare`` scans): one that is not a usable image is set aside with its
    reason, and the others are evaluated."""
    from ..data.dataset import ClassInfo
    from ..data.folders import discover
    from ..data.scan import scan_files

    classes, files, loose = discover(folder)
    index = {name: i for i, name in enumerate(class_names)}
    label_of = {c.index: index.get(c.name, index.get(c.folder)) for c in classes}
    unknown = [shown(c.folder) for c in classes if label_of[c.index] is None]
    if unknown:
        raise DogkitError(f"class folders the model does not know: {', '.join(unknown[:10])}")
    rels = sorted(files)
    scans, _ = scan_files(folder, rels)
    skipped = [(shown(s.path), s.error) for s in scans if not s.ok] + [(shown(n), why) for n, _, why in loose]
    records = [Record(s.path, label_of[files[s.path]], class_names[label_of[files[s.path]]], "test", s.width,
                      s.height, orientation=s.orientation) for s in scans if s.ok]
    if not records:
        raise DogkitError(f"none of the {len(rels)} files in {shown(folder)} is a usable image (first: "
                          f"{skipped[0][0]}: {skipped[0][1]})")
    infos = [ClassInfo(i, n, n) for i, n in enumerate(class_names)]
    return Dataset(folder, folder, infos, records, {"crop": "none"}), skipped


def load_eval_data(data: Path, split: str, class_names: list[str], box_crop: str = "none"
                   ) -> tuple[Dataset, list[Record], Skipped]:
    """The images to evaluate: a prepared dataset's split, or a class-folder tree (whose unusable files are
    returned as (file, reason) and logged)."""
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
        dataset, skipped = folder_dataset(Path(data), class_names)
        for path, reason in skipped[:10]:
            log.warning(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}")
        if len(skipped) > 10:
            log.warning(f"[yellow]skipped[/] {len(skipped) - 10} more (all of them in metrics.json)")
        if box_crop == "boxes":
            log.warning("[yellow]warning:[/] this model was trained on the dogs' box crops (--crop boxes); "
                        f"the photos in {escape(shown(data))} are used whole, so expect lower accuracy than on crops")
        return dataset, dataset.records, skipped
    raise DogkitError(f"{shown(data)} is neither a prepared dataset nor a folder of class folders")


def onnx_logits(model_path: Path, data: Path, split: str, batch_size: int, device: str = "cpu"):
    from .runtime import OnnxClassifier

    model = OnnxClassifier(model_path, device=device)
    dataset, records, skipped = load_eval_data(data, split, model.class_names, model.spec.box_crop)
    crop = model.spec.box_crop

    def load(rec: Record) -> np.ndarray:
        return model.preprocess(dataset.load_rgb(rec, crop, model.spec.orients))

    logits, labels = [], []
    with progress_bar(f"Evaluating {model_path.name} on {split}", len(records)) as bar:
        for good, batch, failed in iter_batches(records, load, batch_size,
                                                cost=lambda rec: file_cost(dataset.image_path(rec))):
            if failed:  # a prepared dataset's image that went bad after its scan: its metrics would not be the split's
                rec, reason = failed[0]
                raise DogkitError(f"{shown(dataset.image_path(rec))}: {reason}; run `dogkit prepare` again")
            logits.append(model.run(batch))
            labels += [r.label for r in good]
            bar.advance(len(good))
    return np.concatenate(logits), np.array(labels), model.class_names, skipped
