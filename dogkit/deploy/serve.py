"""``dogkit serve`` owns the HTTP service around one exported model: its Starlette app, dynamic batcher and startup.

Requests are decoded in a thread pool with the very functions ``dogkit predict`` uses; the decoded
images of concurrent requests wait in one bounded queue, and the batcher hands up to ``max_batch``
of them to ONNX Runtime in one call, so under load throughput follows the model's batch throughput.
Answers carry calibrated probabilities and an "unsure" verdict from the model's stored temperature and threshold;
``explain=1`` adds the top-1 breed's activation map (``dogkit.deploy.explain``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import h11
import numpy as np
import uvicorn
from rich.markup import escape
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..data.budget import BYTES_PER_PIXEL, HEAD_BYTES, AsyncBudget, budget_bytes, decode_cost
from ..data.images import rgb_from_bytes
from ..errors import DogkitError
from ..log import log
from ..runs import DEFAULT_RUNS_DIR, exported_model
from ..settings import SettingError, at_least, positive, within
from ..system import available_cpus
from ..text import finite, shown
from ..variants import from_metadata
from .decode import load_or_reason
from .explain import map_png, normalise, seen_region
from .predict import answer_threshold, ranked
from .runtime import OnnxClassifier

MIB = 2**20
RAW_TYPES = ("application/octet-stream",)  # besides image/*: one image as the whole body


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32  # images per ONNX Runtime call
    max_wait_ms: float = 5.0  # how long a batch may wait for images still being decoded
    max_queue: int = 256  # images accepted and not yet handed to the model; more is 503
    max_images: int = 16  # images per request; more is 413
    max_body_mb: float = 32.0  # request body; more is 413
    timeout_s: float = 30.0  # from a request's acceptance to its answer; later is 503
    top_k: int = 5  # default of the top_k query parameter
    workers: int | None = None  # decode threads (default: the CPUs this process may use)
    threads: int | None = None  # ONNX Runtime threads (default: the same)
    # Memory, bounded by these and not by what clients send:
    body_budget_mb: float = 256.0  # request bodies held at once, all requests together; more is 503
    decode_budget_mb: float | None = None  # decoded images in flight (default: DOGKIT_DECODE_MB, else 512)
    # Connections: a client that stalls loses its connection, not the server's memory or sockets.
    header_timeout_s: float = 10.0  # for a request's headers, from its first byte (or the connection's start)
    body_timeout_s: float = 30.0  # for its whole body, once the headers are in
    keep_alive_s: float = 5.0  # an idle connection between requests
    max_connections: int = 1000  # open connections; requests on more get 503
    # Open connections from one client address (default: half of max_connections): more are closed at once, so one
    # client holding idle sockets cannot starve the others.
    max_client_connections: int | None = None
    allowed_hosts: tuple[str, ...] | None = None  # Host headers answered; None: no check (``serve`` sets one)

    def __post_init__(self) -> None:
        """Checked where it is made: a bad value is refused before the model is loaded or a port opened."""
        at_least(self, 1, "max_batch", "max_queue", "max_images", "top_k", "max_connections",
                 "max_client_connections", "workers", "threads")
        within(self, "max_wait_ms", 0, 10_000)
        positive(self, "max_body_mb", "timeout_s", "body_budget_mb", "header_timeout_s", "body_timeout_s",
                 "keep_alive_s")
        within(self, "decode_budget_mb", 1, 2**30)
        if self.max_images > self.max_queue:
            raise SettingError("max_images", f"cannot exceed max_queue ({self.max_queue}), got {self.max_images}: "
                               "such a request could never be queued")
        if self.max_body_mb > self.body_budget_mb:
            raise SettingError("max_body_mb", f"cannot exceed body_budget_mb ({self.body_budget_mb:g}), got "
                               f"{self.max_body_mb:g}: such a request could never be held")
        budget_bytes(self.decode_budget_mb)  # a bad DOGKIT_DECODE_MB is refused at start, not at the first image


@dataclass(frozen=True)
class Address:
    """Where ``serve`` listens, checked before the model is loaded."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free one

    def __post_init__(self) -> None:
        within(self, "port", 0, 65535)


# ----------------------------------------------------------------------------- batching


