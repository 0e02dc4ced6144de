"""Image decoding shared by the integrity scan, the cache, training and ONNX inference.

Every path turns bytes into an RGB uint8 HxWx3 array through ``decode_rgb``, so an image looks the
same to every part of dogkit: grayscale is replicated to three channels, CMYK is converted by
libjpeg, alpha is composited over white, 16-bit is reduced to 8-bit, and EXIF orientation is
ignored (as PIL and torchvision do by default, and as the Stanford Dogs boxes assume).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

# Files that operating systems leave in folders; never images, never worth a reject line.
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})


class ImageError(ValueError):
    """The bytes are not a usable image; ``reason`` is a short phrase for rejects.csv."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def detect_format(head: bytes) -> str | None:
    """The real format from the file's first bytes, whatever its extension claims."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def truncation_reason(data: bytes, fmt: str) -> str | None:
    """libjpeg fills a cut-off JPEG with grey and only warns, so look for the end marker ourselves."""
    if fmt == "jpeg":
        # EOI must follow the last start-of-scan; marker bytes cannot occur inside entropy-coded data.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            return "truncated JPEG (no end-of-image marker)"
    elif fmt == "png":
        if b"IEND" not in data[-64:]:
            return "truncated PNG (no IEND chunk)"
    elif fmt == "gif" and not data.rstrip(b"\x00").endswith(b";"):
        return "truncated GIF (no trailer)"
    return None


def to_rgb(image: np.ndarray) -> np.ndarray:
    """OpenCV's decoded array (gray, BGR, BGRA; 8 or 16 bit) as contiguous RGB uint8."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        rgb = image[:, :, 2::-1].astype(np.float32)
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        return np.ascontiguousarray((rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_rgb(data: bytes, *, check: bool = True) -> np.ndarray:
    """Decode image bytes to RGB uint8 HxWx3; raise ``ImageError`` with a reason when unusable."""
    if not data:
        raise ImageError("empty file")
    fmt = detect_format(data[:16])
    if fmt is None:
        raise ImageError("not an image (unrecognised file format)")
    if check and (reason := truncation_reason(data, fmt)):
        raise ImageError(reason)
    # IMREAD_UNCHANGED keeps alpha and bit depth for to_rgb and ignores EXIF orientation.
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(f"undecodable {fmt.upper()} data")
    return to_rgb(image)


def read_rgb(path: str | os.PathLike, *, check: bool = False) -> np.ndarray:
    """Read and decode a file. Prepared datasets skip the truncation checks (the scan did them);
    files from outside (``dogkit predict``) get them."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"unreadable file ({e.strerror or e})") from e
    return decode_rgb(data, check=check)


def is_candidate(path: Path) -> bool:
    """Files worth decoding: not hidden, not OS litter. The decoder, not the extension, decides."""
    return not path.name.startswith(".") and path.name.lower() not in JUNK_NAMES


def scaled_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after shrinking the shorter side to ``shorter``; images are never enlarged."""
    scale = shorter / min(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
    """Shrink so the shorter side is ``shorter`` (INTER_AREA: the alias-free choice for downscaling)."""
    height, width = image.shape[:2]
    new_w, new_h = scaled_size(width, height, shorter)
    if (new_w, new_h) == (width, height):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
