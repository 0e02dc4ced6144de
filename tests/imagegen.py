"""Small images in every awkward form the integrity scan must handle, made with Pillow."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pattern(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients (JPEG-friendly) with distinct channels, so a BGR/RGB swap shows."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 128 + 100 * np.sin((x + y + seed) / 7)
    return np.clip(np.dstack([r, g, b]), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()
