"""Training throughput on this machine: the train step alone (random uint8 batches) and the data
loader alone (real images, training augmentation), so the loader design rests on numbers.

    python scripts/train_throughput.py --data artifacts/data/stanford-dogs --sizes 112,224
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dogkit.data import AugmentFn, ManifestImages, find_cache, make_loader, train_augment
from dogkit.dataset import load_dataset
from dogkit.models import build_model
from dogkit.preprocess import PreprocessSpec
from dogkit.train import to_input


def step_throughput(arch: str, size: int, batch: int, dtype: torch.dtype | None, steps: int) -> float:
    spec = PreprocessSpec.for_size(size)
    model = build_model(arch, 120, spec=spec).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    y = torch.randint(0, 120, (batch,))

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(to_input(x, torch.device("cpu"), True)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def loader_throughput(data: str, size: int, batch: int, workers: int, cached: bool, batches: int) -> float:
    dataset = load_dataset(data)
    spec = PreprocessSpec.for_size(size)
    cache = find_cache(dataset, dataset.crop, size) if cached else None
    if cached and cache is None:
        raise SystemExit(f"no current cache >= {size}px in {data}; run `dogkit prepare --cache {size}` first")
    images = ManifestImages(dataset, dataset.split("train"), AugmentFn(train_augment(spec, "light")), dataset.crop,
                            cache)
    seen, start = 0, None
    for i, (x, _) in enumerate(make_loader(images, batch, shuffle=True, workers=workers)):
        if i == 1:  # the first batch pays for starting the workers
            start, seen = time.perf_counter(), 0
        if i > batches:
            break
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="artifacts/data/stanford-dogs")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--sizes", default="112,224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batches", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| step | size | precision | img/s |\n|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            rate = step_throughput(args.arch, size, args.batch, dtype, args.steps)
            print(f"| {args.arch} train step, channels_last | {size} | {name} | {rate:.1f} |", flush=True)
    print("\n| loader | size | workers | img/s |\n|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        for workers in map(int, args.workers.split(",")):
            for cached in (False, True):
                rate = loader_throughput(args.data, size, args.batch, workers, cached, args.batches)
                source = "prepare cache" if cached else "JPEG decode"
                print(f"| {source} + augmentation | {size} | {workers} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
