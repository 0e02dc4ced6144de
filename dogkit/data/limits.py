"""The input policy: how big a file, an image or an archive dogkit accepts, in one place.

Every limit is checked before the expensive step it protects: a file's size from ``stat`` before it
is read, an image's pixel count and aspect ratio from its header before it is decoded, an archive's
member count, total size and compression ratio before anything is extracted. So memory follows
the limits, not the input: a 1.5 MB PNG that claims 40000×40000 pixels is refused in microseconds.

Defaults suit photographs (a 50-megapixel camera, a 10:1 panorama, the 0.8 GB Stanford Dogs
archive); each can be raised with an environment variable, read when a check runs.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 50_000_000  # width × height; RGB at 50 Mpx is 150 MB decoded
    max_file_bytes: int = 256 * MIB  # one image file, checked before it is read
    max_aspect: float = 50.0  # longer side / shorter side
    max_archive_bytes: int = 64 * GIB  # uncompressed total of one archive
    max_archive_members: int = 1_000_000
    max_archive_ratio: float = 200.0  # uncompressed / compressed; photos barely compress, bombs do ~1000×
    archive_ratio_floor: int = 64 * MIB  # below this total, any ratio is harmless

    @classmethod
    def from_env(cls) -> Limits:
        """The defaults, overridden by DOGKIT_MAX_PIXELS, DOGKIT_MAX_FILE_MB, DOGKIT_MAX_ASPECT,
        DOGKIT_MAX_ARCHIVE_GB, DOGKIT_MAX_ARCHIVE_MEMBERS and DOGKIT_MAX_ARCHIVE_RATIO, each within its range."""
        base = cls()
        values = {}
        for env, (key, scale, low, high) in ENV_RANGES.items():
            text = os.environ.get(env, "").strip()
            if text:
                value = _parsed(env, text, low, high, whole=isinstance(getattr(base, key), int) and scale == 1)
                values[key] = type(getattr(base, key))(value * scale)
        return cls(**{**base.__dict__, **values})


# Each variable's field, unit and allowed range: wide enough for any real dataset, narrow enough that every
# product stays an exact integer and OpenCV can parse the pixel cap (it aborts the process on values it cannot).
ENV_RANGES: dict[str, tuple[str, int, float, float]] = {
    "DOGKIT_MAX_PIXELS": ("max_pixels", 1, 1, 2**40),
    "DOGKIT_MAX_FILE_MB": ("max_file_bytes", MIB, 0.001, 2**20),
    "DOGKIT_MAX_ASPECT": ("max_aspect", 1, 1, 2**40),
    "DOGKIT_MAX_ARCHIVE_GB": ("max_archive_bytes", GIB, 0.001, 2**20),
    "DOGKIT_MAX_ARCHIVE_MEMBERS": ("max_archive_members", 1, 1, 2**32),
    "DOGKIT_MAX_ARCHIVE_RATIO": ("max_archive_ratio", 1, 1, 1e6),
}


def _parsed(env: str, text: str, low: float, high: float, *, whole: bool) -> float:
    """The variable's value, or a one-line error naming it and its range."""
    from ..errors import DogkitError

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (low <= value <= high) or (whole and not value.is_integer()):
        kind = "a whole number" if whole else "a number"
        raise DogkitError(f"{env} must be {kind} from {_number(low)} to {_number(high)}, got {text!r}")
    return value


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def limits() -> Limits:
    return Limits.from_env()


def megabytes(n: float) -> str:
    return f"{n / MIB:.0f} MB" if n >= MIB else f"{n / 1024:.0f} kB"


# ----------------------------------------------------------------------------- image headers


def _png_size(data: bytes) -> tuple[int, int] | None:
    # Signature (8), IHDR length (4), b"IHDR", width, height: big-endian.
    if len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic…); not DHT/JPG/DAC.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment, walking segment by segment."""
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2: i + 4])[0]
        if marker in _SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5: i + 9])
            return width, height
        if marker in (0xDA, 0xD9) or length < 2:  # scan data or the end before any frame header
            return None
        i += 2 + length
    return None


def _gif_size(data: bytes) -> tuple[int, int] | None:
    return struct.unpack("<HH", data[6:10]) if len(data) >= 10 else None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    header = struct.unpack("<I", data[14:18])[0]
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # negative height: top-down rows


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first image file directory."""
    end = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None
    offset = struct.unpack(end + "I", data[4:8])[0]
    if offset + 2 > len(data):
        return None
    count = struct.unpack(end + "H", data[offset: offset + 2])[0]
    found: dict[int, int] = {}
    for k in range(count):
        entry = offset + 2 + 12 * k
        if entry + 12 > len(data):
            break
        tag, kind = struct.unpack(end + "HH", data[entry: entry + 4])
        if tag in (256, 257):
            fmt = "H" if kind == 3 else "I"
            found[tag] = struct.unpack(end + fmt, data[entry + 8: entry + 8 + struct.calcsize(fmt)])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


_PARSERS = {"png": _png_size, "jpeg": _jpeg_size, "gif": _gif_size, "bmp": _bmp_size, "webp": _webp_size,
            "tiff": _tiff_size}


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) as the file's header states it, without decoding; None when it cannot tell."""
    parser = _PARSERS.get(fmt)
    if parser is None:
        return None
    try:
        return parser(data)
    except (struct.error, IndexError):
        return None


# Reject reasons that depend on the limits, not on the file: never reused from a scan cache.
LIMIT_REASONS = ("too many pixels", "extreme aspect ratio", "file too large")


def size_problem(width: int, height: int, policy: Limits | None = None) -> str | None:
    """Why an image of this size is refused (a reason for rejects.csv), or None."""
    policy = policy or limits()
    if width <= 0 or height <= 0:
        return f"invalid image size {width}×{height} in the header"
    if width * height > policy.max_pixels:
        return (f"too many pixels: {width}×{height} = {width * height / 1e6:.0f} Mpx "
                f"(limit {policy.max_pixels / 1e6:g} Mpx; raise it with DOGKIT_MAX_PIXELS)")
    if max(width, height) / min(width, height) > policy.max_aspect:
        return (f"extreme aspect ratio: {width}×{height} (limit {policy.max_aspect:g}:1; raise it with "
                "DOGKIT_MAX_ASPECT)")
    return None


def file_size_problem(size: int, policy: Limits | None = None) -> str | None:
    policy = policy or limits()
    if size > policy.max_file_bytes:
        return (f"file too large: {megabytes(size)} (limit {megabytes(policy.max_file_bytes)}; raise it with "
                "DOGKIT_MAX_FILE_MB)")
    return None


def set_opencv_cap() -> None:
    """OpenCV's own pixel cap (2^30 by default) lowered to dogkit's, as a second line behind the
    header check for formats whose header dogkit does not parse. OpenCV reads the variable once,
    when it is loaded, so this runs before anything imports cv2 (from ``dogkit/__init__.py``).

    OpenCV aborts the whole process (SIGABRT) on a value it cannot parse (``stoull`` out of range, a stray
    suffix), so only plain digits within range are ever left in the variable."""
    try:
        cap = Limits.from_env().max_pixels
    except Exception:  # a malformed variable is reported where the limits are used, not at import
        cap = Limits().max_pixels
    given = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "")
    if not (given.isascii() and given.isdigit() and int(given) <= 2**40):
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(cap)
