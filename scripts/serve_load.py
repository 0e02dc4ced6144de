"""Load test of `dogkit serve`, with the model-only figures it is judged against, in one run.

    python scripts/serve_load.py artifacts/runs/exp1-resnet50/model.onnx --rounds 5 --seconds 8
    python scripts/serve_load.py MODEL --images photos/ --concurrency 1,8,64 --serve "--max-wait-ms 2"

- the server: `dogkit serve` on 127.0.0.1 (a free port, a process of its own) under closed-loop
  traffic: at each concurrency, that many clients each send one photo (raw JPEG body) on a
  keep-alive connection of its own, wait for the answer and send the next, for --seconds after a
  short warm-up. Requests never leave 127.0.0.1; the clients run in this process (one asyncio loop,
  httpx), on the same CPUs as the server.
- model only: `dogkit bench`'s measurement of the ONNX backend (the same OnnxClassifier, random uint8
  batches, warm-up and timing loop, all CPUs), at batch 32 and batch 1, in a process of its own that
  stays up between windows.
- decode: decode + preprocess of one photo (median over the photos, one thread), as the server does it.

The targets are ratios: images/s at the highest concurrency over the model's batch-32 images/s
(≥ 0.8), and p50 at the lowest concurrency over batch-1 latency plus decode (≤ 1.2). On shared CPUs
the machine's speed drifts by more than the effects measured, so each server window runs right
after its model-only window (batch 32 before the highest concurrency, batch 1 before the lowest),
each pair gives one ratio, and --rounds of them give the median. The table shows the median of each
figure over the rounds; "model busy" is the share of a server window that ONNX Runtime was running
(from /health's model_seconds, counted when a call ends, so a window can read a little over 100 %):
near 100 % with images/s below the model-only figure means the model ran slower beside the HTTP,
decoding and client work, not that it waited for images.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from dogkit.data.images import rgb_from_bytes
from dogkit.deploy.predict import collect_paths
from dogkit.deploy.runtime import OnnxClassifier
from dogkit.runs import exported_model
from dogkit.system import available_cpus

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "stanford-dogs-sample" / "Images"


MODEL_WORKER = """
import json, sys
import numpy as np
from dogkit.deploy.bench import time_runs
from dogkit.deploy.runtime import OnnxClassifier
from dogkit.system import available_cpus
model = OnnxClassifier(sys.argv[1], threads=available_cpus())
inputs = {}
for line in sys.stdin:
    batch, seconds = json.loads(line)
    size = model.spec.size
    x = inputs.setdefault(batch, np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    times = time_runs(lambda: model.run(x), 3, 10, seconds)
    print(json.dumps({"batch": batch, "images_per_s": batch * len(times) / float(times.sum()),
                      "p50_ms": 1000 * float(np.percentile(times, 50)),
                      "p99_ms": 1000 * float(np.percentile(times, 99))}), flush=True)
"""


class ModelOnly:
    """`dogkit bench`'s ONNX measurement in a process that stays up, so that it can alternate with the server."""

    def __init__(self, model: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", MODEL_WORKER, str(model)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def measure(self, batch: int, seconds: float) -> dict:
        self.proc.stdin.write(json.dumps([batch, seconds]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the model-only process died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def decode_ms(model: Path, photos: list[bytes]) -> float:
    """Median decode + preprocess of one photo, one thread: the work a lone request adds to the model."""
    classifier = OnnxClassifier(model, threads=1)
    times = []
    for data in photos:
        start = time.perf_counter()
        classifier.preprocess(rgb_from_bytes(data))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def start_server(model: Path, options: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "dogkit", "serve", str(model), "--host", "127.0.0.1", "--port", "0",
                             *options], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        print(line, end="", file=sys.stderr)
        if line.startswith("dogkit serve: http://"):
            url = line.split()[2]
            break
    else:
        raise SystemExit("dogkit serve did not start")
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit("dogkit serve did not become ready")


async def closed_loop(url: str, photos: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict:
    """``concurrency`` clients, each one request at a time on a keep-alive connection of its own (one pool of
    many connections costs httpx more per request). Counted: the requests that complete inside the timed
    window, not the ramp-up before it nor the drain after it."""
    done: list[tuple[float, float, int]] = []  # (sent, answered, status)
    start = time.perf_counter()
    timed_from, stop_at = start + warmup, start + warmup + seconds

    async def user(k: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1)) as client:
            i = k
            while (sent := time.perf_counter()) < stop_at:
                response = await client.post("/predict", content=photos[i % len(photos)],
                                             headers={"content-type": "image/jpeg"})
                done.append((sent, time.perf_counter(), response.status_code))
                i += concurrency

    async def health_at(moment: float) -> dict:
        await asyncio.sleep(max(0.0, moment - time.perf_counter()))
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return {"t": time.perf_counter(), **(await client.get("/health")).json()}

    before, after, *_ = await asyncio.gather(health_at(timed_from), health_at(stop_at),
                                             *(user(k) for k in range(concurrency)))
    timed = [(sent, answered, status) for sent, answered, status in done if timed_from <= answered < stop_at]
    ms = 1000 * np.asarray([answered - sent for sent, answered, _ in timed])
    calls, images = after["model_calls"] - before["model_calls"], after["images_run"] - before["images_run"]
    return {"concurrency": concurrency, "requests": len(timed), "failures": sum(s != 200 for *_, s in timed),
            "requests_per_s": len(timed) / seconds, "images_per_s": len(timed) / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_batch": images / max(calls, 1),
            "model_busy": (after["model_seconds"] - before["model_seconds"]) / (after["t"] - before["t"])}


def median(values: list[float]) -> float:
    return float(np.median(values))


def table(rows: dict[int, list[dict]], model_rows: dict[int, list[dict]], decode: float,
          ratios: dict[str, list[float]]) -> str:
    lines = ["| load (median of rounds) | requests/s | images/s | p50 ms | p99 ms | mean batch | model busy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c, runs in rows.items():
        col = {key: median([r[key] for r in runs]) for key in runs[0]}
        lines.append(f"| serve, concurrency {c} | {col['requests_per_s']:.1f} | {col['images_per_s']:.1f} | "
                     f"{col['p50_ms']:.1f} | {col['p99_ms']:.1f} | {col['mean_batch']:.1f} | {col['model_busy']:.0%} |")
    for batch, runs in sorted(model_rows.items()):
        col = {key: median([r[key] for r in runs]) for key in runs[0]}
        lines.append(f"| model only (`dogkit bench`'s measurement), batch {batch} | | {col['images_per_s']:.1f} | "
                     f"{col['p50_ms']:.1f} | {col['p99_ms']:.1f} | {batch} | |")
    lines.append(f"| decode + preprocess, one photo | | | {decode:.1f} | | | |")
    met = {True: "met", False: "NOT met"}
    top, one = max(rows), min(rows)
    tp, lat = median(ratios["throughput"]), median(ratios["latency"])
    lines += ["", f"- images/s at concurrency {top} / model-only batch 32: **{tp:.2f}** (median; rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios['throughput'])}; target ≥ 0.80: {met[tp >= 0.8]})",
              f"- p50 at concurrency {one} / (batch-1 latency + decode): **{lat:.2f}** (median; rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios['latency'])}; target ≤ 1.20: {met[lat <= 1.2]})",
              f"- failed requests: {sum(r['failures'] for runs in rows.values() for r in runs)} of "
              f"{sum(r['requests'] for runs in rows.values() for r in runs)}"]
    return "\n".join(lines)


def measure(url: str, photos: list[bytes], worker: ModelOnly, levels: list[int], args) -> tuple:
    """Rounds of: for each concurrency, its model-only window (if it has one), then the server's window."""
    rows: dict[int, list[dict]] = {c: [] for c in levels}
    model_rows: dict[int, list[dict]] = {1: [], 32: []}
    ratios: dict[str, list[float]] = {"throughput": [], "latency": []}
    decode = decode_ms(args.model_path, photos)
    for k in range(args.rounds):
        for c in levels:
            batch = 32 if c == max(levels) else 1 if c == min(levels) else None
            base = worker.measure(batch, args.min_time) if batch else None
            row = asyncio.run(closed_loop(url, photos, c, args.seconds, args.warmup))
            rows[c].append(row)
            if batch == 32:
                model_rows[32].append(base)
                ratios["throughput"].append(row["images_per_s"] / base["images_per_s"])
            elif batch == 1:
                model_rows[1].append(base)
                ratios["latency"].append(row["p50_ms"] / (base["p50_ms"] + decode))
        print(f"round {k + 1} of {args.rounds}: throughput ratio {ratios['throughput'][-1]:.2f}, latency ratio "
              f"{ratios['latency'][-1]:.2f}", file=sys.stderr)
    return rows, model_rows, decode, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="ONNX model (default: the best exported run's)")
    parser.add_argument("--images", type=Path, default=SAMPLE, help="photos to send (default: the test sample)")
    parser.add_argument("--photos", type=int, default=64, help="how many of them")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=5, help="model-only and server windows, interleaved")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per concurrency and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each server window")
    parser.add_argument("--min-time", type=float, default=6.0, help="seconds per model-only window")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--serve", default="", help='options for dogkit serve, e.g. "--max-batch 16 --max-wait-ms 2"')
    args = parser.parse_args()
    args.model_path = args.model or exported_model(None)
    photos = [p.read_bytes() for p in collect_paths([str(args.images)])[: args.photos]]
    levels = sorted(int(c) for c in args.concurrency.split(","))
    print(f"{available_cpus()} CPUs; {len(photos)} photos from {args.images}", file=sys.stderr)
    worker = ModelOnly(args.model_path)
    proc, url = start_server(args.model_path, shlex.split(args.serve))
    try:
        text = table(*measure(url, photos, worker, levels, args))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        worker.close()
    print(f"\n`python {' '.join(sys.argv)}`\n\n{text}")
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
