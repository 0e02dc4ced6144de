"""The official Stanford Dogs archives: streamed, resumable after a cut, verified by SHA-256.

A download goes to ``<name>.part`` and is renamed to ``<name>`` only once its size and hash match the
pinned values, so ``<name>`` is always a verified archive. A cut connection keeps the ``.part`` and the
next run asks the server for the rest with an HTTP ``Range`` request.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.markup import escape

from .. import __version__
from ..atomic import atomic_write_text, fsync_dir
from ..errors import DogkitError
from ..log import log
from ..progress import progress_bar
from ..text import shown

DEFAULT_BASE_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
BASE_URL_ENV = "DOGKIT_STANFORD_DOGS_URL"
CHUNK = 1 << 20

# Sizes and SHA-256 as pinned by TensorFlow Datasets (its stanford_dogs checksums file).
_STANFORD_DOGS = (
    ("images.tar", 793579520, "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58"),
    ("annotation.tar", 21852160, "662ed36f707be6b195c2fda392d8e153e83af28cedc8e2134a649f198def30fd"),
    ("lists.tar", 481280, "34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c"),
)

# Everything a failing connection can raise: URLError/HTTPError, timeouts and resets are OSErrors;
# IncompleteRead and RemoteDisconnected are HTTPExceptions.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    size: int
    sha256: str


def stanford_dogs_files(base_url: str | None = None) -> list[RemoteFile]:
    """The three official archives; base URL from the argument, else $DOGKIT_STANFORD_DOGS_URL, else
    Stanford's own server."""
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    base = base.rstrip("/") + "/"
    return [RemoteFile(name, base + name, size, sha) for name, size, sha in _STANFORD_DOGS]


# The command an offline user is sent to; `dogkit study` names itself instead.
SOURCE_HINT = "`dogkit prepare --source PATH`"


def download(remote: RemoteFile, dest_dir: Path, *, timeout: float = 30.0) -> Path:
    """Return ``dest_dir/remote.name``, verified; downloads (or resumes) it only when needed."""
    return _Job(remote, Path(dest_dir), (remote.name,)).run(timeout)


def download_all(files: list[RemoteFile], dest_dir: Path, *, timeout: float = 30.0) -> list[Path]:
    """Download each file in turn; an error message names all of them for a by-hand download."""
    names = tuple(f.name for f in files)
    return [_Job(f, Path(dest_dir), names).run(timeout) for f in files]


