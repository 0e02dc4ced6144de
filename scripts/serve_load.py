"""Load test of `dogkit serve`, with the model-only figures it is judged against, in one run.

    python scripts/serve_load.py artifacts/runs/exp1-resnet50/model.onnx --rounds 3 --seconds 15
    python scripts/serve_load.py MODEL --images photos/ --concurrency 1,8,64 --serve "--max-wait-ms 2"

Each round measures, back to back:
1. model only: `dogkit bench`'s ONNX Runtime rows at batch 1 and 32 (a process of its own, the same
   thread count as the server);
2. the server (`dogkit serve` on 127.0.0.1, a free port, a process of its own, started once) under
   closed-loop traffic: at each concurrency, that many clients each send one photo (raw JPEG body),
   wait for the answer and send the next, for --seconds after a short warm-up. Requests never leave
   127.0.0.1; the clients run in this process (one asyncio loop, httpx), on the same CPUs as the server.
Decode + preprocess of one photo (one thread, as the server does it) is measured once.

The targets are ratios within a round, so that a machine whose speed drifts (shared CPUs) compares
figures taken seconds apart: images/s at the highest concurrency over the model's batch-32 images/s
(≥ 0.8), and p50 at concurrency 1 over batch-1 latency plus decode (≤ 1.2). The table shows the
median of each figure over the rounds, and the ratios of every round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from dogkit.bench import bench
from dogkit.images import rgb_from_bytes
from dogkit.predict import collect_paths
from dogkit.runs import best_run
from dogkit.runtime import OnnxClassifier
from dogkit.scan import available_cpus

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "stanford-dogs-sample" / "Images"


def model_only(model: Path, min_time: float) -> dict[int, dict]:
    result = bench(model=model, backends=["onnx"], batch_sizes=[1, 32], min_time=min_time)
    return {row["batch"]: row for row in result["rows"]}


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
    """``concurrency`` clients, each one request at a time on its own keep-alive connection (one pool of
    many connections costs httpx more per request); latencies of the requests sent in the timed window."""
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()
    timed_from, stop_at = start + warmup, start + warmup + seconds

    async def user(k: int) -> None:
        nonlocal failures
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1)) as client:
            i = k
            while (sent := time.perf_counter()) < stop_at:
                response = await client.post("/predict", content=photos[i % len(photos)],
                                             headers={"content-type": "image/jpeg"})
                i += concurrency
                if sent >= timed_from:
                    latencies.append(time.perf_counter() - sent)
                    failures += response.status_code != 200

    before = httpx.get(url + "/health").json()
    await asyncio.gather(*(user(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - timed_from
    after = httpx.get(url + "/health").json()
    ms = 1000 * np.asarray(latencies)
    calls, images = after["model_calls"] - before["model_calls"], after["images_run"] - before["images_run"]
    return {"concurrency": concurrency, "requests": len(latencies), "failures": failures,
            "requests_per_s": len(latencies) / elapsed, "images_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_batch": images / max(calls, 1)}


def median(values: list[float]) -> float:
    return float(np.median(values))


def round_ratios(rows: list[dict], model_rows: dict[int, dict], decode: float) -> tuple[float, float]:
    """(images/s at the highest concurrency / model-only batch 32, p50 at the lowest / (batch 1 + decode))."""
    return (rows[-1]["images_per_s"] / model_rows[32]["images_per_s"],
            rows[0]["p50_ms"] / (model_rows[1]["p50_ms"] + decode))


def table(rounds: list[tuple[list[dict], dict[int, dict]]], decode: float) -> str:
    lines = ["| load (median of rounds) | requests/s | images/s | p50 ms | p99 ms | mean batch |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, first in enumerate(rounds[0][0]):
        col = {key: median([rows[k][key] for rows, _ in rounds]) for key in first}
        lines.append(f"| serve, concurrency {first['concurrency']} | {col['requests_per_s']:.1f} | "
                     f"{col['images_per_s']:.1f} | {col['p50_ms']:.1f} | {col['p99_ms']:.1f} | "
                     f"{col['mean_batch']:.1f} |")
    for batch in (1, 32):
        col = {key: median([m[batch][key] for _, m in rounds]) for key in ("images_per_s", "p50_ms", "p99_ms")}
        lines.append(f"| model only (`dogkit bench`), batch {batch} | | {col['images_per_s']:.1f} | "
                     f"{col['p50_ms']:.1f} | {col['p99_ms']:.1f} | {batch} |")
    lines.append(f"| decode + preprocess, one photo | | | {decode:.1f} | | |")
    ratios = [round_ratios(rows, m, decode) for rows, m in rounds]
    throughput, latency = median([r[0] for r in ratios]), median([r[1] for r in ratios])
    top, one = rounds[0][0][-1]["concurrency"], rounds[0][0][0]["concurrency"]
    met = {True: "met", False: "NOT met"}
    lines += ["", f"- images/s at concurrency {top} / model-only batch 32: **{throughput:.2f}** (median; rounds: "
              f"{', '.join(f'{r[0]:.2f}' for r in ratios)}; target ≥ 0.80: {met[throughput >= 0.8]})",
              f"- p50 at concurrency {one} / (batch-1 latency + decode): **{latency:.2f}** (median; rounds: "
              f"{', '.join(f'{r[1]:.2f}' for r in ratios)}; target ≤ 1.20: {met[latency <= 1.2]})",
              f"- failed requests: {sum(r['failures'] for rows, _ in rounds for r in rows)} of "
              f"{sum(r['requests'] for rows, _ in rounds for r in rows)}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="ONNX model (default: the best exported run's)")
    parser.add_argument("--images", type=Path, default=SAMPLE, help="photos to send (default: the test sample)")
    parser.add_argument("--photos", type=int, default=64, help="how many of them")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=3, help="model-only and server measurements, interleaved")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per concurrency and round")
    parser.add_argument("--warmup", type=float, default=3.0, help="untimed seconds before each")
    parser.add_argument("--min-time", type=float, default=4.0, help="seconds per model-only measurement")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--serve", default="", help='options for dogkit serve, e.g. "--max-batch 16 --max-wait-ms 2"')
    args = parser.parse_args()
    model = args.model or best_run(need="model.onnx") / "model.onnx"
    photos = [p.read_bytes() for p in collect_paths([str(args.images)])[: args.photos]]
    print(f"{available_cpus()} CPUs; {len(photos)} photos from {args.images}", file=sys.stderr)
    decode = decode_ms(model, photos)
    proc, url = start_server(model, shlex.split(args.serve))
    rounds = []
    try:
        for k in range(args.rounds):
            print(f"round {k + 1} of {args.rounds}", file=sys.stderr)
            model_rows = model_only(model, args.min_time)
            rows = [asyncio.run(closed_loop(url, photos, int(c), args.seconds, args.warmup))
                    for c in args.concurrency.split(",")]
            rounds.append((rows, model_rows))
            print(f"  ratios {round_ratios(rows, model_rows, decode)}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    text = table(rounds, decode)
    print(f"\n`python {' '.join(sys.argv)}`\n\n{text}")
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
