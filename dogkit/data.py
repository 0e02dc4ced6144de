"""Training and evaluation data: manifest rows → uint8 RGB tensors, augmented with albumentations.

Loaders ship uint8 HWC batches; the training step moves them to the device, views them as NCHW
(channels_last memory for free) and the model normalises them — normalising per image in numpy
would cost most of a loader's throughput.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader

from .cache import ImageCache, cache_dir
from .dataset import Dataset, Record
from .errors import DogkitError
from .preprocess import INTERPOLATIONS, PreprocessSpec, eval_transform
from .scan import available_cpus


def train_augment(spec: PreprocessSpec, strength: str) -> A.Compose:
    """Light: random-resized crop + flip (fine-tuning). Strong: + colour jitter, two RandAugment-style
    operations per image and random erasing, for training from scratch.

    The random crop is resized by the spec's own rules, as ``EvalFn`` does: the shrinking interpolation
    (INTER_AREA) when the crop is larger than the output in either direction, the enlarging one otherwise.
    """
    size = (spec.size, spec.size)
    if spec.interpolation not in ("area", spec.interpolation_up):
        raise DogkitError(f"training resizes with INTER_AREA or one interpolation for both directions; "
                          f"the spec asks for {spec.interpolation} (shrinking) and {spec.interpolation_up}")
    resize = {"interpolation": INTERPOLATIONS[spec.interpolation_up],
              "area_for_downscale": "image" if spec.interpolation == "area" else None}
    if strength == "light":
        ops = [A.RandomResizedCrop(size=size, scale=(0.25, 1.0), **resize), A.HorizontalFlip()]
    else:
        ops = [
            A.RandomResizedCrop(size=size, scale=(0.08, 1.0), **resize),
            A.HorizontalFlip(),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05, p=0.8),
            A.SomeOf(
                [
                    A.Affine(rotate=(-30, 30), p=1.0),
                    A.Affine(shear=(-15, 15), p=1.0),
                    A.Affine(translate_percent=(-0.2, 0.2), p=1.0),
                    A.Equalize(p=1.0),
                    A.Posterize(num_bits=(4, 6), p=1.0),
                    A.Solarize(threshold_range=(0.5, 1.0), p=1.0),
                    A.Sharpen(p=1.0),
                    A.RandomBrightnessContrast(p=1.0),
                    A.ToGray(p=1.0),
                ],
                n=2,
            ),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.1, 0.4), hole_width_range=(0.1, 0.4),
                            fill="random_uniform", p=0.25),
        ]
    return A.Compose(ops)


class ManifestImages(torch.utils.data.Dataset):
    """Images of one split as (uint8 HWC tensor, label). Training reads the prepare cache when current."""

    def __init__(self, dataset: Dataset, records: list[Record], transform: Callable[[np.ndarray], np.ndarray],
                 crop: str, cache: ImageCache | None = None):
        self.dataset = dataset
        self.records = records
        self.transform = transform
        self.crop = crop
        self.cache = cache
        self.rows = {r.path: i for i, r in enumerate(dataset.records)} if cache is not None else {}

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> np.ndarray:
        rec = self.records[i]
        if self.cache is not None:
            return np.array(self.cache[self.rows[rec.path]])  # copy: augmentations may write in place
        return self.dataset.load_rgb(rec, self.crop)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.transform(self.image(i))), self.records[i].label


def find_cache(dataset: Dataset, crop: str, min_size: int) -> ImageCache | None:
    """The smallest current cache whose images are at least ``min_size`` on their shorter side."""
    sizes = []
    for path in (dataset.root / "cache").glob(f"*px-{crop}"):
        try:
            size = int(path.name.split("px-")[0])
        except ValueError:
            continue
        if size >= min_size and path == cache_dir(dataset, size, crop):
            sizes.append(size)
    for size in sorted(sizes):
        try:
            return ImageCache(dataset, size, crop)
        except (DogkitError, OSError, ValueError):  # stale or unreadable: fall back to decoding
            continue
    return None


def _seed_worker(worker_id: int) -> None:
    # Each worker's numpy / random / albumentations streams follow from torch's per-worker seed,
    # which the loader derives from its generator: the same epoch seed gives the same augmentations.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    transform = getattr(torch.utils.data.get_worker_info().dataset, "transform", None)
    if isinstance(transform, AugmentFn):
        transform.set_random_seed(seed)


class AugmentFn:
    """Picklable wrapper so an albumentations pipeline can cross into worker processes."""

    def __init__(self, compose: A.Compose):
        self.compose = compose

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.compose(image=image)["image"]

    def set_random_seed(self, seed: int) -> None:
        self.compose.set_random_seed(seed)


class EvalFn:
    """The evaluation transform of the spec (``preprocess.eval_transform``), picklable for loader workers."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return eval_transform(image, self.spec)


def make_loader(images: ManifestImages, batch_size: int, *, shuffle: bool, workers: int | None, seed: int = 0,
                epoch: int = 0, pin_memory: bool = False, drop_last: bool = False, sampler=None) -> DataLoader:
    """A loader whose order and augmentations depend only on (seed, epoch), so resume is exact."""
    workers = min(available_cpus(), 8) if workers is None else workers
    epoch_seed = seed * 100_003 + epoch
    generator = torch.Generator().manual_seed(epoch_seed)
    if workers == 0 and isinstance(images.transform, AugmentFn):
        images.transform.set_random_seed(epoch_seed)
    return DataLoader(
        images, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers, generator=generator,
        worker_init_fn=_seed_worker if workers else None, pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