class Batcher:
    """Images of concurrent requests gathered into one ONNX Runtime call each.

    A batch starts with the oldest queued image and takes whatever else is queued, up to
    ``max_batch``; while images of accepted requests are still being decoded it waits for them, at
    most ``max_wait``. With nothing else in flight (one client) it runs at once, so batching costs
    a lone request no latency. The model runs in a thread of its own, so the event loop keeps
    accepting and decoding while it works, and the next batch fills meanwhile.

    A batch with any image whose request asked for maps runs ``run_maps`` once for the whole batch, and only those
    images get maps: the maps are one small product with the head's weights (BENCHMARKS.md, "What the activation
    maps cost"), while splitting the batch would cost a second pass through the network. A batch without one runs
    ``run``, logits only (``map_calls`` in /health counts the others)."""

    def __init__(self, model: OnnxClassifier, max_batch: int, max_wait_s: float, max_queue: int):
        self.model, self.max_batch, self.max_wait, self.max_queue = model, max_batch, max_wait_s, max_queue
        self.queue: deque[tuple[np.ndarray, bool, asyncio.Future]] = deque()
        self.decoding = 0  # images of accepted requests not decoded yet: the bound counts them too
        self.closing = False
        self.model_calls = self.images_run = self.largest_batch = 0
        self.map_calls = 0  # model calls that returned maps (run_maps): the rest ran logits only
        self.model_seconds = 0.0  # time inside ONNX Runtime: busy / wall is the model's utilisation
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dogkit-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def reserve(self, n: int) -> str | None:
        """Room for ``n`` images about to be decoded, or why there is none."""
        if self.closing:
            return "the server is shutting down"
        if len(self.queue) + self.decoding + n > self.max_queue:
            return f"the queue is full ({self.max_queue} images waiting); try again shortly"
        self.decoding += n
        return None

    def release(self) -> None:
        """A reserved image that will never come (undecodable, or its request gave up)."""
        self.decoding -= 1
        self._wake.set()

    def submit(self, image: np.ndarray, maps: bool = False) -> asyncio.Future:
        """A decoded image (reserved before): its future is (its row of logits, its top-1 breed's map (h × w) if
        ``maps``, else None)."""
        self.decoding -= 1
        future = asyncio.get_running_loop().create_future()
        self.queue.append((image, maps, future))
        self._wake.set()
        return future

    async def close(self) -> None:
        """Refuse new work, finish everything accepted, stop."""
        self.closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._pool.shutdown()

    async def _sleep(self, timeout: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _next_batch(self) -> list[tuple[np.ndarray, bool, asyncio.Future]] | None:
        """The next batch; None once closing and nothing is left."""
        loop = asyncio.get_running_loop()
        while not self.queue:
            if self.closing and not self.decoding:
                return None
            await self._sleep(None)
        deadline = loop.time() + self.max_wait
        while len(self.queue) < self.max_batch and self.decoding and (left := deadline - loop.time()) > 0:
            await self._sleep(left)
        batch = [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]
        return [item for item in batch if not item[2].done()]  # drop timed-out requests

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch()) is not None:
            if not batch:
                continue
            try:
                rows = await loop.run_in_executor(self._pool, self._infer, np.stack([x for x, _, _ in batch]),
                                                  [maps for _, maps, _ in batch])
            except Exception as e:  # a model failure fails this batch's requests, not the server
                rows = [e] * len(batch)
            self.model_calls += 1
            self.images_run += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            for (_, _, future), row in zip(batch, rows):
                if future.done():
                    continue
                if isinstance(row, Exception):
                    future.set_exception(row)
                else:
                    future.set_result(row)

    def _infer(self, batch: np.ndarray, wants: list[bool]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        start = time.perf_counter()
        try:
            if not any(wants):
                return [(row, None) for row in self.model.run(batch)]
            logits, maps = self.model.run_maps(batch)
            self.map_calls += 1
            # A request keeps only the map it answers with, the top-1 breed's (a temperature never changes the top-1),
            # copied: not every class's, nor the whole batch's.
            return [(row, maps[i, int(row.argmax())].copy() if want else None)
                    for i, (row, want) in enumerate(zip(logits, wants))]
        finally:
            self.model_seconds += time.perf_counter() - start

    def stats(self) -> dict:
        return {"queued_images": len(self.queue) + self.decoding, "max_queue": self.max_queue,
                "model_calls": self.model_calls, "map_calls": self.map_calls, "images_run": self.images_run,
                "largest_batch": self.largest_batch, "max_batch": self.max_batch,
                "model_seconds": round(self.model_seconds, 3),
                "max_wait_ms": self.max_wait * 1000}


# ----------------------------------------------------------------------------- the service


def unsure_threshold(model: OnnxClassifier, override: float | None = None) -> tuple[float | None, str]:
    """(the calibrated confidence below which an answer is "unsure", where it comes from): ``min_confidence``,
    the model's own (``model``), none stored (``none``: never unsure) or ``unreachable`` (export found no
    threshold reaching its target precision: always unsure)."""
    threshold = answer_threshold(model, override)  # predict's rule
    if override is not None:
        return threshold, "min_confidence"
    return threshold, "none" if threshold is None else "model" if math.isfinite(threshold) else "unreachable"


def explain_card(model: OnnxClassifier) -> dict:
    """Calibration and maps, for GET /model, GET /health and the page (JSON has no infinity: an unreachable
    threshold is null, its source says which null it is)."""
    threshold, source = unsure_threshold(model)
    return {"temperature": model.temperature, "threshold": threshold if source == "model" else None,
            "threshold_source": source, "maps": model.explains,
            "why_no_maps": None if model.explains else model.why_no_maps()}


def model_card(model: OnnxClassifier) -> dict:
    """What the ONNX metadata says about the model, for GET /model and the page."""
    variant, detail = from_metadata(model.info)  # which row of the variants table this file is
    card = {"file": model.path.name, "num_classes": len(model.class_names), "classes": model.class_names,
            "precision": variant.name, "precision_detail": detail, "preprocess": json.loads(model.spec.to_json()),
            "providers": model.providers, **explain_card(model)}
    for key in ("arch", "run", "variant", "epoch", "val_metrics", "test_metrics", "dogkit_version", "input"):
        card[key] = model.info(key)
    return card


# Images above this (in decode cost: 4 megapixels) are decoded at a lower CPU priority than photos of usual size.
BIG_IMAGE_BYTES = 4_000_000 * BYTES_PER_PIXEL


def lower_priority() -> None:
    """The calling thread's CPU priority lowered (Linux: a thread is a task of its own); elsewhere nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


@dataclass(frozen=True)
class Outcome:
    """What the model said about one usable image."""

    logits: np.ndarray  # (classes,)
    map: np.ndarray | None  # the top-1 breed's activation map (h, w), when the request asked for maps
    photo: tuple[int, int]  # the decoded photo's (height, width), oriented as the model saw it


class Service:
    """One model, its batcher and decode pool, and the request counters /health reports."""

    def __init__(self, model: OnnxClassifier, config: ServeConfig):
        self.model, self.config = model, config
        self.card = model_card(model)
        self.explain = explain_card(model)  # read once: /health reports it on every call
        self.batcher: Batcher | None = None
        self.requests_in_flight = self.requests_answered = 0
        self._decode: ThreadPoolExecutor | None = None
        self._decode_big: ThreadPoolExecutor | None = None
        self.bodies = AsyncBudget(int(config.body_budget_mb * MIB))
        self.decoding = AsyncBudget(budget_bytes(config.decode_budget_mb))
        self._load = functools.partial(load_or_reason, self._prepared)

    def _prepared(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """Decoding and preprocessing exactly as `dogkit predict` does them, from bytes instead of a file; with the
        decoded (oriented) photo's height and width, which a map's region is measured in."""
        rgb = rgb_from_bytes(data, orientation=self.model.spec.orients)
        return self.model.preprocess(rgb), rgb.shape[:2]

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        cfg = self.config
        self.batcher = Batcher(self.model, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue)
        self.batcher.start()
        workers = cfg.workers or available_cpus()
        self._decode = ThreadPoolExecutor(workers, thread_name_prefix="dogkit-decode")
        self._decode_big = ThreadPoolExecutor(workers, thread_name_prefix="dogkit-decode-big",
                                              initializer=lower_priority)
        previous = cv2.getNumThreads()
        cv2.setNumThreads(1)  # parallelism comes from the pool, as in `dogkit predict`
        try:
            yield
        finally:
            await self.batcher.close()  # accepted work finishes; anything new is refused from here on
            self._decode.shutdown()
            self._decode_big.shutdown()
            cv2.setNumThreads(previous)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.batcher.closing

    def begin_shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.closing = True

    async def classify(self, images: list[bytes], maps: bool = False) -> list[Outcome | str]:
        """Each image's outcome (logits, its top-1 map if ``maps``, photo size), or the reason it is unusable; 503 if
        there is no room."""
        assert self.batcher is not None
        if reason := self.batcher.reserve(len(images)):
            raise HTTPException(503, reason, {"Retry-After": "1"})
        return await asyncio.gather(*(self._one(data, maps) for data in images))

    async def _one(self, data: bytes, maps: bool) -> Outcome | str:
        batcher, submitted = self.batcher, False
        try:
            decoded = await self._decoded(data)
            if isinstance(decoded, str):
                return decoded
            image, photo = decoded
            submitted = True
            logits, cam = await batcher.submit(image, maps)
            return Outcome(logits, cam, photo)
        finally:
            if not submitted:  # failed, or the request timed out while decoding
                batcher.release()

    async def _decoded(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]] | str:
        """Decoded and preprocessed in a pool once the decode budget has room for it. The room is given back when
        the thread is done, not when a timed-out request stops waiting: the pixels exist until then. Big images
        decode in threads of lower CPU priority: alone they run at full speed, beside small ones they yield."""
        cost = decode_cost(data[:HEAD_BYTES])
        await self.decoding.take(cost)
        try:
            pool = self._decode_big if cost > BIG_IMAGE_BYTES else self._decode
            work = asyncio.get_running_loop().run_in_executor(pool, self._load, data)
        except BaseException:
            self.decoding.give(cost)
            raise
        work.add_done_callback(lambda _: self.decoding.give(cost))
        return await asyncio.shield(work)

    def budgets(self) -> dict:
        return {name: {"used_mb": round(b.used / MIB, 1), "peak_mb": round(b.peak / MIB, 1),
                       "limit_mb": round(b.limit / MIB, 1), "waiting": b.waiting}
                for name, b in (("body_budget", self.bodies), ("decode_budget", self.decoding))}


# ----------------------------------------------------------------------------- HTTP


def parse_top_k(text: str | None, default: int, classes: int) -> int:
    if text is None:
        return min(default, classes)
    # ASCII digits only, and few of them: str.isdigit accepts '²', which int() refuses, and int() refuses
    # (or spends its time on) thousands of digits; anything above the class count means "all of them".
    value = text.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 9) or int(value) < 1:
        shown = text if len(text) <= 20 else text[:20] + "…"
        raise HTTPException(400, f"top_k must be a whole number of at least 1, got {shown!r}")
    return min(int(value), classes)


def clipped(text: str) -> str:
    """A query value as an error echoes it: short, whatever the client sent."""
    return text if len(text) <= 20 else text[:20] + "…"


FLAGS = {"1": True, "true": True, "yes": True, "on": True, "": True,  # a bare ?explain means on
         "0": False, "false": False, "no": False, "off": False}


def parse_flag(name: str, text: str | None) -> bool:
    if text is None:
        return False
    value = FLAGS.get(text.strip().lower())
    if value is None:
        raise HTTPException(400, f"{name} must be 1 or 0 (or true, false), got {clipped(text)!r}")
    return value


def parse_min_confidence(text: str | None) -> float | None:
    if text is None:
        return None
    # Plain decimals only: float() would also take 'nan', 'inf', '1_0' and '١' (an Arabic-Indic one).
    value = text.strip()
    if not (len(value) <= 20 and re.fullmatch(r"\d+\.?\d*|\.\d+", value, re.ASCII) and float(value) <= 1):
        raise HTTPException(400, f"min_confidence must be a number from 0 to 1, got {clipped(text)!r}")
    return float(value)


class Held:
    """A request's share of the body budget, given back in full when the request ends."""

    def __init__(self, budget: AsyncBudget):
        self.budget, self.bytes = budget, 0

    def take(self, n: int) -> None:
        if not self.budget.try_take(n):
            raise self.full(self.budget)
        self.bytes += n

    @staticmethod
    def full(budget: AsyncBudget) -> HTTPException:
        return HTTPException(503, f"the server holds {budget.used / MIB:.0f} MB of request bodies (its budget: "
                             f"{budget.limit / MIB:.0f} MB); try again shortly", {"Retry-After": "1"})

    def give_all(self) -> None:
        self.budget.give(self.bytes)
        self.bytes = 0


def admit(request: Request, limit: int, bodies: AsyncBudget) -> None:
    """A body of the declared Content-Length is refused before a byte of it is read: 413 above ``limit``, 503 when
    the body budget has no room for it now. What is held is counted as it arrives (``capped``), so a client that
    declares a large body and sends it slowly holds only what it has sent."""
    length = request.headers.get("content-length")
    if length is None or not (length.isascii() and length.isdigit()) or len(length) > 18:
        return  # no length declared (chunked): counted as it streams
    if int(length) > limit:
        raise HTTPException(413, f"request body of {int(length) / MIB:.1f} MB exceeds the {limit / MIB:.3g} MB limit")
    if bodies.used and bodies.used + int(length) > bodies.limit:
        raise Held.full(bodies)


async def capped(request: Request, limit: int, held: Held) -> AsyncIterator[bytes]:
    """The body as it arrives, each chunk taken from the body budget (503 when it has no room left); 413 as soon as
    it exceeds ``limit``."""
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body exceeds the {limit / MIB:.3g} MB limit")
            held.take(len(chunk))
            yield chunk
    except ClientDisconnect:  # gone, or closed by the body timeout: nobody is left to answer
        raise HTTPException(400, "the client closed the connection before sending the whole body") from None


async def read_images(request: Request, cfg: ServeConfig, held: Held) -> tuple[list[str | None], list[bytes]]:
    """(file names, bytes) of the request's images: multipart files, or one raw image body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = int(cfg.max_body_mb * MIB)
    if not (kind.startswith("image/") or kind in RAW_TYPES or kind == "multipart/form-data"):
        raise HTTPException(415, f"unsupported Content-Type {kind[:100] or '(none)'!r}: send multipart/form-data "
                            "files, or one image as the raw body (image/* or application/octet-stream)")
    admit(request, limit, held.budget)
    if kind != "multipart/form-data":
        body = b"".join([chunk async for chunk in capped(request, limit, held)])
        if not body:
            raise HTTPException(400, "empty request body: send the image's bytes")
        return [None], [body]
    try:
        # max_files: a body of many tiny parts is refused while it is parsed, not after.
        form = await MultiPartParser(request.headers, capped(request, limit, held),
                                     max_files=cfg.max_images + 1).parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise HTTPException(413, f"more than {cfg.max_images} images in one request; the limit is "
                                f"{cfg.max_images}") from None
        raise HTTPException(400, f"malformed multipart body: {e.message}") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise HTTPException(400, "no files in the multipart body (send them as file fields, e.g. files=@dog.jpg)")
        if len(files) > cfg.max_images:
            raise HTTPException(413, f"{len(files)} images in one request; the limit is {cfg.max_images}")
        return [f.filename for f in files], [await f.read() for f in files]
    finally:
        await form.close()


@dataclass(frozen=True)
class Asked:
    """What a request's query asked for, beyond the images."""

    top_k: int
    raw: bool  # raw softmax in "top" instead of calibrated probabilities
    threshold: float | None  # the calibrated confidence below which the answer is "unsure"; None: never


def map_json(model: OnnxClassifier, cam: np.ndarray, breed: str, photo: tuple[int, int]) -> dict:
    """One class's activation map: a grey PNG and the normalised grid at the map's resolution, and the rectangle
    of the uploaded photo (its pixels, as decoded and oriented) that the model saw and the map covers."""
    height, width = photo
    top, left, rows, cols = seen_region(height, width, model.spec)
    grid = np.round(normalise(cam).astype(np.float64), 3)  # float64: 0.123, not 0.12300000339746475
    return {"breed": breed, "png": base64.b64encode(map_png(cam)).decode("ascii"), "grid": grid.tolist(),
            "region": {"top": top, "left": left, "height": rows, "width": cols},
            "photo": {"width": width, "height": height}}


def result_json(model: OnnxClassifier, name: str | None, outcome: Outcome | str, asked: Asked) -> dict:
    name = None if name is None else shown(name)
    if isinstance(outcome, str):
        return {"file": name, "error": outcome}
    calibrated = model.probabilities(outcome.logits[None])
    probs = model.probabilities(outcome.logits[None], calibrated=False) if asked.raw else calibrated
    (labels, values), = ranked(model.class_names, probs, asked.top_k)
    best = int(np.argsort(-probs, axis=1)[0, 0])  # ranked's own order: the answer is the first bar shown
    confidence = float(calibrated[0, best])  # the threshold is on calibrated confidence, whatever "top" shows
    unsure = asked.threshold is not None and confidence < asked.threshold
    if not (np.isfinite(calibrated).all() and np.isfinite(probs).all()):  # NaN or infinite logits: no confidence
        unsure = True
    out = {"file": name, "answer": "unsure" if unsure else labels[0], "unsure": unsure, "confidence": confidence,
           "top": [{"label": label, "prob": prob} for label, prob in zip(labels, values)]}
    if outcome.map is not None:  # the top-1 logit's breed: the answer's, bar a tie in the last bit
        out["map"] = map_json(model, outcome.map, model.class_names[int(outcome.logits.argmax())], outcome.photo)
    return finite(out)  # JSON has no NaN: a broken model's numbers are null


async def predict_endpoint(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    cfg = service.config
    query, model = request.query_params, service.model
    top_k = parse_top_k(query.get("top_k"), cfg.top_k, len(model.class_names))
    raw, explain = parse_flag("raw", query.get("raw")), parse_flag("explain", query.get("explain"))
    override = parse_min_confidence(query.get("min_confidence"))
    if explain and not model.explains:  # refused before a byte of the body is read
        raise HTTPException(422, f"explain=1: {model.why_no_maps()}")
    threshold, source = unsure_threshold(model, override)
    asked = Asked(top_k, raw, threshold)
    if not service.ready:
        raise HTTPException(503, "the server is shutting down", {"Retry-After": "1"})
    held = Held(service.bodies)
    service.requests_in_flight += 1
    try:
        names, images = await read_images(request, cfg, held)
        outcomes = await asyncio.wait_for(service.classify(images, explain), cfg.timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(503, f"no answer within the {cfg.timeout_s:g} s request timeout (the server is "
                            "overloaded); try again", {"Retry-After": "1"}) from None
    finally:
        service.requests_in_flight -= 1
        held.give_all()
    service.requests_answered += 1
    if names == [None] and isinstance(outcomes[0], str):  # a raw body that is not a usable image
        raise HTTPException(422, outcomes[0])
    return JSONResponse({"model": model.path.name, "top_k": top_k, "calibrated": not raw,
                         "temperature": model.temperature,
                         "threshold": threshold if threshold is not None and math.isfinite(threshold) else None,
                         "threshold_source": source,
                         "results": [result_json(model, n, o, asked) for n, o in zip(names, outcomes)]})


async def model_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.service.card)


async def health_endpoint(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    body = {"status": "ok" if service.ready else "shutting down" if service.batcher else "starting",
            "model": service.model.path.name, "requests_in_flight": service.requests_in_flight,
            "requests_answered": service.requests_answered, **service.explain,
            **(service.batcher.stats() if service.batcher else {}),
            **service.budgets()}
    return JSONResponse(body, 200 if service.ready else 503)


async def json_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Not a bad image (those are answers): a failure of the server or the model, still as JSON. The
    server logs the traceback."""
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {str(exc).strip()[:300]}"}, 500)


def create_app(model: OnnxClassifier, config: ServeConfig | None = None) -> Starlette:
    """The ASGI app: POST /predict, GET /model, GET /health and the page at GET /; with ``allowed_hosts``, other
    Host headers are refused."""
    config = config or ServeConfig()
    service = Service(model, config)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    hosts = [] if config.allowed_hosts is None else [Middleware(HostCheck, allowed=config.allowed_hosts)]
    app = Starlette(routes=[Route("/", index), Route("/predict", predict_endpoint, methods=["POST"]),
                            Route("/model", model_endpoint), Route("/health", health_endpoint)],
                    middleware=hosts, lifespan=service.lifespan,
                    exception_handlers={HTTPException: json_error, Exception: internal_error})
    app.state.service = service
    return app


# ----------------------------------------------------------------------------- connections


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines it lacks: a request's headers must arrive within
    ``header_timeout`` of its first byte (or of the connection's start), and its body within ``body_timeout`` of
    its headers; otherwise the connection is closed. uvicorn's own keep-alive timer covers idle connections
    between requests, but any byte resets it, so without these a client sending one byte a second holds a
    connection (and its buffers) for ever."""

    header_timeout = 10.0
    body_timeout = 30.0
    per_client = 0  # open connections one client address may hold (0: no cap)
    max_open = 0  # open connections in all (0: no cap); one more is answered 503 and closed
    clients: dict[str, int] = {}  # open connections by client address (each server's own class has its own)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""
        self._address = self.client[0] if self.client else ""
        self.clients[self._address] = self.clients.get(self._address, 0) + 1
        if self.per_client and self.clients[self._address] > self.per_client:
            transport.close()  # before any request: the client's other connections keep working
            return
        if self.max_open and len(self.connections) > self.max_open:
            # Our limit, not uvicorn's limit_concurrency, whose 503 is text: answered as every error is, in JSON,
            # before the request is read (h11 sends no response before a request: the bytes are written as such).
            body = json.dumps({"error": f"the server has {self.max_open} connections open, its limit; try again "
                                        "shortly"}).encode()
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\nconnection: close\r\nretry-after: 1\r\n\r\n%s" % (len(body), body))
            transport.close()
            return
        self._enter("headers", self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter("closed", None)
        left = self.clients.get(self._address, 1) - 1
        if left > 0:
            self.clients[self._address] = left
        else:
            self.clients.pop(self._address, None)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse, answered in JSON as every other error (uvicorn answers text)."""
        body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
        event = h11.Response(status_code=400, headers=[(b"content-type", b"application/json"),
                                                       (b"connection", b"close")])
        for part in (event, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(part))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._phase != "headers":  # a new request's first bytes
            self._enter("headers", self.header_timeout)
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase != "body":
            self._enter("body", self.body_timeout)
        elif state not in (h11.IDLE, h11.SEND_BODY):  # the whole request is in: the request timeout takes over
            self._enter("done", None)

    def _enter(self, phase: str, seconds: float | None) -> None:
        self._phase = phase
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None if seconds is None else self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the app, if it was reading the body, sees the client disconnect


def guarded_protocol(cfg: ServeConfig) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": cfg.header_timeout_s, "body_timeout": cfg.body_timeout_s, "clients": {},
                 "per_client": cfg.max_client_connections or max(1, cfg.max_connections // 2),
                 "max_open": cfg.max_connections})


WILDCARDS = ("", "0.0.0.0", "::")


def default_hosts(bind: str) -> tuple[str, ...]:
    """The Host headers a server bound to ``bind`` answers by default: its address and localhost's names; bound to
    every interface, also this machine's name and any IP address. A DNS-rebinding page always sends its own
    domain name, which is none of these."""
    hosts = [bind, "localhost", "127.0.0.1", "::1"]
    if bind in WILDCARDS:
        hosts += [socket.gethostname(), socket.getfqdn(), "<ip>"]
    return tuple(dict.fromkeys(h.lower() for h in hosts if h))


def host_name(value: str) -> str:
    """A Host header without its port: ``example.com:8000`` → ``example.com``, ``[::1]:8000`` → ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """ASGI middleware: requests whose Host header is not an allowed name get 421, so that a web page on another
    domain cannot reach the server through DNS rebinding. ``*`` allows every host; ``<ip>`` every IP address."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, frozenset(h.lower() for h in allowed)

    def allows(self, host: str | None) -> bool:
        if host is None or "*" in self.allowed:
            return True  # no Host at all (HTTP/1.0): not a browser, so not a rebinding page
        name = host_name(host)
        return name in self.allowed or ("<ip>" in self.allowed and _is_ip(name))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not self.allows(host):
                response = JSONResponse({"error": f"this server does not answer to the host {shown(host)[:100]!r} "
                                                  "(dogkit serve --allowed-host adds one)"}, 421)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------- startup


class Server(uvicorn.Server):
    """uvicorn's server, telling the service the moment SIGTERM or SIGINT arrives: requests already
    accepted finish, new ones get 503 until the connections close. The process then exits normally
    (uvicorn would re-raise the signal afterwards, ending the process by it)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.begin_shutdown()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts so that a busy port is one clear error.

    Made with proto=IPPROTO_TCP as getaddrinfo gives it: asyncio turns Nagle's algorithm off
    (TCP_NODELAY) only on sockets that say so, and with it on, a response written in two parts
    (head, then body) waits for the client's delayed ACK, about 40 ms per request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as e:  # OverflowError: a port above 65535
        sock.close()
        raise DogkitError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def announce(model: OnnxClassifier, sock: socket.socket, cfg: ServeConfig) -> None:
    host, port = sock.getsockname()[:2]
    card = model_card(model)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    log.info(f"dogkit serve: {escape(url)}  (Ctrl-C or SIGTERM stops it)")
    providers = ", ".join(p.replace("ExecutionProvider", "") for p in model.providers)
    log.info(f"  model: {escape(str(model.path))} ({card['arch'] or 'unknown arch'}, {card['precision']}, "
             f"{card['num_classes']} classes, {providers})")
    metrics = card["val_metrics"] or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                      if isinstance(v, (int, float)) and k != "macro_classes")
    log.info(f"  validation: {shown or 'no metrics in the model metadata'}")
    threshold, source = unsure_threshold(model)
    unsure = (f"unsure below {threshold:.3f}" if source == "model" else
              {"none": "never unsure (no threshold stored)",
               "unreachable": "always unsure (no threshold met the export's target precision)"}[source])
    log.info(f"  answers: calibrated at temperature {model.temperature:.3f}, {unsure}; maps: "
             f"{'yes (explain=1)' if model.explains else escape(model.why_no_maps())}")
    log.info(f"  batching: up to {cfg.max_batch} images per model call, waiting at most {cfg.max_wait_ms:g} ms; "
             f"queue of {cfg.max_queue} images; per request: {cfg.max_images} images, {cfg.max_body_mb:g} MB, "
             f"{cfg.timeout_s:g} s")
    log.info(f"  memory: {cfg.body_budget_mb:g} MB of request bodies, {budget_bytes(cfg.decode_budget_mb) / MIB:g} MB "
             f"of decoding; timeouts: headers {cfg.header_timeout_s:g} s, body {cfg.body_timeout_s:g} s, idle "
             f"{cfg.keep_alive_s:g} s; {cfg.max_connections} connections; hosts: "
             f"{escape(', '.join(cfg.allowed_hosts or ('any',)))}")


def serve(model: Path | None = None, *, host: str = Address.host, port: int = Address.port,
          config: ServeConfig | None = None, device: str = "cpu", runs_dir: Path = DEFAULT_RUNS_DIR) -> None:
    """Load the model (default: the best exported run's), listen, serve until SIGTERM or SIGINT."""
    Address(host, port)
    config = config or ServeConfig()
    if config.allowed_hosts is None:
        config = dataclasses.replace(config, allowed_hosts=default_hosts(host))
    classifier = OnnxClassifier(model or exported_model(None, runs_dir), device=device,
                                threads=config.threads)
    app = create_app(classifier, config)
    sock = listen(host, port)
    announce(classifier, sock, config)
    server = Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                                   http=guarded_protocol(config), timeout_keep_alive=config.keep_alive_s,
                                   timeout_graceful_shutdown=int(config.timeout_s) + 5), app.state.service)
    server.run(sockets=[sock])
    stats = app.state.service.batcher.stats() if app.state.service.batcher else {}
    log.info(f"dogkit serve stopped: {app.state.service.requests_answered} requests answered, "
             f"{stats.get('images_run', 0)} images in {stats.get('model_calls', 0)} model calls")
