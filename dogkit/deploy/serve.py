"""``dogkit serve`` owns the HTTP service around one exported model: its Starlette app, dynamic batcher and startup.

Requests are decoded in a thread pool with the very functions ``dogkit predict`` uses; the decoded
images of concurrent requests wait in one bounded queue, and the batcher hands up to ``max_batch``
of them to ONNX Runtime in one call, so under load throughput follows the model's batch throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import uvicorn
from rich.markup import escape
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from ..data.images import rgb_from_bytes
from ..errors import DogkitError
from ..log import log
from ..runs import DEFAULT_RUNS_DIR, exported_model
from ..system import available_cpus
from .predict import load_or_reason, ranked
from .runtime import OnnxClassifier, softmax

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

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_images", "top_k"):
            if getattr(self, name) < 1:
                raise DogkitError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "max_body_mb", "timeout_s"):
            if not 0 <= getattr(self, name) < float("inf") or (name != "max_wait_ms" and getattr(self, name) == 0):
                raise DogkitError(f"{name} must be a positive number, got {getattr(self, name)}")
        if self.max_images > self.max_queue:
            raise DogkitError(f"max_images ({self.max_images}) cannot exceed max_queue ({self.max_queue}): such a "
                              "request could never be queued")


# ----------------------------------------------------------------------------- batching


class Batcher:
    """Images of concurrent requests gathered into one ONNX Runtime call each.

    A batch starts with the oldest queued image and takes whatever else is queued, up to
    ``max_batch``; while images of accepted requests are still being decoded it waits for them, at
    most ``max_wait``. With nothing else in flight (one client) it runs at once, so batching costs
    a lone request no latency. The model runs in a thread of its own, so the event loop keeps
    accepting and decoding while it works, and the next batch fills meanwhile."""

    def __init__(self, model: OnnxClassifier, max_batch: int, max_wait_s: float, max_queue: int):
        self.model, self.max_batch, self.max_wait, self.max_queue = model, max_batch, max_wait_s, max_queue
        self.queue: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.decoding = 0  # images of accepted requests not decoded yet: the bound counts them too
        self.closing = False
        self.model_calls = self.images_run = self.largest_batch = 0
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

    def submit(self, image: np.ndarray) -> asyncio.Future:
        """A decoded image (reserved before): its future is its row of class probabilities."""
        self.decoding -= 1
        future = asyncio.get_running_loop().create_future()
        self.queue.append((image, future))
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

    async def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]] | None:
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
        return [(image, future) for image, future in batch if not future.done()]  # drop timed-out requests

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch()) is not None:
            if not batch:
                continue
            try:
                probs = await loop.run_in_executor(self._pool, self._infer, np.stack([x for x, _ in batch]))
            except Exception as e:  # a model failure fails this batch's requests, not the server
                probs = [e] * len(batch)
            self.model_calls += 1
            self.images_run += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            for (_, future), row in zip(batch, probs):
                if future.done():
                    continue
                if isinstance(row, Exception):
                    future.set_exception(row)
                else:
                    future.set_result(row)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return softmax(self.model.run(batch))
        finally:
            self.model_seconds += time.perf_counter() - start

    def stats(self) -> dict:
        return {"queued_images": len(self.queue) + self.decoding, "max_queue": self.max_queue,
                "model_calls": self.model_calls, "images_run": self.images_run,
                "largest_batch": self.largest_batch, "max_batch": self.max_batch,
                "model_seconds": round(self.model_seconds, 3),
                "max_wait_ms": self.max_wait * 1000}


# ----------------------------------------------------------------------------- the service


def model_card(model: OnnxClassifier) -> dict:
    """What the ONNX metadata says about the model, for GET /model and the page."""
    quantization, half = model.info("quantization"), model.info("precision")
    card = {"file": model.path.name, "num_classes": len(model.class_names), "classes": model.class_names,
            "precision": "int8" if quantization else "fp16" if half else "fp32",
            "precision_detail": quantization or half, "preprocess": json.loads(model.spec.to_json()),
            "providers": model.providers}
    for key in ("arch", "run", "variant", "epoch", "val_metrics", "test_metrics", "dogkit_version", "input"):
        card[key] = model.info(key)
    return card


class Service:
    """One model, its batcher and decode pool, and the request counters /health reports."""

    def __init__(self, model: OnnxClassifier, config: ServeConfig):
        self.model, self.config = model, config
        self.card = model_card(model)
        self.batcher: Batcher | None = None
        self.requests_in_flight = self.requests_answered = 0
        self._decode: ThreadPoolExecutor | None = None
        # Decoding and preprocessing exactly as `dogkit predict` does them, from bytes instead of a file.
        self._load = functools.partial(load_or_reason, lambda data: model.preprocess(
            rgb_from_bytes(data, orientation=model.spec.orients)))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        cfg = self.config
        self.batcher = Batcher(self.model, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue)
        self.batcher.start()
        self._decode = ThreadPoolExecutor(cfg.workers or available_cpus(), thread_name_prefix="dogkit-decode")
        previous = cv2.getNumThreads()
        cv2.setNumThreads(1)  # parallelism comes from the pool, as in `dogkit predict`
        try:
            yield
        finally:
            await self.batcher.close()  # accepted work finishes; anything new is refused from here on
            self._decode.shutdown()
            cv2.setNumThreads(previous)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.batcher.closing

    def begin_shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.closing = True

    async def classify(self, images: list[bytes]) -> list[np.ndarray | str]:
        """A probability row, or the reason it is unusable, for each image; 503 if there is no room."""
        assert self.batcher is not None
        if reason := self.batcher.reserve(len(images)):
            raise HTTPException(503, reason, {"Retry-After": "1"})
        return await asyncio.gather(*(self._one(data) for data in images))

    async def _one(self, data: bytes) -> np.ndarray | str:
        batcher, submitted = self.batcher, False
        try:
            image = await asyncio.get_running_loop().run_in_executor(self._decode, self._load, data)
            if isinstance(image, str):
                return image
            submitted = True
            return await batcher.submit(image)
        finally:
            if not submitted:  # failed, or the request timed out while decoding
                batcher.release()


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


async def capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives; 413 as soon as it exceeds ``limit`` (Content-Length is checked first)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"request body of {int(length) / MIB:.1f} MB exceeds the {limit / MIB:.3g} MB limit")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the {limit / MIB:.3g} MB limit")
        yield chunk


async def read_images(request: Request, cfg: ServeConfig) -> tuple[list[str | None], list[bytes]]:
    """(file names, bytes) of the request's images: multipart files, or one raw image body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = int(cfg.max_body_mb * MIB)
    if kind.startswith("image/") or kind in RAW_TYPES:
        body = b"".join([chunk async for chunk in capped(request, limit)])
        if not body:
            raise HTTPException(400, "empty request body: send the image's bytes")
        return [None], [body]
    if kind != "multipart/form-data":
        raise HTTPException(415, f"unsupported Content-Type {kind or '(none)'!r}: send multipart/form-data files, or "
                            "one image as the raw body (image/* or application/octet-stream)")
    try:
        form = await MultiPartParser(request.headers, capped(request, limit)).parse()
    except MultiPartException as e:
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


