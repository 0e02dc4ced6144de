"""``dogkit bench``: PyTorch, ONNX Runtime and OpenCV DNN side by side on this machine, each at its best.

Every (backend, batch size) runs in a subprocess of its own, so thread pools never fight and one
backend's memory does not count against another's. Thread counts are fixed and printed. Each
measurement warms up, then times runs until both a minimum count and a minimum time are reached,
and reports latency p50/p90/p99 per batch, images/s and peak memory (RSS, or CUDA allocations).
Without PyTorch installed only the ONNX backends run: the PyTorch backends live in
``dogkit.training.bench``, which runs as a torch backend's worker process and is never imported here.
OpenCV's DNN module runs the very files ONNX Runtime does; a file it cannot run is reported as skipped,
with OpenCV's reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.markup import escape

from .. import __version__
from ..atomic import atomic_write_text
from ..errors import DogkitError, one_line
from ..log import log
from ..runs import DEFAULT_RUNS_DIR, best_run, model_run, read_json
from ..settings import SettingError, at_least, one_of, whole, within
from ..system import available_cpus
from ..variants import backend_files, base, by_backend, opencv_backends, ort_backends

TORCH_BACKENDS = ("torch", "torch-bf16", "torch-compile")
TORCH_WORKER = "dogkit.training.bench"  # runs them, in a process of its own


def all_backends() -> tuple[str, ...]:
    """The PyTorch backends, then those of each runtime that runs the exported files (``RUNTIMES``): ONNX Runtime on
    each file, and OpenCV's DNN module (a second runtime with no PyTorch and no ONNX Runtime) on some of the same
    files. Read when called, not copied at import, so that a row added to the variants table is a backend here."""
    return TORCH_BACKENDS + tuple(b for r in RUNTIMES.values() for b in r.backends())


def runtime_of(backend: str) -> str | None:
    """The runtime of ``RUNTIMES`` that runs ``backend``; None for the PyTorch backends."""
    return next((name for name, r in RUNTIMES.items() if backend in r.backends()), None)


@dataclass
class Row:
    backend: str
    variant: str  # what exactly ran: precision, memory format, provider
    batch: int
    threads: int
    device: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    peak_mem_mb: float
    runs: int
    end_to_end: bool = False


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def opencv_dnn() -> bool:
    import cv2

    return hasattr(cv2, "dnn") and hasattr(cv2.dnn, "readNetFromONNX")


# ----------------------------------------------------------------------------- measurement (in the worker)


def time_runs(fn, warmup: int, min_runs: int, min_time: float) -> np.ndarray:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return np.asarray(times)


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def make_row(backend, variant, batch, threads, device, times, peak_mb, end_to_end=False, images=None) -> Row:
    ms = times * 1000
    total_images = images if images is not None else batch * len(times)
    return Row(backend, variant, batch, threads, device, float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
               float(np.percentile(ms, 99)), total_images / float(times.sum()), peak_mb, len(times), end_to_end)


def bench_onnx(path: Path, backend: str, batch: int, threads: int, device: str, warmup: int, min_runs: int,
               min_time: float) -> Row:
    from .runtime import OnnxClassifier

    model = OnnxClassifier(path, device=device, threads=threads)
    x = np.random.default_rng(0).integers(0, 256, (batch, model.spec.size, model.spec.size, 3), dtype=np.uint8)
    times = time_runs(lambda: model.run(x), warmup, min_runs, min_time)
    variant = f"{path.name}, {model.providers[0].replace('ExecutionProvider', '')}"
    return make_row(backend, variant, batch, threads, device, times, peak_rss_mb())


# What the maps output (``dogkit.training.cam``) costs, on the fp32 file: ``onnx`` above fetches the logits only (the
# plain path of predict and serve); these fetch the maps too, and run the same graph pruned to its logits (what
# ``dogkit export --no-explain`` writes). Not run by default: ask for them with --backends.
MAPS_BACKENDS = {"onnx-explain": "logits and activation maps", "onnx-no-maps": "graph pruned to its logits"}


def bench_maps(path: Path, backend: str, batch: int, threads: int, device: str, warmup: int, min_runs: int,
               min_time: float) -> Row:
    import tempfile

    from .runtime import OnnxClassifier

    with tempfile.TemporaryDirectory(prefix="dogkit-bench-") as tmp:
        if backend == "onnx-no-maps":
            try:
                import onnx.utils
            except ImportError as e:
                raise Unsupported("pruning the maps output needs the onnx package (the [train] extra)") from e
            pruned = Path(tmp) / path.name
            onnx.utils.extract_model(str(path), str(pruned), ["images"], ["logits"])
            graph = onnx.load(str(pruned))  # the extractor keeps the graph only: the metadata comes back here
            graph.metadata_props.extend(onnx.load(str(path), load_external_data=False).metadata_props)
            onnx.save(graph, str(pruned))
            model = OnnxClassifier(pruned, device=device, threads=threads)
            if model.explains:
                raise DogkitError(f"{pruned} still returns maps")

            def fn():
                model.run(x)
        else:
            model = OnnxClassifier(path, device=device, threads=threads)
            if not model.explains:
                raise Unsupported(model.why_no_maps())

            def fn():
                model.run_maps(x)
        x = np.random.default_rng(0).integers(0, 256, (batch, model.spec.size, model.spec.size, 3), dtype=np.uint8)
        times = time_runs(fn, warmup, min_runs, min_time)
    variant = f"{path.name}: {MAPS_BACKENDS[backend]}, {model.providers[0].replace('ExecutionProvider', '')}"
    return make_row(backend, variant, batch, threads, device, times, peak_rss_mb())


class Unsupported(DogkitError):
    """This runtime cannot run this file: reported beside the results, not a failure of the benchmark."""


UNSUPPORTED = 3  # the worker's exit status for Unsupported


def bench_opencv(path: Path, backend: str, batch: int, threads: int, warmup: int, min_runs: int,
                 min_time: float) -> Row:
    import cv2

    from .runtime import OnnxClassifier

    size = OnnxClassifier(path, threads=1).spec.size  # the metadata, read by the runtime that wrote it
    cv2.setNumThreads(threads)
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    try:
        net = cv2.dnn.readNetFromONNX(str(path))
        net.setInput(x)
        net.forward("logits")  # by name: OpenCV 4 returns the last layer, the maps
    except cv2.error as e:
        lines = [line.split("error: ", 1)[1] for line in str(e).splitlines() if "error: " in line]
        reason = (lines or [line for line in str(e).splitlines() if line.strip()] or ["unknown error"])[-1].strip()
        raise Unsupported(f"OpenCV {cv2.__version__} DNN cannot run {path.name}: {reason}") from e

    def run():
        net.setInput(x)
        net.forward("logits")

    times = time_runs(run, warmup, min_runs, min_time)
    return make_row(backend, f"{path.name}, OpenCV {cv2.__version__} DNN", batch, threads, "cpu", times,
                    peak_rss_mb())


def bench_end_to_end(path: Path, backend: str, images: Path, batch: int, threads: int, device: str) -> Row:
    """Decode + preprocess + inference over real files, exactly as ``dogkit predict`` runs them."""
    from ..data.budget import file_cost
    from .decode import iter_batches
    from .predict import collect_paths, load_for
    from .runtime import OnnxClassifier

    model = OnnxClassifier(path, device=device, threads=threads)
    files = collect_paths([str(images)])
    if not files:
        raise DogkitError(f"no images in {images}")
    from ..data.images import ImageError

    load = load_for(model)
    for file in files:  # warm-up on the first file that decodes: a bad one is skipped here as in the timed pass
        try:
            first = load(file)
            break
        except ImageError:
            continue
    else:
        raise DogkitError(f"none of the {len(files)} files in {images} is a usable image")
    model.run(np.stack([first] * batch))
    batch_times, count = [], 0
    start = time.perf_counter()
    last = start
    for good, x, _ in iter_batches(files, load, batch, workers=threads, cost=file_cost):
        if x is not None:
            model.run(x)
            count += len(good)
        now = time.perf_counter()
        batch_times.append(now - last)
        last = now
    times = np.asarray(batch_times)
    return make_row(backend, f"{path.name}: decode + preprocess + inference, {len(files)} files", batch, threads,
                    device, times, peak_rss_mb(), end_to_end=True, images=count)


@dataclass(frozen=True)
class Runtime:
    """A runtime that runs the exported files: its backends (one per variant it runs, from the variants table), the
    measurement of one (batch) in a worker process, and why it cannot run on this machine (None when it can)."""
    backends: Callable[[], tuple[str, ...]]
    measure: Callable[[dict], Row]
    missing: Callable[[], str | None] = lambda: None


def _timing(a: dict) -> tuple:
    return a["warmup"], a["min_runs"], a["min_time"]


# Adding a runtime: one row here and its bench_<runtime> function (its backends: a field of the variants' rows).
RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime(ort_backends, lambda a: bench_onnx(Path(a["model"]), a["backend"], a["batch"], a["threads"],
                                                              a["device"], *_timing(a))),
    "opencv": Runtime(opencv_backends, lambda a: bench_opencv(Path(a["model"]), a["backend"], a["batch"],
                                                              a["threads"], *_timing(a)),
                      lambda: None if opencv_dnn() else "this OpenCV has no DNN module"),
    "onnxruntime-maps": Runtime(lambda: tuple(MAPS_BACKENDS), lambda a: bench_maps(
        Path(a["model"]), a["backend"], a["batch"], a["threads"], a["device"], *_timing(a))),
}


def worker(args: dict) -> Row:
    if args.get("images"):
        return bench_end_to_end(Path(args["model"]), args["backend"], Path(args["images"]), args["batch"],
                                args["threads"], args["device"])
    return RUNTIMES[runtime_of(args["backend"])].measure(args)


def worker_main(measure: Callable[[dict], Row]) -> None:
    """A worker process: one measurement of the JSON arguments in argv[1], one JSON line on stdout; Unsupported
    and DogkitError as their exit statuses with the reason on stderr."""
    try:
        row = measure(json.loads(sys.argv[1]))
    except Unsupported as e:
        print(f"unsupported: {e}", file=sys.stderr)
        sys.exit(UNSUPPORTED)
    except DogkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(asdict(row)))


# ----------------------------------------------------------------------------- orchestration (in the parent)


@dataclass
class BenchPlan:
    run_dir: Path | None
    onnx: dict[str, Path]
    backends: list[str]
    skipped: dict[str, str]


def plan(model: Path | None, run: Path | None, backends: list[str], runs_dir: Path) -> BenchPlan:
    known = all_backends()
    unknown = [b for b in backends if b not in known]
    if unknown:
        raise DogkitError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if model is None and run is None:
        run = best_run(runs_dir, need="best.pt")  # the run every command takes by default
    run_dir = run or model_run(model, need="best.pt")
    onnx = {}
    if model is not None:
        onnx.update(dict.fromkeys((*base().backends, *MAPS_BACKENDS), model))  # every runtime on that very file
    files = {**backend_files(), **dict.fromkeys(MAPS_BACKENDS, base().file)}
    for name, file in files.items():
        if run_dir is not None and (run_dir / file).is_file():
            onnx.setdefault(name, run_dir / file)
    chosen, skipped = [], {}
    for b in backends:
        if b in files and b not in onnx:
            flag = v.flag if (v := by_backend(b)) else None  # the maps backends run the fp32 file
            skipped[b] = f"no {files[b]} (dogkit export{f' {flag}' if flag else ''})"
        elif (runtime := runtime_of(b)) and (why := RUNTIMES[runtime].missing()):
            skipped[b] = why
        elif b in TORCH_BACKENDS and not torch_available():
            skipped[b] = "PyTorch is not installed"
        elif b in TORCH_BACKENDS and run_dir is None:
            skipped[b] = "no run folder with best.pt (pass --run)"
        else:
            chosen.append(b)
    if not chosen:
        raise DogkitError("nothing to benchmark: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return BenchPlan(run_dir, onnx, chosen, skipped)


def run_worker(args: dict, timeout: float) -> Row:
    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]), MKL_NUM_THREADS=str(args["threads"]))
    # The PyTorch backends' worker is a module of the training job, named here and never imported: the ONNX
    # backends run without torch.
    module = TORCH_WORKER if args["backend"] in TORCH_BACKENDS else __name__
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == UNSUPPORTED:
        raise Unsupported(proc.stderr.strip().splitlines()[-1].removeprefix("unsupported: "))
    if proc.returncode != 0 or not lines:
        text = (proc.stderr or proc.stdout).strip()
        # a traceback gives its last line alone (its error), anything else its last three
        tail = one_line(text) if "Traceback (most recent call last)" in text else " | ".join(text.splitlines()[-3:])
        raise DogkitError(f"benchmark of {args['backend']} at batch {args['batch']} failed: {tail}")
    return Row(**json.loads(lines[-1]))


def machine() -> dict:
    info = {"dogkit": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus_available": available_cpus()}
    try:
        import onnxruntime

        from .runtime import GRAPH_OPTIMIZATION

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_graph_optimization"] = GRAPH_OPTIMIZATION
    except ImportError:
        pass
    import cv2

    info["opencv"] = cv2.__version__
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def unvalidated(path: Path | None, backend: str, device: str, metadata: dict | None = None) -> str | None:
    """Why a backend does not run its file (an INT8 model validated on ONNX Runtime's CPU provider only), or None.
    ``metadata``: the file's, when already read."""
    if path is None or by_backend(backend) is None:
        return None
    from .runtime import read_metadata, refuse_unvalidated

    runtime = runtime_of(backend)
    provider = ("CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider") \
        if runtime == "onnxruntime" else None
    try:
        refuse_unvalidated(path, read_metadata(path) if metadata is None else metadata, runtime, provider)
    except DogkitError as e:
        return str(e)
    return None


def measured_model(p: BenchPlan, classifier) -> dict:
    """What was measured, for the table's title and the JSON: the run or file, network, input size, classes."""
    from .runtime import META_PREFIX

    if classifier is not None:
        arch, size = classifier.metadata.get(META_PREFIX + "arch", "?"), classifier.spec.size
        classes = len(classifier.class_names)
    else:  # PyTorch backends alone: the run's saved settings (torch is only imported in the workers)
        config = read_json(p.run_dir / "config.json") if p.run_dir else None
        arch, size, classes = (config or {}).get("arch", "?"), (config or {}).get("image_size", "?"), None
    where = str(p.run_dir) if p.run_dir else str(classifier.path if classifier else "?")
    return {"where": where, "arch": arch, "image_size": size, "classes": classes,
            "what": f"{where} ({arch}, {size} px{f', {classes} classes' if classes else ''})"}


@dataclass(frozen=True)
class BenchSettings:
    """How ``bench`` times each configuration, checked where it is made: before any model is loaded."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    threads: int | None = None  # per backend (default: the CPUs available)
    device: str = "cpu"
    warmup: int = 3  # untimed runs
    min_runs: int = 10  # timed runs, at least
    min_time: float = 2.0  # seconds timed, at least

    def __post_init__(self) -> None:
        if not self.batch_sizes:
            raise SettingError("batch_sizes", "needs at least one batch size")
        for size in self.batch_sizes:
            if not whole(size, 1):
                raise SettingError("batch_sizes", f"must be whole numbers of at least 1, got {size!r}")
        at_least(self, 1, "threads", "min_runs")
        at_least(self, 0, "warmup")
        one_of(self, "device", ("cpu", "cuda"))
        within(self, "min_time", 0, 3600)


def bench(*, model: Path | None = None, run: Path | None = None, backends: list[str],
          batch_sizes: Sequence[int] = BenchSettings.batch_sizes, threads: int | None = None,
          device: str = BenchSettings.device, images: Path | None = None, warmup: int = BenchSettings.warmup,
          min_runs: int = BenchSettings.min_runs, min_time: float = BenchSettings.min_time,
          runs_dir: Path = DEFAULT_RUNS_DIR, timeout: float = 900) -> dict:
    BenchSettings(tuple(batch_sizes), threads, device, warmup, min_runs, min_time)
    p = plan(model, run, backends, runs_dir)
    from .runtime import OnnxClassifier

    # Each file loaded once here: one the runtime refuses is one line, not a failure per worker.
    loaded = {file: OnnxClassifier(file, threads=1) for file in dict.fromkeys(p.onnx[b] for b in p.backends
                                                                          if b in p.onnx)}
    metadata = {file: c.metadata for file, c in loaded.items()}
    subject = measured_model(p, next(iter(loaded.values()), None))
    log.info(f"benchmarking {escape(subject['what'])}")
    threads = threads or available_cpus()
    rows = []
    for backend in list(p.backends):
        path = p.onnx.get(backend)
        reason = unvalidated(path, backend, device, metadata.get(path))
        if reason:
            p.skipped[backend] = reason
            p.backends.remove(backend)
            log.warning(f"[yellow]{backend}: {escape(reason)}[/]")
    for backend in p.backends:
        for batch in batch_sizes:
            args = {"backend": backend, "batch": batch, "threads": threads, "device": device, "warmup": warmup,
                    "min_runs": min_runs, "min_time": min_time, "model": str(p.onnx.get(backend, "")),
                    "run": str(p.run_dir or "")}
            log.info(f"benchmarking {backend}, batch {batch}, {threads} threads …")
            try:
                rows.append(run_worker(args, timeout))
            except Unsupported as e:
                p.skipped[backend] = str(e)
                log.warning(f"[yellow]{backend}: {escape(str(e))}[/]")
                break
    if images is not None:
        for backend in [b for b in p.backends if b in ort_backends()]:
            batch = max(batch_sizes)
            args = {"backend": backend, "batch": batch, "threads": threads, "device": device,
                    "model": str(p.onnx[backend]), "images": str(images)}
            log.info(f"end to end: {backend} over {escape(str(images))} …")
            rows.append(run_worker(args, timeout))
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": machine(), "threads": threads, "device": device, "run": str(p.run_dir) if p.run_dir else None,
            "model": subject,
            "skipped": p.skipped, "rows": [asdict(r) for r in rows]}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Measured {result['date']} with `{result['command']}`",
        "",
        f"Machine: {m.get('cpu', m['processor'])}, {m['cpus_available']} CPUs available, {m['platform']}; "
        f"Python {m['python']}, ONNX Runtime {m.get('onnxruntime', '-')} "
        f"({m.get('onnxruntime_graph_optimization', 'ORT_ENABLE_ALL')}), OpenCV {m.get('opencv', '-')}, "
        f"PyTorch {m.get('torch', '-')}, dogkit {m['dogkit']}; {result['threads']} threads, device {result['device']}.",
        "",
        f"Model: {result['model']['what']}." if "model" in result else "",
        "",
        "| backend | what ran | batch | p50 ms | p90 ms | p99 ms | images/s | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['backend']}{' (end to end)' if r['end_to_end'] else ''} | {r['variant']} | {r['batch']} | "
                     f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['peak_mem_mb']:.0f} |")
    for backend, why in result["skipped"].items():
        lines.append(f"\nSkipped {backend}: {why}.")
    return "\n".join(lines) + "\n"


def save(result: dict, json_path: Path | None, markdown_path: Path | None) -> None:
    if json_path:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    if markdown_path:
        atomic_write_text(markdown_path, markdown(result))


if __name__ == "__main__":
    worker_main(worker)
