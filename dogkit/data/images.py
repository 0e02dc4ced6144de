"""Image decoding shared by the integrity scan, the cache, training and ONNX inference.

Every path turns bytes into an RGB uint8 HxWx3 array through ``decode_rgb``, so an image looks the
same to every part of dogkit: grayscale is replicated to three channels, CMYK is converted by
libjpeg, alpha is composited over white and 16-bit is reduced to 8-bit (its high byte). The EXIF
orientation tag is read by ``exif_orientation`` and applied by ``orient`` where the preprocessing spec
says so (``exif_orientation: apply``, every dataset and model made by this version): the photo as its
owner sees it. Boxes are in the stored pixels' frame, so a box is cut out before the turn.

Before anything is decoded the input policy (``dogkit.data.limits``) is applied: a file's size from
``fstat`` before it is read, the pixel count and aspect ratio from the image header.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import cv2  # dogkit/__init__.py has set OpenCV's own pixel cap before this first import
import numpy as np

from .limits import Limits, file_size_problem, header_size, limits, size_problem

# Files that operating systems leave in folders; never images, never worth a reject line.
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})


class ImageError(ValueError):
    """The bytes are not a usable image; ``reason`` is a short phrase for rejects.csv. With a
    ``path``, the message names the file."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.reason = reason
        self.path = path


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


ORIENTATION_TAG = 0x0112


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation entry of a TIFF structure's first IFD (EXIF's own layout), 1 when there is none."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or struct.unpack(order + "H", tiff[2:4])[0] != 42:
        return 1
    ifd = struct.unpack(order + "I", tiff[4:8])[0]
    (entries,) = struct.unpack(order + "H", tiff[ifd: ifd + 2])
    for k in range(min(entries, 1024)):
        tag, kind, _count = struct.unpack(order + "HHI", tiff[ifd + 2 + 12 * k: ifd + 10 + 12 * k])
        if tag == ORIENTATION_TAG and kind == 3:  # SHORT, stored in the entry's value field
            value = struct.unpack(order + "H", tiff[ifd + 10 + 12 * k: ifd + 12 + 12 * k])[0]
            return value if 1 <= value <= 8 else 1
    return 1


