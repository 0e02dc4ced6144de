"""A model's logits on a split of the prepared dataset or on a class-folder tree, with ONNX Runtime alone.

``load_eval_data`` picks the images (a prepared dataset's split, or class folders matched to the model's
classes) for both ``dogkit eval`` backends; ``onnx_logits`` runs the exported model over them with the
preprocessing its metadata carries. No torch here: the torch backend is ``dogkit.training.evaluation``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.dataset import Dataset, Record, load_dataset
from ..errors import DogkitError
from ..log import log
from ..progress import progress_bar
from .predict import iter_batches


def folder_dataset(folder: Path, class_names: list[str]) -> Dataset:
    """A class-folder tree as an ad-hoc 'test' split, its folders matched to the model's classes."""
    from ..data.dataset import ClassInfo
    from ..data.prepare import discover

    classes, files, _ = discover(folder)
    index = {name: i for i, name in enumerate(class_names)}
    label_of = {c.index: index.get(c.name, index.get(c.folder)) for c in classes}
    unknown = [c.folder for c in classes if label_of[c.index] is None]
    if unknown:
        raise DogkitError(f"class folders the model does not know: {', '.join(unknown[:10])}")
    records = [Record(rel, label_of[k], class_names[label_of[k]], "test", 0, 0) for rel, k in sorted(files.items())]
    infos = [ClassInfo(i, n, n) for i, n in enumerate(class_names)]
    return Dataset(folder, folder, infos, records, {"crop": "none"})


def load_eval_data(data: Path, split: str, class_names: list[str], box_crop: str = "none"
                   ) -> tuple[Dataset, list[Record]]:
    if (Path(data) / "dataset.json").is_file():
        dataset = load_dataset(data)
        if dataset.class_names != class_names:
            raise DogkitError(f"the model's {len(class_names)} classes differ from the dataset's "
                              f"{len(dataset.class_names)} in {data}; evaluate on the dataset it was trained on")
        records = dataset.split(split)
        if not records:
            raise DogkitError(f"{data} has no {split!r} images")
        return dataset, records
    if Path(data).is_dir():
        dataset = folder_dataset(Path(data), class_names)
        if box_crop == "boxes":
            log.warning("[yellow]warning:[/] this model was trained on the dogs' box crops (--crop boxes); "
                        f"the photos in {data} are used whole, so expect lower accuracy than on crops")
        return dataset, dataset.records
    raise DogkitError(f"{data} is neither a prepared dataset nor a folder of class folders")


def onnx_logits(model_path: Path, data: Path, split: str, batch_size: int, device: str = "cpu"):
    from .runtime import OnnxClassifier

    model = OnnxClassifier(model_path, device=device)
    dataset, records = load_eval_data(data, split, model.class_names, model.spec.box_crop)
    crop = model.spec.box_crop

    def load(rec: Record) -> np.ndarray:
        return model.preprocess(dataset.load_rgb(rec, crop, model.spec.orients))

    logits, labels = [], []
    with progress_bar(f"Evaluating {model_path.name} on {split}", len(records)) as bar:
        for good, batch, failed in iter_batches(records, load, batch_size):
            if failed:
                rec, reason = failed[0]
                raise DogkitError(f"{dataset.image_path(rec)}: {reason}; run `dogkit prepare` again")
            logits.append(model.run(batch))
            labels += [r.label for r in good]
            bar.advance(len(good))
    return np.concatenate(logits), np.array(labels), model.class_names