def result_json(model: OnnxClassifier, name: str | None, outcome: np.ndarray | str, top_k: int) -> dict:
    if isinstance(outcome, str):
        return {"file": name, "error": outcome}
    (labels, probs), = ranked(model.class_names, outcome[None], top_k)
    return {"file": name, "top": [{"label": label, "prob": prob} for label, prob in zip(labels, probs)]}


async def predict_endpoint(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    cfg = service.config
    top_k = parse_top_k(request.query_params.get("top_k"), cfg.top_k, len(service.model.class_names))
    if not service.ready:
        raise HTTPException(503, "the server is shutting down", {"Retry-After": "1"})
    names, images = await read_images(request, cfg)
    service.requests_in_flight += 1
    try:
        outcomes = await asyncio.wait_for(service.classify(images), cfg.timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(503, f"no answer within the {cfg.timeout_s:g} s request timeout (the server is "
                            "overloaded); try again", {"Retry-After": "1"}) from None
    finally:
        service.requests_in_flight -= 1
    service.requests_answered += 1
    if names == [None] and isinstance(outcomes[0], str):  # a raw body that is not a usable image
        raise HTTPException(422, outcomes[0])
    return JSONResponse({"model": service.model.path.name, "top_k": top_k,
                         "results": [result_json(service.model, n, o, top_k) for n, o in zip(names, outcomes)]})


async def model_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.service.card)


async def health_endpoint(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    body = {"status": "ok" if service.ready else "shutting down" if service.batcher else "starting",
            "model": service.model.path.name, "requests_in_flight": service.requests_in_flight,
            "requests_answered": service.requests_answered, **(service.batcher.stats() if service.batcher else {})}
    return JSONResponse(body, 200 if service.ready else 503)


async def json_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Not a bad image (those are answers): a failure of the server or the model, still as JSON. The
    server logs the traceback."""
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {str(exc).strip()[:300]}"}, 500)


def create_app(model: OnnxClassifier, config: ServeConfig | None = None) -> Starlette:
    """The ASGI app: POST /predict, GET /model, GET /health and the page at GET /."""
    config = config or ServeConfig()
    config.check()
    service = Service(model, config)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    app = Starlette(routes=[Route("/", index), Route("/predict", predict_endpoint, methods=["POST"]),
                            Route("/model", model_endpoint), Route("/health", health_endpoint)],
                    lifespan=service.lifespan,
                    exception_handlers={HTTPException: json_error, Exception: internal_error})
    app.state.service = service
    return app


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
    log.info(f"  batching: up to {cfg.max_batch} images per model call, waiting at most {cfg.max_wait_ms:g} ms; "
             f"queue of {cfg.max_queue} images; per request: {cfg.max_images} images, {cfg.max_body_mb:g} MB, "
             f"{cfg.timeout_s:g} s")


def serve(model: Path | None = None, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          device: str = "cpu", runs_dir: Path = DEFAULT_RUNS_DIR) -> None:
    """Load the model (default: the best exported run's), listen, serve until SIGTERM or SIGINT."""
    config = config or ServeConfig()
    config.check()
    classifier = OnnxClassifier(model or exported_model(None, runs_dir), device=device,
                                threads=config.threads)
    app = create_app(classifier, config)
    sock = listen(host, port)
    announce(classifier, sock, config)
    server = Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=int(config.timeout_s) + 5), app.state.service)
    server.run(sockets=[sock])
    stats = app.state.service.batcher.stats() if app.state.service.batcher else {}
    log.info(f"dogkit serve stopped: {app.state.service.requests_answered} requests answered, "
             f"{stats.get('images_run', 0)} images in {stats.get('model_calls', 0)} model calls")
