"""PyTorch backends for ``dogkit bench``: a run's ``best.pt`` timed as PyTorch runs it at its best.

``dogkit.deploy.bench`` owns the measurement and runs this module as the worker process of a torch backend
(``python -m dogkit.training.bench ARGS``) without importing it, so benchmarking the ONNX backends never needs
PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..deploy.bench import Row, make_row, peak_rss_mb, time_runs, worker_main
from .checkpoint import load_best
from .device import autocast_dtype
from .models import NHWCInput


def bench_torch(run_dir: Path, backend: str, batch: int, threads: int, device: str, warmup: int, min_runs: int,
                min_time: float) -> Row:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    model, ckpt, _ = load_best(run_dir)
    size = ckpt["preprocess"]["size"]
    # PyTorch at its best: channels_last, inference_mode, bf16 autocast where the hardware has it.
    model = NHWCInput(model.to(dev, memory_format=torch.channels_last)).eval()
    dtype = None if backend == "torch" else autocast_dtype("auto", dev)
    if backend == "torch-compile":
        model = torch.compile(model)
        warmup = max(warmup, 3)  # the first calls compile
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=dev)

    def run():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_runs(run, warmup, min_runs, min_time)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else peak_rss_mb()
    precision = "bf16 autocast" if dtype == torch.bfloat16 else "fp16 autocast" if dtype == torch.float16 else "fp32"
    compiled = ", torch.compile" if backend == "torch-compile" else ""
    return make_row(backend, f"channels_last, {precision}{compiled}", batch, threads, device, times, peak)


def worker(args: dict) -> Row:
    return bench_torch(Path(args["run"]), args["backend"], args["batch"], args["threads"], args["device"],
                       args["warmup"], args["min_runs"], args["min_time"])


if __name__ == "__main__":
    worker_main(worker)