@dataclass(frozen=True)
class _Job:
    remote: RemoteFile
    dest_dir: Path
    all_names: tuple[str, ...]  # every file of the set, so that a by-hand hint lists them all

    @property
    def final(self) -> Path:
        return self.dest_dir / self.remote.name

    @property
    def part(self) -> Path:
        return self.dest_dir / f"{self.remote.name}.part"

    def run(self, timeout: float) -> Path:
        self._make_dir()
        if _is_verified(self.final, self.remote):
            return self.final
        have = self._usable_part_size()
        if have == self.remote.size:
            # A previous run fetched everything but stopped before the rename: verify without the network.
            if _sha256(self.part) == self.remote.sha256:
                return self._finish()
            self.part.unlink()
            have = 0
        self._fetch(have, timeout)
        self._check_size()
        self._check_hash()
        return self._finish()

    def _make_dir(self) -> None:
        try:
            self.dest_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DogkitError(f"cannot create download folder {shown(self.dest_dir)}: {e}; "
                              "choose another folder") from e

    def _usable_part_size(self) -> int:
        """Bytes of a previous attempt worth resuming from; a .part larger than the file is garbage."""
        try:
            have = self.part.stat().st_size
        except FileNotFoundError:
            return 0
        if have > self.remote.size:
            self.part.unlink()
            return 0
        return have

    # --- network --------------------------------------------------------------------------------------

    def _fetch(self, have: int, timeout: float) -> None:
        """Stream the file into the .part, appending from byte ``have`` when the server honours Range."""
        headers = {"User-Agent": f"dogkit/{__version__}", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        request = urllib.request.Request(self.remote.url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:
                # The server says our offset is past its end: the .part is not a prefix of its file.
                self.part.unlink(missing_ok=True)
            raise self._network_error(f"HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise self._network_error(str(e.reason)) from e
        except ValueError as e:  # a malformed URL, e.g. a mirror given without http://
            raise self._network_error(f"invalid URL ({e})") from e
        except _NETWORK_ERRORS as e:
            raise self._network_error(_describe(e)) from e
        with response:
            offset = self._start_offset(response, have)
            self._check_length(response, offset)
            self._stream(response, offset)

    def _start_offset(self, response: http.client.HTTPResponse, have: int) -> int:
        """Where the response body starts in the file: ``have`` on a matching 206, 0 on a plain 200."""
        if response.status != 206:
            return 0  # the server ignored Range (or none was sent): the body is the whole file
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != have:
            # Appending bytes from another offset would corrupt the file: start clean next time.
            self.part.unlink(missing_ok=True)
            got = response.headers.get("Content-Range") or "no Content-Range"
            raise self._network_error(f"asked for bytes {have}- but the server sent {got}; partial file deleted")
        return have

    def _check_length(self, response: http.client.HTTPResponse, offset: int) -> None:
        """Refuse early a body of the wrong length (an HTML page from a proxy, a different file)."""
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and offset + int(length) != self.remote.size:
            raise self._network_error(
                f"the server offers {offset + int(length)} bytes but {self.remote.name} has {self.remote.size}"
            )

    def _stream(self, response: http.client.HTTPResponse, offset: int) -> None:
        # "wb" at offset 0 truncates what a previous attempt left when the server ignored Range.
        try:
            with open(self.part, "ab" if offset else "wb") as out, progress_bar(
                f"Downloading {self.remote.name}", self.remote.size, bytes_=True, completed=offset
            ) as bar:
                while chunk := self._read(response):
                    self._write(out, chunk)
                    bar.advance(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:  # opening or fsyncing the .part; reads and writes raise DogkitError themselves
            raise self._disk_error(e) from e

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        try:
            return response.read(CHUNK)
        except _NETWORK_ERRORS as e:
            raise self._network_error(_describe(e)) from e

    def _write(self, out: IO[bytes], chunk: bytes) -> None:
        try:
            out.write(chunk)
        except OSError as e:
            # Caught apart from reads so that a full disk is not reported as a network problem.
            raise self._disk_error(e) from e

    # --- verification and completion ------------------------------------------------------------------

    def _check_size(self) -> None:
        got, size = self.part.stat().st_size, self.remote.size
        if got < size:
            raise self._network_error(f"connection closed after {got} of {size} bytes")
        if got > size:
            self.part.unlink()
            raise DogkitError(
                f"{self.remote.url} sent {got} bytes but {self.remote.name} has {size}; "
                f"the partial file was deleted. Run again, or {self._manual_hint()}"
            )

    def _check_hash(self) -> None:
        actual, expected = _sha256(self.part), self.remote.sha256
        if actual != expected:
            self.part.unlink()
            raise DogkitError(
                f"{self.remote.name} downloaded from {self.remote.url} is corrupt: SHA-256 {actual}, "
                f"expected {expected}; the file was deleted. Run again to download it afresh, "
                f"or {self._manual_hint()}"
            )

    def _finish(self) -> Path:
        os.replace(self.part, self.final)
        fsync_dir(self.dest_dir)
        _write_stamp(self.final, self.remote)
        return self.final

    # --- messages -------------------------------------------------------------------------------------

    def _network_error(self, why: str) -> DogkitError:
        kept = ""
        if self.part.exists() and self.part.stat().st_size:
            kept = (f" {self.part.stat().st_size} bytes are kept in {shown(self.part)}; running again resumes "
                    "from there.")
        return DogkitError(
            f"could not download {self.remote.url}: {why}.{kept} "
            f"If the network stays unavailable, {self._manual_hint()}"
        )

    def _disk_error(self, e: OSError) -> DogkitError:
        return DogkitError(f"cannot write {shown(self.part)}: {e}; free some disk space or choose another folder")

    def _manual_hint(self) -> str:
        names = self.all_names
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        verified = "it will be verified" if len(names) == 1 else "they will be verified"
        return (
            f"download {listed} by hand into {self.dest_dir} ({verified}), "
            f"or run {SOURCE_HINT} with an extracted folder or archive of the dataset."
        )


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- files already on disk ----------------------------------------------------------------------------


def _stamp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.sha256")


def _is_verified(final: Path, remote: RemoteFile) -> bool:
    """True when ``final`` is the pinned file; a matching stamp spares re-hashing 800 MB on every run."""
    try:
        st = final.stat()
    except FileNotFoundError:
        return False
    if st.st_size != remote.size:
        log.info(f"{escape(shown(final))} has {st.st_size} bytes instead of {remote.size}; downloading it again")
        return False
    if _stamp_matches(final, remote, st):
        return True
    if _sha256(final) != remote.sha256:
        log.info(f"{escape(shown(final))} does not match SHA-256 {remote.sha256}; downloading it again")
        return False
    _write_stamp(final, remote)
    return True


def _stamp_matches(final: Path, remote: RemoteFile, st: os.stat_result) -> bool:
    try:
        stamp = json.loads(_stamp_path(final).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = {"sha256": remote.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return isinstance(stamp, dict) and all(stamp.get(k) == v for k, v in expected.items())


def _write_stamp(final: Path, remote: RemoteFile) -> None:
    st = final.stat()
    stamp = {"sha256": remote.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    atomic_write_text(_stamp_path(final), json.dumps(stamp) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
