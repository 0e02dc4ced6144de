"""Linear probe: how much a network's frozen features know about a prepared dataset's classes.

Each network's penultimate features (the head removed) on the dataset's train, val and test images go to a
multinomial logistic regression (scikit-learn), fitted on train with its strength chosen on val; the table
gives val and test top-1 and macro recall. Comparing a pretrained backbone with a randomly initialised
one and with a network trained on the dataset itself tells whether pretraining taught anything that
transfers, independently of any fine-tuning recipe. ``--crop boxes`` probes the dogs' box crops instead
of the whole photos (the domain gap between crop-pretraining and full-frame fine-tuning).

    python scripts/probe_features.py --data artifacts/data/dogs51 \\
        --model random --model pretrain=artifacts/runs/dogs51-cpu/study-cpu-pretrain \\
        --model scratch=artifacts/runs/dogs51-cpu/study-cpu-exp3 --crop none --crop boxes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, recall_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from dogkit.data.dataset import load_dataset
from dogkit.deploy.preprocess import PreprocessSpec
from dogkit.training.checkpoint import load_best
from dogkit.training.evaluation import predict_logits
from dogkit.training.loaders import ManifestImages, make_loader
from dogkit.training.models import build_model, head_name
from dogkit.training.transforms import make_transform

STRENGTHS = (0.003, 0.03, 0.3)  # inverse L2 strength C on standardised features, chosen on val


def feature_net(source: str, num_classes: int, reference_spec: PreprocessSpec | None, seed: int):
    """(network returning features, its preprocessing spec) for a run folder or 'random'."""
    if source == "random":
        if reference_spec is None:
            raise SystemExit("--model random needs at least one run folder too (its preprocessing is used)")
        torch.manual_seed(seed)
        model = build_model("resnet50", num_classes, spec=reference_spec)
        spec = reference_spec
    else:
        model, ckpt, _ = load_best(Path(source))
        spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    parent_name, _, attr = head_name(model.net).rpartition(".")
    setattr(model.net.get_submodule(parent_name) if parent_name else model.net, attr, nn.Identity())
    return model.eval(), spec


def features(model, dataset, records, spec: PreprocessSpec, crop: str, batch_size: int) -> np.ndarray:
    images = ManifestImages(dataset, records, make_transform(spec), crop)
    loader = make_loader(images, batch_size, shuffle=False, workers=0)
    out, _ = predict_logits(model, loader, torch.device("cpu"), None, channels_last=True)
    return out.numpy()


def probe(train, val, test):
    """Fit on train for each strength, keep the best on val; (C, val metrics, test metrics)."""
    scaler = StandardScaler().fit(train[0])
    fits = []
    for c in STRENGTHS:
        clf = LogisticRegression(C=c, max_iter=300).fit(scaler.transform(train[0]), train[1])
        pred = clf.predict(scaler.transform(val[0]))
        fits.append((accuracy_score(val[1], pred), c, clf))
    _, c, clf = max(fits, key=lambda f: f[0])

    def scores(split):
        pred = clf.predict(scaler.transform(split[0]))
        return {"top1": accuracy_score(split[1], pred), "recall": recall_score(split[1], pred, average="macro")}

    return c, scores(val), scores(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    parser.add_argument("--model", action="append", required=True,
                        help="NAME=RUN_FOLDER (its best.pt) or 'random' (a freshly initialised ResNet50)")
    parser.add_argument("--crop", action="append", choices=("none", "boxes"), help="default: none")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the table as JSON here too")
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    splits = {s: dataset.split(s) for s in ("train", "val", "test")}
    labels = {s: np.array([r.label for r in recs]) for s, recs in splits.items()}
    named = [m.split("=", 1) if "=" in m else [m, m] for m in args.model]
    reference = None
    for _, source in named:
        if source != "random":
            reference = PreprocessSpec.from_dict(torch.load(Path(source) / "best.pt", map_location="cpu",
                                                            weights_only=True)["preprocess"])
            break
    rows = []
    for crop in args.crop or ["none"]:
        for name, source in named:
            t0 = time.perf_counter()
            model, spec = feature_net(source, len(dataset.classes), reference, args.seed)
            feats = {s: features(model, dataset, recs, spec, crop, args.batch_size) for s, recs in splits.items()}
            c, val, test = probe(*((feats[s], labels[s]) for s in ("train", "val", "test")))
            row = {"model": name, "source": source, "crop": crop, "C": c, "val": val, "test": test,
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{name:>12} crop={crop:<5} C={c:<6} val top-1 {100 * val['top1']:5.1f} recall "
                  f"{100 * val['recall']:5.1f} | test top-1 {100 * test['top1']:5.1f} recall "
                  f"{100 * test['recall']:5.1f}  ({row['seconds']} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
