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


def png_of_zeros(width: int, height: int) -> bytes:
    """A real, valid grayscale PNG of any size, made without holding its pixels: 40000×40000 is 1.5 MB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    rows_per_step = max(1, (16 << 20) // len(row))
    parts = []
    for start in range(0, height, rows_per_step):
        parts.append(comp.compress(row * min(rows_per_step, height - start)))
    parts.append(comp.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def exif_jpeg(rgb: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """``rgb`` encoded (stored as is) with an EXIF Orientation tag, as a phone or camera writes it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(rgb).save(buf, fmt, exif=exif.tobytes(), **kwargs)
    return buf.getvalue()
