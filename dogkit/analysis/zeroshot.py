"""The zero-shot baseline: an ImageNet network's own 1000-class head, untrained on the dataset, restricted to the
dataset's classes.

Stanford Dogs' class folders are ImageNet synsets (``n02085620-Chihuahua``: WordNet id ``n02085620``), so the
ImageNet head already names every breed. Restricted to the dataset's synsets (the arg max over those logits
only), it answers the dataset's question with no training at all: what fine-tuning must beat clearly. The
accuracy over all 1000 classes is reported beside it. Stanford Dogs photos are ImageNet photos (some of them
its training images), so the number is optimistic, as every ImageNet-pretrained number on this dataset is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DogkitError
from ..text import shown
from ..training.synsets import head_columns


@dataclass
class ZeroShot:
    arch: str
    size: int
    classes: int  # the dataset's classes (columns of the head it chooses among)
    labels: np.ndarray  # each image's class, 0 … classes − 1
    predictions: np.ndarray  # the restricted head's answer, 0 … classes − 1
    imagenet_correct: np.ndarray  # whether the arg max over all 1000 classes is the right synset
    scores: np.ndarray | None = None  # (images, classes): the head's logits of the dataset's synsets
    weights: str = ""  # where the ImageNet weights came from
    spec: dict = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.labels)

    @property
    def accuracy(self) -> float:
        """Top-1 among the dataset's classes."""
        return float((self.predictions == self.labels).mean())

    @property
    def accuracy_imagenet(self) -> float:
        """Top-1 among all 1000 ImageNet classes."""
        return float(self.imagenet_correct.mean())

    def summary(self) -> dict:
        """What the report shows: the restricted head's metrics (top-5 and macro P/R/F1 as every run's, from
        ``classification_metrics``), its top-1 over all 1000 classes, and where the weights came from."""
        from ..metrics import classification_metrics

        metrics = (classification_metrics(self.labels, self.scores) if self.scores is not None
                   else {"accuracy": self.accuracy})
        return {"arch": self.arch, "size": self.size, "images": self.images, "classes": self.classes,
                "accuracy": self.accuracy, "accuracy_imagenet": self.accuracy_imagenet, "weights": self.weights,
                "test": metrics, "preprocess": self.spec}


def zero_shot(arch: str, images: Sequence[Callable[[], np.ndarray]], labels: Sequence[int],
              folders: Sequence[str], *, size: int = 224, batch: int = 32, weights: str | Path | None = None
              ) -> ZeroShot:
    """``arch``'s ImageNet head on ``images`` (each a function returning the decoded RGB uint8 image, so that
    only a batch is in memory), restricted to ``folders`` (the dataset's class folders, ImageNet synsets;
    ``labels`` index them). Images are prepared as the weights' own config says (``weights_preprocess``) at
    ``size`` px. ``weights``: a state dict file with the ImageNet head, instead of the pretrained weights."""
    import torch

    from ..deploy.preprocess import eval_transform
    from ..training import models
    from ..training.timm_models import fit_state, timm_name

    if len(images) != len(labels) or not len(images):
        raise DogkitError(f"zero-shot needs images and as many labels, got {len(images)} and {len(labels)}")
    columns = head_columns(folders)
    spec = models.weights_preprocess(arch, size)
    net = models.create_network(arch)
    outputs = net.get_submodule(models.head_name(net)).out_features
    if outputs != 1000:
        raise DogkitError(f"{arch}'s head has {outputs} outputs, not ImageNet's 1000")
    if weights is not None:
        state, source = models.load_state_file(Path(weights)), shown(weights)
        if name := timm_name(arch):
            state = fit_state(name, state, net.state_dict(), source)
    else:
        state, source = models.imagenet_backbone(arch, net)
    net.load_state_dict(state)
    model = models.Classifier(net, spec).eval()
    scores, full = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = np.stack([eval_transform(load(), spec) for load in images[start: start + batch]])
            logits = model(torch.from_numpy(x).permute(0, 3, 1, 2)).float().numpy()
            scores.append(logits[:, columns])
            full.append(logits.argmax(1))
    labels_, restricted = np.asarray(labels), np.concatenate(scores)
    return ZeroShot(arch, size, len(folders), labels_, restricted.argmax(1), np.concatenate(full) == columns[labels_],
                    restricted, source, json.loads(spec.to_json()))


def zero_shot_split(arch: str, data: Path, split: str = "test", *, size: int = 224, limit: int | None = None,
                    batch: int = 32) -> ZeroShot:
    """The zero-shot baseline on a split of a prepared dataset (the images as training sees them: its box crop
    and EXIF rule); ``limit``: the first that many images of the split."""
    from ..data.dataset import load_dataset

    dataset = load_dataset(data)
    records = dataset.split(split)[:limit] if limit else dataset.split(split)
    if not records:
        raise DogkitError(f"{shown(data)} has no {split} images")
    loads = [lambda r=r: dataset.load_rgb(r) for r in records]
    return zero_shot(arch, loads, [r.label for r in records], [c.folder for c in dataset.classes], size=size,
                     batch=batch)
