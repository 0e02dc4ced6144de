"""The one preprocessing spec: how a decoded RGB image becomes the model's input.

Training's eval transform, evaluation, and the ONNX runtime all call ``eval_transform`` with the
spec stored in the run (and, after export, in the ONNX file's metadata). The spec stops at uint8
RGB pixels: mean/std normalisation is the first layer of the model itself, so deployment feeds
uint8 and nobody re-implements normalisation. Numpy and OpenCV only: no torch here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 224  # square input the network sees
    resize: int = 256  # shorter side before the centre crop (224/256 = the usual 0.875 crop)
    interpolation: str = "area"  # OpenCV INTER_AREA: alias-free shrinking, like torchvision's antialias=True
    crop: str = "center"
    box_crop: str = "none"  # "boxes": the image is first cropped to the dog's box (needs annotations)
    channel_order: str = "RGB"
    input_dtype: str = "uint8"  # the model takes uint8 RGB, NCHW; normalisation happens inside it
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least size ({self.size})")

    @classmethod
    def for_size(cls, size: int, **kwargs) -> PreprocessSpec:
        return cls(size=size, resize=int(round(size / 0.875)), **kwargs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        return cls.from_dict(json.loads(text))


def eval_transform(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """RGB uint8 HxWx3 (any size) → RGB uint8 size x size x 3: shorter side to ``resize``, centre crop."""
    height, width = image.shape[:2]
    scale = spec.resize / min(height, width)
    new_w, new_h = max(spec.size, int(round(width * scale))), max(spec.size, int(round(height * scale)))
    if (new_w, new_h) != (width, height):
        # INTER_AREA only makes sense for shrinking; enlarging uses linear whatever the spec says.
        interp = INTERPOLATIONS[spec.interpolation] if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (new_w, new_h), interpolation=interp)
    top, left = (new_h - spec.size) // 2, (new_w - spec.size) // 2
    return np.ascontiguousarray(image[top: top + spec.size, left: left + spec.size])

