"""The one preprocessing spec: how a decoded RGB image becomes the model's input.

Training's transforms (``dogkit.training.transforms.make_transform``), evaluation and the ONNX runtime
are all built from the spec stored in the run (and, after export, in the ONNX file's metadata as
``dogkit.preprocess``). The spec stops at uint8 RGB pixels: mean/std normalisation is the first layer
of the model itself, so deployment feeds uint8 and nobody re-implements normalisation.

Every rule a consumer in another language needs is a field of the spec (README, "Preprocessing
spec"). The evaluation transform (``order = "crop-then-resize"``), in integers:

1. Decode to 8-bit RGB (``decode`` names the rules: alpha over white, 16-bit's high byte, grey
   replicated) and, with ``exif_orientation = "apply"``, turn it as its EXIF Orientation tag says (the
   photo as its owner sees it); ``"ignore"`` (models made before) keeps the pixels as stored.
2. ``side = max(1, (2·min(H, W)·size + resize) // (2·resize))``: the centre square that becomes
   the output, ``min(H, W)·size/resize`` rounded half up.
3. ``top = (H − side) // 2``, ``left = (W − side) // 2`` (floor): crop rows top..top+side−1,
   columns left..left+side−1.
4. Resize the crop to size × size: OpenCV INTER_AREA when ``side > size`` (shrinking: each output
   pixel is the area-weighted mean of the input pixels it covers, alias-free like torchvision's
   ``antialias=True``); when ``side < size``, ``interpolation_up``: INTER_LINEAR (half-pixel centres) for
   weights made with bilinear resizing, INTER_CUBIC (a = −0.75, half-pixel centres, saturated to 0–255) for
   weights made with bicubic resizing (timm's EfficientNets); nothing when equal.

Cropping first keeps memory proportional to the output: a 1 × 1,000,000 image is a 1-pixel crop,
not a 256 × 256,000,000 intermediate. Specs saved before these fields existed read as
``order = "resize-then-crop"``, the transform they were trained and exported with.
Numpy and OpenCV only: no torch here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
ORDERS = ("crop-then-resize", "resize-then-crop")
# Bounds on the sizes a spec may name: a model's metadata is input from outside, and ``size`` sets the memory of
# every batch (batch × size² × 3 bytes) before ONNX Runtime has looked at the graph.
MAX_SIZE = 1024
MAX_RESIZE = 4 * MAX_SIZE

# How every dogkit reader turns a file into 8-bit RGB (dogkit.data.images.to_rgb); in the spec so that a consumer
# needs nothing but the metadata.
DECODE = ("8-bit RGB; grey replicated to three channels; alpha composited over white: round(rgb·a + 255·(1 − a)) "
          "with a = alpha/255; 16-bit channels keep their high byte (value >> 8); CMYK JPEG converted by libjpeg")

# What a spec without the fields below meant: the transform of every checkpoint and ONNX file saved before them.
LEGACY = {"order": "resize-then-crop", "interpolation_up": "linear", "exif_orientation": "ignore",
          "side_rounding": "half-even", "offset_rounding": "floor", "layout": "NHWC"}


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 224  # square input the network sees
    resize: int = 256  # the shorter side the crop is taken at (224/256 = the usual 0.875 crop)
    interpolation: str = "area"  # when shrinking: OpenCV INTER_AREA, alias-free like torchvision's antialias=True
    interpolation_up: str = "linear"  # when enlarging: OpenCV INTER_LINEAR (half-pixel centres)
    order: str = "crop-then-resize"  # crop the centre square in source pixels, then resize it (see module doc)
    side_rounding: str = "half-up"  # side = max(1, (2·min(H, W)·size + resize) // (2·resize))
    offset_rounding: str = "floor"  # top = (H − side) // 2, left = (W − side) // 2
    crop: str = "center"
    box_crop: str = "none"  # "boxes": trained on the dog's box; give the model a box crop, not the whole photo
    exif_orientation: str = "apply"  # turned as the EXIF Orientation tag says; "ignore": the pixels as stored
    channel_order: str = "RGB"
    layout: str = "NHWC"  # batch × size × size × 3, as the exported model takes it
    input_dtype: str = "uint8"  # normalisation happens inside the model
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    decode: str = DECODE  # the decoding rules, in words; every spec states them

    @property
    def orients(self) -> bool:
        return self.exif_orientation == "apply"

    def __post_init__(self):
        for key, top in (("size", MAX_SIZE), ("resize", MAX_RESIZE)):
            value = getattr(self, key)
            if type(value) is not int or not 1 <= value <= top:  # bool and float are refused too
                raise ValueError(f"{key} must be a whole number from 1 to {top}, got {value!r}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != 3 or not all(type(v) in (int, float) and np.isfinite(v) for v in values) or (
                    key == "std" and min(values) <= 0):
                raise ValueError(f"{key} must be three finite numbers{' above 0' if key == 'std' else ''}, "
                                 f"got {list(values)!r}")
        for key in ("interpolation", "interpolation_up", "order", "exif_orientation", "box_crop"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")
        for key in ("interpolation", "interpolation_up"):
            if getattr(self, key) not in INTERPOLATIONS:
                raise ValueError(f"{key} must be one of {', '.join(INTERPOLATIONS)}, got {getattr(self, key)!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        expected = {"side_rounding": "half-up" if self.order == "crop-then-resize" else "half-even",
                    "offset_rounding": "floor", "channel_order": "RGB", "layout": "NHWC", "input_dtype": "uint8",
                    "crop": "center", "decode": DECODE}
        if self.exif_orientation not in ("apply", "ignore"):
            raise ValueError(f"exif_orientation must be 'apply' or 'ignore', got {self.exif_orientation!r}")
        for key, value in expected.items():
            if getattr(self, key) != value:  # a rule this code does not implement: refuse rather than guess
                raise ValueError(f"{key} must be {value!r} with order {self.order!r}, got {getattr(self, key)!r}")
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least size ({self.size})")

    @classmethod
    def for_size(cls, size: int, **kwargs) -> PreprocessSpec:
        return cls(size=size, resize=int(round(size / 0.875)), **kwargs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        """A saved spec; one from before ``order`` existed gets the legacy rules it was made with."""
        data = dict(data)
        if "order" not in data:
            data = {**LEGACY, **data}
        for key in ("mean", "std"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        return cls.from_dict(json.loads(text))


def center_square(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int, int]:
    """(top, left, side) of the centre square that eval_transform resizes to size × size, in source pixels."""
    side = max(1, (2 * min(height, width) * spec.size + spec.resize) // (2 * spec.resize))
    return (height - side) // 2, (width - side) // 2, side


def resize_interpolation(src_h: int, src_w: int, dst_h: int, dst_w: int, spec: PreprocessSpec) -> int:
    """The OpenCV flag for one resize: the shrinking rule when either side shrinks, else the enlarging one."""
    shrinking = src_h > dst_h or src_w > dst_w
    return INTERPOLATIONS[spec.interpolation if shrinking else spec.interpolation_up]


def eval_transform(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """RGB uint8 HxWx3 (any size) → RGB uint8 size x size x 3: the centre crop at ``resize``, by the spec's rules."""
    height, width = image.shape[:2]
    if spec.order == "resize-then-crop":
        return _resize_then_crop(image, spec)
    top, left, side = center_square(height, width, spec)
    crop = image[top: top + side, left: left + side]
    if side == spec.size:
        return np.ascontiguousarray(crop)
    interp = resize_interpolation(side, side, spec.size, spec.size, spec)
    return cv2.resize(np.ascontiguousarray(crop), (spec.size, spec.size), interpolation=interp)


def _resize_then_crop(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The legacy transform: the shorter side to ``resize`` (Python's round, half to even), then the centre crop."""
    height, width = image.shape[:2]
    scale = spec.resize / min(height, width)
    new_w, new_h = max(spec.size, int(round(width * scale))), max(spec.size, int(round(height * scale)))
    if (new_w, new_h) != (width, height):
        interp = INTERPOLATIONS[spec.interpolation] if scale < 1 else INTERPOLATIONS[spec.interpolation_up]
        image = cv2.resize(image, (new_w, new_h), interpolation=interp)
    top, left = (new_h - spec.size) // 2, (new_w - spec.size) // 2
    return np.ascontiguousarray(image[top: top + spec.size, left: left + spec.size])
