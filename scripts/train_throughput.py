"""Training throughput on this machine, CPU or CUDA: the bare train step (the limit) beside `dogkit train`
for each regime, and the data loader alone, so the training loop and the loader design rest on numbers.

    python scripts/train_throughput.py --data artifacts/data/stanford-dogs --sizes 112,224
    python scripts/train_throughput.py --device cuda --batch 64 --steps 50 --compile-mode reduce-overhead
    python scripts/train_throughput.py --device cuda --sizes 112 --batch 64 --exps '' --workers '' \
        --compile-mode reduce-overhead --compile-exps 1,2,3 --json graphs.json   # as scripts/gpu_check.py does

- bare step: ResNet50 on random uint8 batches already on the device (channels_last, the autocast dogkit
  picks, Adam), timed between device synchronisations;
- exp 1 / 2 / 3: real `Trainer` epochs of each preset (random initial weights: speed does not depend on
  them), capped at --steps optimizer steps; the img/s is the one the run reports for its second epoch
  (the first pays for warm-up and starting the loader workers);
- loader: real images through the training augmentation at 0, 1, 2 … workers, from the prepare cache
  and from JPEG decoding.

A measurement that fails (a compile error, say) is printed and kept as its error; the others still run.
--json writes every figure with the wall-clock window of its timed part (to line it up with GPU utilisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dogkit.data.dataset import load_dataset
from dogkit.deploy.preprocess import PreprocessSpec
from dogkit.training.averaging import MAX_CHUNKS
from dogkit.training.config import resolve_config
from dogkit.training.device import autocast_dtype, resolve_device, to_input
from dogkit.training.loaders import ManifestImages, find_cache, make_loader
from dogkit.training.models import build_model
from dogkit.training.trainer import Trainer
from dogkit.training.transforms import AugmentFn, train_augment


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_throughput(arch: str, size: int, batch: int, device: torch.device, dtype: torch.dtype | None, steps: int,
                    compile_mode: str | None = None) -> tuple[float, float, float]:
    """img/s of ``steps`` timed steps, and the wall-clock window they ran in."""
    spec = PreprocessSpec.for_size(size)
    model = build_model(arch, 120, spec=spec).to(device).to(memory_format=torch.channels_last).train()
    if compile_mode == "reduce-overhead" and device.type != "cuda":
        compile_mode = "default"  # as dogkit train does: CUDA graphs need a GPU
    graphs = compile_mode is not None and compile_mode != "default" and device.type == "cuda"
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **({"capturable": True} if graphs else {}))
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    y = torch.randint(0, 120, (batch,), device=device)

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(to_input(x, device, True)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(8 if device.type == "cuda" else 2):
        step()
    synchronize(device)
    window, start = time.time(), time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start), window, time.time()


def train_throughput(data: str, exp: int, arch: str, size: int, batch: int, device: str, steps: int,
                     workers: int | None, compile_mode: str | None) -> tuple[float, float, float]:
    """img/s of the second of two real training epochs, as `dogkit train` reports it in metrics.csv, and the
    wall-clock window of that epoch."""
    settings = {"data": data, "arch": arch, "pretrained": False, "image_size": size, "batch_size": batch,
                "epochs": 2, "max_steps_per_epoch": steps, "device": device, "workers": workers,
                "avg_bn_images": 64}
    if compile_mode:
        settings.update({"compile": True, "compile_mode": compile_mode})
    cfg = resolve_config(exp, None, settings)
    # Epochs this short cannot hold M = 1000 iterates in the copies allowed; a step's cost does not depend on M.
    cfg = dataclasses.replace(cfg, avg_window=min(cfg.avg_window, (MAX_CHUNKS - 1) * steps))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        rows = []
        for _ in range(2):
            window = time.time()
            rows.append(trainer.train_epoch())
    return rows[-1]["img_per_s"], window, time.time()


def loader_throughput(data: str, size: int, batch: int, workers: int, cached: bool, augment: str,
                      batches: int) -> tuple[float, float, float]:
    dataset = load_dataset(data)
    spec = PreprocessSpec.for_size(size)
    cache = find_cache(dataset, dataset.crop, size) if cached else None
    if cached and cache is None:
        raise SystemExit(f"no current cache >= {size}px in {data}; run `dogkit prepare --cache {size}` first")
    images = ManifestImages(dataset, dataset.split("train"), AugmentFn(train_augment(spec, augment)), dataset.crop,
                            cache)
    loader = make_loader(images, batch, shuffle=True, workers=workers, persistent=True)
    seen, start, epoch = 0, None, 0
    while True:  # several epochs when the split is small: persistent workers serve them all
        loader.batch_sampler.set_epoch(epoch)
        for x, _ in loader:
            if start is None:  # the first batch pays for starting the workers
                window, start = time.time(), time.perf_counter()
                continue
            seen += len(x)
            if seen >= batches * batch:
                return seen / (time.perf_counter() - start), window, time.time()
        epoch += 1


class Results(list):
    """The figures measured so far, rewritten to ``path`` (if any) after each one: a run stopped at a time limit
    keeps what it measured."""

    def __init__(self, path: Path | None, machine: dict):
        super().__init__()
        self.path, self.machine = path, machine

    def add(self, record: dict) -> None:
        self.append(record)
        if self.path is not None:
            self.path.write_text(json.dumps({"machine": self.machine, "results": self}, indent=2) + "\n")


def timed(results: Results, labels: dict, work, *args) -> float:
    """Run ``work(*args)`` (img/s and the wall-clock window of the timed part), keep it in ``results`` with that window
    and the whole measurement's (to line them up with GPU utilisation sampled beside it; the difference is the
    warm-up) and return the img/s. A measurement that fails is kept as its error (nan returned), so that the ones
    after it still run."""
    begin = time.time()
    try:
        rate, timed_start, timed_end = work(*args)
    except Exception as e:  # a compile or CUDA failure in one configuration is a finding, not the end
        results.add({**labels, "error": f"{type(e).__name__}: {str(e)[:500]}", "start": begin, "end": time.time()})
        print(f"{labels}: failed: {type(e).__name__}: {e}", flush=True)
        return float("nan")
    results.add({**labels, "img_per_s": round(rate, 1), "start": begin, "end": time.time(),
                 "timed_start": timed_start, "timed_end": timed_end})
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="artifacts/data/stanford-dogs")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--sizes", default="112,224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--exps", default="1,2,3", help="regimes to train ('' for none)")
    parser.add_argument("--train-workers", type=int, default=None, help="loader workers in training "
                        "(default: dogkit's)")
    parser.add_argument("--compile-mode", default=None, help="also time torch.compile in this mode "
                        "(default, reduce-overhead, max-autotune)")
    parser.add_argument("--compile-exps", default="1", help="regimes also trained with --compile (with "
                        "--compile-mode; '' for the bare step alone)")
    parser.add_argument("--no-bare", action="store_true", help="leave out the eager bare step (a loader-only "
                        "run)")
    parser.add_argument("--workers", default="0,1,2", help="loader workers to time ('' for no loader table)")
    parser.add_argument("--augments", default="light", help="light and/or strong")
    parser.add_argument("--batches", type=int, default=40, help="batches per loader measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here, each with its "
                        "wall-clock start and end")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = autocast_dtype("auto", device)
    # As `dogkit train` does unless asked to be deterministic: the bare step gets the same convolution search.
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device} ({name}), autocast {dtype}, batch {args.batch}, {args.steps} steps")
    results = Results(args.json, {"torch": torch.__version__, "device": str(device), "device_name": name,
                                  "autocast": str(dtype), "arch": args.arch, "steps": args.steps,
                                  "train_workers": args.train_workers})
    exps = [int(e) for e in args.exps.split(",") if e]
    if not args.no_bare or exps or args.compile_mode:
        step_table(args, device, dtype, exps, results)
    if args.workers:
        loader_table(args, results)


def step_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None, exps: list[int],
               results: Results) -> None:
    """The bare step (eager, then compiled) beside `dogkit train` for each regime, a row per size."""
    compiled_exps = [int(e) for e in args.compile_exps.split(",") if e] if args.compile_mode else []
    compiled = ([f"bare step compiled ({args.compile_mode})"] if args.compile_mode else []) + \
        [f"train --exp {e} --compile" for e in compiled_exps]
    head = ["size", "bare step", *compiled, *(f"train --exp {e}" for e in exps)]
    ratios = [f"exp {e} / bare" for e in exps] + (["exp 2 / exp 1"] if {1, 2} <= set(exps) else [])
    print("\n| " + " | ".join(head + ratios) + " |\n|" + "---|" * (len(head) + len(ratios)), flush=True)
    for size in map(int, args.sizes.split(",")):
        common = {"size": size, "batch": args.batch}
        bare = float("nan") if args.no_bare else timed(
            results, {"what": "bare step", **common}, step_throughput, args.arch, size, args.batch, device, dtype,
            args.steps)
        cells = [f"{bare:.1f}"]
        if args.compile_mode:
            rate = timed(results, {"what": "bare step", "compile_mode": args.compile_mode, **common}, step_throughput,
                         args.arch, size, args.batch, device, dtype, args.steps, args.compile_mode)
            cells.append(f"{rate:.1f}")
            for e in compiled_exps:
                rate = timed(results, {"what": "train", "exp": e, "compile_mode": args.compile_mode, **common},
                             train_throughput, args.data, e, args.arch, size, args.batch, str(device), args.steps,
                             args.train_workers, args.compile_mode)
                cells.append(f"{rate:.1f}")
        train = {e: timed(results, {"what": "train", "exp": e, **common}, train_throughput, args.data, e, args.arch,
                          size, args.batch, str(device), args.steps, args.train_workers, None) for e in exps}
        cells += [f"{train[e]:.1f}" for e in exps]
        cells += [f"{train[e] / bare:.0%}" for e in exps]
        if {1, 2} <= set(exps):
            cells.append(f"{train[2] / train[1]:.0%}")
        print(f"| {size} | " + " | ".join(cells) + " |", flush=True)


def loader_table(args: argparse.Namespace, results: Results) -> None:
    """The training loader alone for every size, augmentation, source and worker count asked for."""
    print("\n| loader | augmentation | size | workers | img/s |\n|---|---|---|---|---|")
    sizes, workers_counts = map(int, args.sizes.split(",")), map(int, args.workers.split(","))
    for size, augment, cached, workers in itertools.product(sizes, args.augments.split(","), (True, False),
                                                            workers_counts):
        source = "prepare cache" if cached else "JPEG decode"
        labels = {"what": "loader", "source": source, "augment": augment, "size": size, "batch": args.batch,
                  "workers": workers}
        rate = timed(results, labels, loader_throughput, args.data, size, args.batch, workers, cached, augment,
                     args.batches)
        print(f"| {source} | {augment} | {size} | {workers} | {rate:.0f} |", flush=True)

if __name__ == "__main__":
    main()
