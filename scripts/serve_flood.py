"""`dogkit serve` under a flood of hostile clients, beside one honest client: its memory and the honest throughput.

    python scripts/serve_flood.py MODEL                       # the full scale: 50-megapixel bombs, default budgets
    python scripts/serve_flood.py MODEL --megapixels 4 --serve "--decode-budget-mb 48 --body-budget-mb 16"

One process runs `dogkit serve` on 127.0.0.1; this one runs every client (threads and raw sockets). The honest
client sends one small JPEG at a time on a keep-alive connection, first alone for --seconds (its unloaded rate),
then again while the flood runs:

- bombs: --bomb-clients clients, each sending requests of 16 PNGs of --megapixels each (all zeros: a few hundred
  kB that decode to megapixels × 3 bytes), one request after another;
- slow bodies: --slow clients declaring a --slow-mb body and sending 64 bytes of it every 0.2 s;
- slow headers: --slow clients sending one header line every 0.2 s, never finishing;
- idle: --idle connections that send nothing.

Reported (JSON on stdout): the honest client's requests per second alone and under the flood and their ratio,
its failed requests (anything but 200), the server's peak resident memory (VmHWM), and how many of the idle and
slow connections the server had closed by the end (its header and body timeouts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "stanford-dogs-sample" / "Images"


def zeros_png(megapixels: float) -> bytes:
    """A valid RGB PNG of zeros: ``megapixels`` million pixels in a few hundred kB."""
    width = 10_000 if megapixels >= 10 else 2_000
    height = max(1, int(megapixels * 1e6 / width))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row, parts = zlib.compressobj(6), b"\x00" * (3 * width + 1), []
    for start in range(0, height, 256):
        parts.append(comp.compress(row * min(256, height - start)))
    parts.append(comp.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def start_server(model: Path, options: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "dogkit", "serve", str(model), "--port", "0", *options],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("dogkit serve: http://"):
            url = line.split()[2]
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            for _ in range(200):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        return proc, url, lines
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
    proc.kill()
    raise SystemExit("dogkit serve did not start:\n" + "".join(lines))


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def honest(url: str, photo: bytes, seconds: float) -> dict:
    """One client, one request at a time: requests per second and every answer that was not a 200."""
    failures: list[str] = []
    done = 0
    with httpx.Client(timeout=60) as client:
        end = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < end:
            try:
                r = client.post(url + "/predict", content=photo, headers={"content-type": "image/jpeg"})
                if r.status_code == 200:
                    done += 1
                else:
                    failures.append(f"{r.status_code} {r.text[:120]}")
            except httpx.HTTPError as e:
                failures.append(f"{type(e).__name__}: {e}")
        elapsed = time.perf_counter() - start
    return {"requests_per_s": done / elapsed, "failures": failures}


class Flood:
    """The hostile clients, started together and stopped together."""

    def __init__(self, url: str, args):
        self.host, self.port = url.removeprefix("http://").rsplit(":", 1)
        self.url, self.args = url, args
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sockets: dict[str, list[socket.socket]] = {"idle": [], "slow_headers": [], "slow_bodies": []}
        self.bomb_answers: list[int] = []
        bomb = zeros_png(args.megapixels)
        self.bomb_files = [("files", (f"bomb{i}.png", bomb, "image/png")) for i in range(16)]

    def _connect(self) -> socket.socket:
        return socket.create_connection((self.host, int(self.port)), timeout=5)

    def start(self) -> None:
        for _ in range(self.args.idle):
            self.sockets["idle"].append(self._connect())
        for _ in range(self.args.slow):
            self.sockets["slow_headers"].append(self._connect())
            s = self._connect()
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: image/png\r\n"
                      f"Content-Length: {int(self.args.slow_mb * 2**20)}\r\n\r\n".encode())
            self.sockets["slow_bodies"].append(s)
        self.threads.append(threading.Thread(target=self._trickle, daemon=True))
        self.threads += [threading.Thread(target=self._bombs, daemon=True) for _ in range(self.args.bomb_clients)]
        for t in self.threads:
            t.start()

    def _trickle(self) -> None:
        first = b"POST /predict HTTP/1.1\r\nHost: " + self.host.encode() + b"\r\n"
        for s in self.sockets["slow_headers"]:
            self._send(s, first)
        k = 0
        while not self.stop.wait(0.2):
            k += 1
            for s in self.sockets["slow_headers"]:
                self._send(s, f"X-Slow-{k}: {k}\r\n".encode())
            for s in self.sockets["slow_bodies"]:
                self._send(s, b"\0" * 64)

    @staticmethod
    def _send(s: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):  # closed by the server: what its timeouts are for
            s.sendall(data)

    def _bombs(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    self.bomb_answers.append(client.post(self.url + "/predict", files=self.bomb_files).status_code)
                except httpx.HTTPError:
                    self.bomb_answers.append(0)

    def closed_by_server(self) -> dict[str, str]:
        """For each kind of stalled connection: how many the server has closed."""
        out = {}
        for kind, socks in self.sockets.items():
            closed = 0
            for s in socks:
                s.setblocking(False)
                try:
                    while True:
                        data = s.recv(65536)
                        if not data:
                            closed += 1
                            break
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
            out[kind] = f"{closed}/{len(socks)}"
        return out

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)
        for socks in self.sockets.values():
            for s in socks:
                s.close()


def flood(model: Path, args) -> dict:
    photo = sorted(next(p for p in sorted(SAMPLE.iterdir()) if p.is_dir()).iterdir())[0].read_bytes()
    proc, url, lines = start_server(model, shlex.split(args.serve))
    try:
        honest(url, photo, 0.5)  # warm-up
        alone = honest(url, photo, args.seconds)
        hostile = Flood(url, args)
        hostile.start()
        time.sleep(args.settle)
        loaded = honest(url, photo, args.seconds)
        closed = hostile.closed_by_server()
        health = httpx.get(url + "/health", timeout=30).json()
        hostile.finish()
        peak = peak_rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"requests_per_s_alone": round(alone["requests_per_s"], 1),
            "requests_per_s_flooded": round(loaded["requests_per_s"], 1),
            "ratio": round(loaded["requests_per_s"] / alone["requests_per_s"], 3),
            "failures": alone["failures"] + loaded["failures"],
            "server_peak_rss_mb": round(peak / 2**20),
            "bomb_requests": {str(c): hostile.bomb_answers.count(c) for c in sorted(set(hostile.bomb_answers))},
            "closed_by_server": closed, "budgets": {k: health.get(k) for k in ("body_budget", "decode_budget")},
            "tracebacks": sum("Traceback" in line for line in lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--serve", default="", help="options for dogkit serve, e.g. \"--workers 16\"")
    parser.add_argument("--megapixels", type=float, default=50.0)
    parser.add_argument("--bomb-clients", type=int, default=2)
    parser.add_argument("--slow", type=int, default=20, help="slow-header and slow-body connections, each")
    parser.add_argument("--slow-mb", type=float, default=31.0)
    parser.add_argument("--idle", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between the flood's start and the window")
    args = parser.parse_args()
    print(json.dumps(flood(args.model, args), indent=2))


if __name__ == "__main__":
    main()
