"""``dogkit eval``: a model on a split of the prepared dataset, or on a class-folder tree.

Two backends on the same images and the same preprocessing: ``onnx`` (ONNX Runtime; never imports
torch) and ``torch`` (a run's ``best.pt``). Writes ``metrics.json`` (accuracy, top-5, macro and
weighted precision/recall/F1), ``per_class.csv``, ``confusion.csv`` and, when matplotlib is
installed, ``confusion.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.markup import escape

from ..atomic import atomic_write_csv, atomic_write_text
from ..data.dataset import Dataset, Record, load_dataset
from ..deploy.predict import iter_batches
from ..errors import DogkitError
from ..progress import console, progress_bar
from ..runs import DEFAULT_RUNS_DIR, best_run
from .metrics import MACRO_RULE, classification_metrics, confusion, per_class_report
from .plots import have_matplotlib, plot_confusion

BACKENDS = ("onnx", "torch")


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    labels: np.ndarray
    logits: np.ndarray


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
            console.print("[yellow]warning:[/] this model was trained on the dogs' box crops (--crop boxes); "
                          f"the photos in {data} are used whole, so expect lower accuracy than on crops")
        return dataset, dataset.records
    raise DogkitError(f"{data} is neither a prepared dataset nor a folder of class folders")


def onnx_logits(model_path: Path, data: Path, split: str, batch_size: int, device: str = "cpu"):
    from ..deploy.runtime import OnnxClassifier

    model = OnnxClassifier(model_path, device=device)
    dataset, records = load_eval_data(data, split, model.class_names, model.spec.box_crop)
    crop = model.spec.box_crop

    def load(rec: Record) -> np.ndarray:
        return model.preprocess(dataset.load_rgb(rec, crop))

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


def torch_logits(run_dir: Path, data: Path, split: str, batch_size: int, device: str = "auto"):
    from ..deploy.preprocess import PreprocessSpec
    from ..training.checkpoint import load_best
    from ..training.device import resolve_device
    from ..training.evaluation import predict_logits
    from ..training.loaders import ManifestImages, make_loader
    from ..training.transforms import EvalFn

    model, ckpt, _ = load_best(run_dir)
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    dataset, records = load_eval_data(data, split, ckpt["class_names"], spec.box_crop)
    torch_device = resolve_device(device)
    images = ManifestImages(dataset, records, EvalFn(spec), spec.box_crop)
    loader = make_loader(images, batch_size, shuffle=False, workers=0)
    # fp32, no autocast: the reference the ONNX model is compared with.
    logits, labels = predict_logits(model.to(torch_device), loader, torch_device, None, channels_last=True)
    return logits.numpy(), labels.numpy(), ckpt["class_names"]


def write_report(out_dir: Path, labels: np.ndarray, logits: np.ndarray, class_names: list[str], info: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(labels, logits)
    preds = logits.argmax(1)
    summary = {**info, "images": int(len(labels)), "macro_average": MACRO_RULE, "metrics": metrics}
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    columns = ["class", "precision", "recall", "f1", "support"]
    atomic_write_csv(out_dir / "per_class.csv", columns,
                     ([row[c] for c in columns] for row in per_class_report(labels, preds, class_names)))
    cm = confusion(labels, preds, len(class_names))
    atomic_write_csv(out_dir / "confusion.csv", ["true \\ predicted", *class_names],
                     ([name, *row.tolist()] for name, row in zip(class_names, cm)))
    if have_matplotlib():  # it comes with the [train] extra; without it the CSV says it all
        plot_confusion(cm, class_names, out_dir / "confusion.png")
    return metrics


def evaluate(backend: str = "onnx", *, model: Path | None = None, run: Path | None = None, data: Path | None = None,
             split: str = "test", out: Path | None = None, batch_size: int = 32, device: str | None = None,
             runs_dir: Path = DEFAULT_RUNS_DIR) -> EvalResult:
    if backend not in BACKENDS:
        raise DogkitError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    start = time.perf_counter()
    if backend == "onnx":
        if model is None:
            model = (run or best_run(runs_dir, need="model.onnx")) / "model.onnx"
        run_dir = model.parent if (model.parent / "config.json").is_file() else None
    else:
        run_dir = run or (model.parent if model else best_run(runs_dir, need="best.pt"))
    data = data or _run_data(run_dir)
    if data is None:
        raise DogkitError("which images? pass --data (a prepared dataset folder or a folder of class folders)")
    if backend == "onnx":
        logits, labels, names = onnx_logits(model, data, split, batch_size, device or "cpu")
        source = str(model)
    else:
        logits, labels, names = torch_logits(run_dir, data, split, batch_size, device or "auto")
        source = str(run_dir / "best.pt")
    if out is None:
        stem = f"{backend}-{model.stem if model else 'best'}-{split}"
        out = (run_dir / "eval" / stem) if run_dir else Path("artifacts/eval") / stem
    info = {"backend": backend, "model": source, "data": str(data), "split": split,
            "seconds": time.perf_counter() - start}
    metrics = write_report(out, labels, logits, names, info)
    np.save(out / "logits.npy", logits)
    np.save(out / "labels.npy", labels)
    console.print(f"{backend} on {split} ({len(labels)} images): top-1 {metrics['accuracy']:.4f}, top-5 "
                  f"{metrics['top5']:.4f}, macro precision {metrics['precision_macro']:.4f}, recall "
                  f"{metrics['recall_macro']:.4f}, F1 {metrics['f1_macro']:.4f} (macro over the "
                  f"{metrics['macro_classes']:.0f} classes present in the labels or predictions) → {escape(str(out))}")
    return EvalResult(out, metrics, labels, logits)


def _run_data(run_dir: Path | None) -> Path | None:
    try:
        return Path(json.loads((run_dir / "config.json").read_text())["data"]) if run_dir else None
    except (OSError, ValueError, KeyError):
        return None
