"""The memory budget of decoding: what an image will cost before it is decoded, and how much may be in flight.

Decoding is where an input's size becomes memory: a 5 MB PNG can hold 50 megapixels, 400 MB once
decoded, converted and turned upright. So what runs at once is bounded by the decoded bytes in
flight, not by the number of threads: each image is costed from its header (``decode_cost``) before it
is decoded, and starts only when its cost fits the budget. Small images go on while a big one waits
for room; an image larger than the whole budget runs alone. Thread pools (``prepare``'s scan,
``predict``, ``eval``, ``bench``) hold a ``Budget``; ``dogkit serve`` holds an ``AsyncBudget`` on its event
loop, so a request waits for room without holding a decode thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections.abc import Iterator

from ..errors import DogkitError
from .images import detect_format
from .limits import MIB, header_size, limits

# Peak bytes per pixel while one image is decoded and preprocessed: 3 for the decoded BGR (4 with alpha), 3 for
# its RGB conversion or upright turn; 16-bit files cost more but are bounded by the file size limit first.
BYTES_PER_PIXEL = 8
HEAD_BYTES = 256 * 1024  # enough for the header of every format dogkit reads, past large EXIF blocks
DEFAULT_BUDGET_MB = 512  # one image at the pixel limit (50 Mpx ≈ 400 MB) and small ones beside it


def budget_bytes(megabytes: float | None = None) -> int:
    """The decode budget: ``megabytes``, else DOGKIT_DECODE_MB, else 512 MB."""
    if megabytes is None:
        text = os.environ.get("DOGKIT_DECODE_MB", "").strip()
        try:
            megabytes = float(text) if text else DEFAULT_BUDGET_MB
        except ValueError:
            megabytes = float("nan")
        if not 1 <= megabytes <= 2**30:
            raise DogkitError(f"DOGKIT_DECODE_MB must be a number of megabytes from 1 to 2^30, got {text!r}")
    elif not 1 <= megabytes <= 2**30:
        raise DogkitError(f"the decode budget must be from 1 to 2^30 MB, got {megabytes!r}")
    return int(megabytes * MIB)


# A PNG's colour type → the channels OpenCV decodes it to (a palette or grey with alpha may come out as BGRA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}


def png_pixel_cost(head: bytes, pixels: int) -> int | None:
    """What decoding a PNG takes, from its header's bit depth and colour type (measured with tracemalloc on
    ``decode_rgb``): the decoded array, its 8-bit copy when 16-bit, the RGB result and an upright turn, and for
    alpha the compositing bands. None when the header does not say."""
    if len(head) < 26 or head[12:16] != b"IHDR" or head[25] not in _PNG_CHANNELS:
        return None
    channels, sample = _PNG_CHANNELS[head[25]], 2 if head[24] == 16 else 1
    per_pixel = channels * sample + (channels if sample == 2 else 0) + 3 + 3
    return pixels * per_pixel + (min(pixels, 2**20) * 44 if channels == 4 else 0)


def decode_cost(head: bytes) -> int:
    """The memory decoding an image with this start will take at its peak; the pixel limit's worth when its
    header does not say (the decoder refuses anything larger). A PNG is costed from its bit depth and channels
    (a 16-bit RGBA one takes twice what ``BYTES_PER_PIXEL`` says)."""
    fmt = detect_format(head[:16])
    size = header_size(head, fmt) if fmt else None
    most = limits().max_pixels
    pixels = min(size[0] * size[1] if size and size[0] > 0 and size[1] > 0 else most, most)
    cost = png_pixel_cost(head, pixels) if fmt == "png" and size else None
    return max(cost or 0, pixels * BYTES_PER_PIXEL)


def file_cost(path: str | os.PathLike) -> int:
    """What reading and decoding a file will hold: its bytes and ``decode_cost``. 0 for anything that is not a
    readable regular file: the loader then says why, at no cost."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return 0
        return st.st_size + decode_cost(os.pread(fd, HEAD_BYTES, 0))
    except OSError:
        return 0
    finally:
        os.close(fd)


class Budget:
    """Bytes in flight across threads: ``held(n)`` waits until ``n`` fits (or nothing else holds any)."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def held(self, n: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


class AsyncBudget:
    """``Budget`` for one event loop. Waiters are served in order, but one that fits goes ahead of a bigger one
    that does not: small images keep flowing while a big one waits for room."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def try_take(self, n: int) -> bool:
        """Take ``n`` now if it fits (ahead of waiters that do not); never waits."""
        if not self._fits(n):
            return False
        self._take(n)
        return True

    async def take(self, n: int) -> None:
        if self.try_take(n):
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((n, future))
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.give(n)  # granted as it was cancelled: hand it on
            else:
                self._waiters.remove((n, future))
            raise

    def give(self, n: int) -> None:
        self.used -= n
        for waiter in list(self._waiters):
            size, future = waiter
            if self._fits(size):
                self._waiters.remove(waiter)
                self._take(size)
                future.set_result(None)

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    @property
    def waiting(self) -> int:
        return len(self._waiters)
