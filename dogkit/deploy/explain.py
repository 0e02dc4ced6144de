"""Where the model looked, with numpy and OpenCV: a class's activation map, laid on the photo it came from.

An explainable dogkit model (``dogkit.explain`` in its metadata) returns a second output, ``cams``: for each image
and class, the last feature map weighted by that class's row of the head (``dogkit.training.cam``), so that the
class's logit is the map's mean plus the head's bias. Here a map is normalised (min-max to 0..1, as Zhou et al.
draw them), stretched over the part of the photo the model saw (the centre square of ``eval_transform``, or the
legacy resize-then-crop window), and drawn as a heat-map overlay with the answer in the corner.
"""

from __future__ import annotations

import cv2
import numpy as np

from .preprocess import PreprocessSpec, center_square

OVERLAY_ALPHA = 0.45  # the heat map's weight over the photo
MAX_SIDE = 640  # longest side of an overlay picture: a 24-megapixel photo is drawn at a size a page can show


def normalise(cam: np.ndarray) -> np.ndarray:
    """A map scaled to 0..1 (its minimum to 0, its maximum to 1); a flat map is all zeros."""
    cam = np.asarray(cam, np.float32)
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)


def seen_region(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """(top, left, rows, columns) of the photo's pixels that became the model's input, in photo pixels."""
    if spec.order == "crop-then-resize":
        top, left, side = center_square(height, width, spec)
        return top, left, side, side
    # the legacy rule: the shorter side resized to ``resize`` (rounded half to even), then the centre size × size
    scale = spec.resize / min(height, width)
    new_w, new_h = max(spec.size, int(round(width * scale))), max(spec.size, int(round(height * scale)))
    sy, sx = new_h / height, new_w / width
    top, left = (new_h - spec.size) // 2, (new_w - spec.size) // 2
    return (int(round(top / sy)), int(round(left / sx)), max(1, int(round(spec.size / sy))),
            max(1, int(round(spec.size / sx))))


def on_photo(cam: np.ndarray, height: int, width: int, spec: PreprocessSpec, scale: float = 1.0) -> np.ndarray:
    """A normalised map at photo resolution (times ``scale``): bilinear over the seen region, NaN outside it
    (the model never saw those pixels, so the map says nothing about them)."""
    top, left, rows, cols = seen_region(height, width, spec)
    h, w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    t, lf = int(round(top * scale)), int(round(left * scale))
    r, c = max(1, min(h - t, int(round(rows * scale)))), max(1, min(w - lf, int(round(cols * scale))))
    out = np.full((h, w), np.nan, np.float32)
    out[t: t + r, lf: lf + c] = cv2.resize(normalise(cam), (c, r), interpolation=cv2.INTER_LINEAR)
    return out


def heat_colours(values: np.ndarray) -> np.ndarray:
    """0..1 → RGB uint8 in OpenCV's JET colour map (blue: nothing, red: the strongest evidence)."""
    grey = np.clip(np.nan_to_num(values) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def caption_text(label: str, prob: float | None) -> str:
    """What the corner says; OpenCV's fonts draw ASCII only, so other characters become '?'."""
    text = label if prob is None else f"{label} {100 * prob:.1f}%"
    return text.encode("ascii", "replace").decode("ascii")


def fitted(rgb: np.ndarray, side: int, enlarge: bool = False) -> np.ndarray:
    """The picture with its longer side at most ``side`` (area-shrunk), or exactly ``side`` with ``enlarge``
    (bilinear), aspect kept: the one rule for every picture of a photo that is drawn."""
    height, width = rgb.shape[:2]
    scale = side / max(height, width)
    if scale == 1.0 or (scale > 1.0 and not enlarge):
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR)


def overlay(rgb: np.ndarray, cam: np.ndarray, spec: PreprocessSpec, caption: str | None = None,
            max_side: int = MAX_SIDE) -> np.ndarray:
    """The photo (shrunk to ``max_side``) with the map over the seen region and ``caption`` in the top-left
    corner, RGB uint8."""
    height, width = rgb.shape[:2]
    picture = fitted(rgb, max_side)
    heat = on_photo(cam, height, width, spec, picture.shape[0] / height)
    seen = ~np.isnan(heat)
    out = picture.astype(np.float32)
    out[seen] = (1 - OVERLAY_ALPHA) * out[seen] + OVERLAY_ALPHA * heat_colours(heat)[seen]
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if caption:
        font, size = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, min(out.shape[:2]) / 500)
        thick = max(1, round(size * 2))
        (tw, th), base = cv2.getTextSize(caption, font, size, thick)
        room = out.shape[1] - 8
        if tw > room:  # a long breed on a small photo: a smaller font, then the end cut off
            size, thick = max(0.3, size * room / tw), 1
            while len(caption) > 4 and cv2.getTextSize(caption, font, size, thick)[0][0] > room:
                caption = caption[:-4] + "..."
            (tw, th), base = cv2.getTextSize(caption, font, size, thick)
        pad = max(2, th // 3)
        cv2.rectangle(out, (0, 0), (min(out.shape[1] - 1, tw + 2 * pad), th + base + 2 * pad), (0, 0, 0), cv2.FILLED)
        cv2.putText(out, caption, (pad, th + pad), font, size, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def _png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise ValueError("OpenCV could not encode the picture as PNG")
    return data.tobytes()


def png_bytes(rgb: np.ndarray) -> bytes:
    return _png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def map_png(cam: np.ndarray) -> bytes:
    """The normalised map alone, at its own resolution, as an 8-bit grey PNG (a page stretches it over the
    seen region; ``image-rendering`` decides how smooth)."""
    return _png(np.clip(normalise(cam) * 255.0 + 0.5, 0, 255).astype(np.uint8))
