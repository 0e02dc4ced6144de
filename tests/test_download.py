"""dogkit.download against a local HTTP server with Range support and switchable faults."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from dogkit.data.download import (
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    RemoteFile,
    download,
    download_all,
    stanford_dogs_files,
)
from dogkit.errors import DogkitError


def _make_tar(seed: int) -> bytes:
    """A real tar of a few hundred KB of incompressible bytes, like a tiny Stanford Dogs archive."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            data = rng.integers(0, 256, size=100_000 + i, dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(f"Images/n0000000{i}-breed/img_{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class FakeServer:
    """State shared with the handler; tests flip ``mode`` to inject faults."""

    files: dict[str, bytes]
    base_url: str = ""
    mode: str = "ok"  # ok | cut | error500 | ignore_range | wrong_bytes
    cut_after: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)

    def remote(self, name: str) -> RemoteFile:
        data = self.files[name]
        return RemoteFile(name, self.base_url + name, len(data), hashlib.sha256(data).hexdigest())


def _handler(state: FakeServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
            state.requests.append({"path": self.path, **dict(self.headers)})
            name = self.path.rsplit("/", 1)[-1]
            if state.mode == "error500":
                self.send_error(500, "Internal Server Error")
                return
            if name not in state.files:
                self.send_error(404)
                return
            body = state.files[name]
            if state.mode == "wrong_bytes":
                body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
            self._send(body)

        def _send(self, body: bytes) -> None:
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(match.group(1)) if match and state.mode != "ignore_range" else 0
            if match and state.mode != "ignore_range":
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            chunk = body[start:]
            self.send_header("Content-Length", str(len(chunk)))
            self.end_headers()
            if state.mode == "cut":
                # Promise the full length, then hang up early, as a dropped connection does.
                self.wfile.write(chunk[: state.cut_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)

        def log_message(self, format: str, *args) -> None:
            pass  # keep pytest output clean

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer(files={"payload.tar": _make_tar(0), "other.tar": _make_tar(1)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/dogs/"
    # A short poll interval keeps shutdown() (and so each teardown) from waiting half a second.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_full_download(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    path = download(remote, tmp_path / "dl", timeout=5)
    assert path == tmp_path / "dl" / "payload.tar"
    assert path.read_bytes() == server.files["payload.tar"]
    assert not (tmp_path / "dl" / "payload.tar.part").exists()
    assert "Range" not in server.requests[0]
    with tarfile.open(path) as tar:  # a real, readable archive came through
        assert len(tar.getnames()) == 3


def test_resume_after_cut(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    server.mode, server.cut_after = "cut", 120_000
    with pytest.raises(DogkitError, match="running again resumes"):
        download(remote, tmp_path, timeout=5)
    part = tmp_path / "payload.tar.part"
    assert part.stat().st_size == 120_000
    assert not (tmp_path / "payload.tar").exists()

    server.mode = "ok"
    path = download(remote, tmp_path, timeout=5)
    assert server.requests[-1]["Range"] == "bytes=120000-"
    assert path.read_bytes() == server.files["payload.tar"]
    assert not part.exists()


def test_server_ignoring_range_restarts(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    part = tmp_path / "payload.tar.part"
    stale = b"stale bytes that a 200 reply must overwrite, not follow"
    part.write_bytes(stale)
    server.mode = "ignore_range"
    path = download(remote, tmp_path, timeout=5)
    assert server.requests[-1]["Range"] == f"bytes={len(stale)}-"
    assert path.read_bytes() == server.files["payload.tar"]
    assert not part.exists()


def test_oversized_part_is_discarded(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    (tmp_path / "payload.tar.part").write_bytes(b"x" * (remote.size + 10))
    path = download(remote, tmp_path, timeout=5)
    assert "Range" not in server.requests[-1]
    assert path.read_bytes() == server.files["payload.tar"]


def test_checksum_mismatch_deletes_everything(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    server.mode = "wrong_bytes"
    with pytest.raises(DogkitError) as info:
        download(remote, tmp_path, timeout=5)
    actual = hashlib.sha256(bytes(b ^ 0xFF for b in server.files["payload.tar"][:64])
                            + server.files["payload.tar"][64:]).hexdigest()
    message = str(info.value)
    assert remote.sha256 in message and actual in message
    assert "deleted" in message
    assert not (tmp_path / "payload.tar").exists()
    assert not (tmp_path / "payload.tar.part").exists()


def test_http_500(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    server.mode = "error500"
    with pytest.raises(DogkitError) as info:
        download(remote, tmp_path, timeout=5)
    assert "500" in str(info.value)
    assert remote.url in str(info.value)


def test_http_error_keeps_partial_data(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    part = tmp_path / "payload.tar.part"
    part.write_bytes(server.files["payload.tar"][:5000])
    server.mode = "error500"
    with pytest.raises(DogkitError, match="5000 bytes are kept"):
        download(remote, tmp_path, timeout=5)
    assert part.read_bytes() == server.files["payload.tar"][:5000]


def test_offline(closed_port: int, tmp_path: Path) -> None:
    remote = RemoteFile("images.tar", f"http://127.0.0.1:{closed_port}/images.tar", 10, "0" * 64)
    with pytest.raises(DogkitError) as info:
        download(remote, tmp_path, timeout=5)
    message = str(info.value)
    assert "--source" in message
    assert remote.url in message
    assert str(tmp_path) in message


def test_download_all_names_every_file_in_hint(closed_port: int, tmp_path: Path) -> None:
    files = stanford_dogs_files(f"http://127.0.0.1:{closed_port}")
    with pytest.raises(DogkitError, match="images.tar, annotation.tar and lists.tar by hand"):
        download_all(files, tmp_path, timeout=5)


def test_already_complete_makes_no_request(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    first = download(remote, tmp_path, timeout=5)
    assert len(server.requests) == 1
    assert (tmp_path / ".payload.tar.sha256").exists()
    second = download(remote, tmp_path, timeout=5)
    assert second == first
    assert len(server.requests) == 1


def test_file_placed_by_hand_is_verified_not_downloaded(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    (tmp_path / "payload.tar").write_bytes(server.files["payload.tar"])
    assert download(remote, tmp_path, timeout=5).read_bytes() == server.files["payload.tar"]
    assert server.requests == []
    assert (tmp_path / ".payload.tar.sha256").exists()


def test_corrupt_file_with_stale_stamp_is_downloaded_again(server: FakeServer, tmp_path: Path) -> None:
    remote = server.remote("payload.tar")
    path = download(remote, tmp_path, timeout=5)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime: the stamp no longer vouches for it
    os.utime(path, ns=(0, 1))
    assert download(remote, tmp_path, timeout=5).read_bytes() == server.files["payload.tar"]
    assert len(server.requests) == 2


def test_download_all(server: FakeServer, tmp_path: Path) -> None:
    files = [server.remote("payload.tar"), server.remote("other.tar")]
    paths = download_all(files, tmp_path, timeout=5)
    assert [p.name for p in paths] == ["payload.tar", "other.tar"]
    assert [p.read_bytes() for p in paths] == [server.files["payload.tar"], server.files["other.tar"]]


def test_stanford_dogs_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    files = stanford_dogs_files()
    assert [(f.name, f.size) for f in files] == [
        ("images.tar", 793579520),
        ("annotation.tar", 21852160),
        ("lists.tar", 481280),
    ]
    assert all(f.url == DEFAULT_BASE_URL + f.name for f in files)
    assert all(re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in files)

    monkeypatch.setenv(BASE_URL_ENV, "http://mirror.example/dogs")
    assert [f.url for f in stanford_dogs_files()] == [
        "http://mirror.example/dogs/images.tar",
        "http://mirror.example/dogs/annotation.tar",
        "http://mirror.example/dogs/lists.tar",
    ]
    # An explicit base URL wins over the environment.
    assert stanford_dogs_files("http://other.example/")[0].url == "http://other.example/images.tar"
