"""Training and evaluation transforms side by side, both built from the preprocessing spec: the random crop
and augmentations of training, and the deterministic crop-then-resize every consumer of the model uses."""

from __future__ import annotations

import albumentations as A
import numpy as np

from ..deploy.preprocess import INTERPOLATIONS, PreprocessSpec, eval_transform
from ..errors import DogkitError


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


def make_transform(spec: PreprocessSpec, augment: str | None = None) -> AugmentFn | EvalFn:
    """The one factory: ``augment`` ("light" or "strong") gives training's random pipeline, None the evaluation
    transform. Both take an RGB uint8 image and return the spec's size × size uint8 image."""
    return AugmentFn(train_augment(spec, augment)) if augment else EvalFn(spec)