def _exif_block(data: bytes, fmt: str | None) -> bytes | None:
    """The EXIF (TIFF-structured) bytes of a JPEG APP1 segment, a PNG eXIf chunk or a WebP EXIF chunk."""
    if fmt == "jpeg":
        i = 2
        while i + 4 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xDA:  # start of scan: the metadata segments are all before it
                return None
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            (length,) = struct.unpack(">H", data[i + 2: i + 4])
            segment = data[i + 4: i + 2 + length]
            if marker == 0xE1 and segment.startswith(b"Exif\0\0"):
                return segment[6:]
            i += 2 + length
    elif fmt == "png":
        i = 8
        while i + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[i: i + 8])
            if kind == b"eXIf":
                return data[i + 8: i + 8 + length]
            if kind == b"IEND":
                return None
            i += 12 + length
    elif fmt == "webp":
        i = 12
        while i + 8 <= len(data):
            kind, length = struct.unpack("<4sI", data[i: i + 8])
            if kind == b"EXIF":
                block = data[i + 8: i + 8 + length]
                return block[6:] if block.startswith(b"Exif\0\0") else block
            i += 8 + length + (length & 1)
    # TIFF: OpenCV (libtiff) turns TIFF images upright while decoding them, so there is nothing left to apply.
    return None


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation (1–8) still to apply to decoded JPEG, PNG or WebP bytes: 1 (as stored) when absent or
    unreadable, and for TIFF, which the decoder has turned already."""
    try:
        block = _exif_block(data, detect_format(data[:16]))
        return _tiff_orientation(block) if block else 1
    except (struct.error, IndexError):
        return 1  # a damaged EXIF block: the pixels as stored


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels → the image as the EXIF Orientation says it is shown (as PIL's ``exif_transpose``)."""
    turned = {1: image, 2: image[:, ::-1], 3: image[::-1, ::-1], 4: image[::-1],
              5: image.swapaxes(0, 1), 6: image.swapaxes(0, 1)[:, ::-1],
              7: image[::-1, ::-1].swapaxes(0, 1), 8: image.swapaxes(0, 1)[::-1]}.get(orientation, image)
    return turned if turned is image else np.ascontiguousarray(turned)


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(width, height) once ``orient`` has turned the image: swapped by the four orientations that turn it 90°."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """OpenCV's decoded array (gray, BGR, BGRA; 8 or 16 bit) as contiguous RGB uint8."""
    if image.dtype == np.uint16:
        np.right_shift(image, 8, out=image)  # in place: no second 16-bit copy of a large image
        image = image.astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        # Composited in bands of rows, so the float temporaries stay small whatever the image size.
        out = np.empty(image.shape[:2] + (3,), np.uint8)
        step = max(1, (1 << 20) // max(1, image.shape[1]))
        for top in range(0, image.shape[0], step):
            band = image[top: top + step]
            rgb = band[:, :, 2::-1].astype(np.float32)
            alpha = band[:, :, 3:4].astype(np.float32) / 255.0
            out[top: top + step] = (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
        return out
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_rgb(data: bytes, *, check: bool = True, policy: Limits | None = None,
               orientation: bool = False) -> np.ndarray:
    """Decode image bytes to RGB uint8 HxWx3; raise ``ImageError`` with a reason when unusable. With
    ``orientation``, turned as its EXIF Orientation says (else the pixels as stored).

    The header's width and height are checked against the pixel and aspect-ratio limits first, so
    a small file that claims a huge image is refused without allocating it."""
    if not data:
        raise ImageError("empty file")
    fmt = detect_format(data[:16])
    if fmt is None:
        raise ImageError("not an image (unrecognised file format)")
    size = header_size(data, fmt)
    if size is not None and (reason := size_problem(*size, policy)):
        raise ImageError(reason)
    if check and (reason := truncation_reason(data, fmt)):
        raise ImageError(reason)
    # IMREAD_UNCHANGED keeps alpha and bit depth for to_rgb and ignores EXIF orientation.
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # OpenCV's own limits (pixel cap, corrupt headers) raise instead of returning None
        raise ImageError(f"undecodable {fmt.upper()} data ({_cv_reason(e)})") from e
    if image is None or image.size == 0:
        raise ImageError(f"undecodable {fmt.upper()} data")
    if size is None and (reason := size_problem(image.shape[1], image.shape[0], policy)):
        raise ImageError(reason)  # formats whose header we do not parse are checked once decoded
    rgb = to_rgb(image)
    return orient(rgb, exif_orientation(data)) if orientation else rgb


def _cv_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def read_file(path: str | os.PathLike, policy: Limits | None = None) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes and stat, or ``ImageError``: the size is checked before reading, and
    FIFOs, devices and folders are refused without blocking on them."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then says what it is.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if Path(path).is_symlink() and not Path(path).exists():
            raise ImageError(f"broken symbolic link ({e.strerror or e})") from e
        raise ImageError(f"unreadable file ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"not a regular file ({_kind(st.st_mode)})")
        if reason := file_size_problem(st.st_size, policy):
            raise ImageError(reason)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(st.st_size + 1)
    except OSError as e:
        raise ImageError(f"unreadable file ({e.strerror or e})") from e
    finally:
        os.close(fd)
    if reason := file_size_problem(len(data), policy):  # grew after the stat
        raise ImageError(reason)
    return data, st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "special file"


def read_image(path: str | os.PathLike, *, check: bool = False) -> tuple[np.ndarray, int]:
    """A file's pixels as stored (RGB uint8) and its EXIF Orientation. Prepared datasets skip the truncation
    checks (the scan did them); files from outside (``dogkit predict``) get them. The error names the file, so
    a dataset image that went bad after ``prepare`` is named wherever it surfaces (a DataLoader worker too)."""
    policy = limits()
    try:
        data, _ = read_file(path, policy)
        return decode_rgb(data, check=check, policy=policy), exif_orientation(data)
    except ImageError as e:
        raise ImageError(e.reason, path) from None


def read_rgb(path: str | os.PathLike, *, check: bool = False, orientation: bool = False) -> np.ndarray:
    """Read and decode a file; with ``orientation``, turned upright as its EXIF Orientation says."""
    image, tag = read_image(path, check=check)
    return orient(image, tag) if orientation else image


def rgb_from_bytes(data: bytes, *, check: bool = True, orientation: bool = False) -> np.ndarray:
    """``read_rgb`` for bytes that never were a file (an HTTP upload): the same size limit, then the
    same header checks and decoding, so an upload and a file with the same bytes decode alike."""
    policy = limits()
    if reason := file_size_problem(len(data), policy):
        raise ImageError(reason)
    return decode_rgb(data, check=check, policy=policy, orientation=orientation)


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
