"""Atomic file writes: a reader sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .text import shown


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so that a rename inside it survives a power cut (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_problem(path: str | os.PathLike, error: BaseException) -> str:
    """Why ``path`` could not be written, in words, with the room left on its disk: a full disk says so; a writer
    that hides the errno (torch's) gets its own message, and the room left tells."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MB free"
    except OSError:
        free = "free space unknown"
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk of {shown(path)} ({free})"
    text = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1][:200]
    return f"cannot write {shown(path)} ({text}; {free} on its disk)"


def file_mode() -> int:
    """The permissions a new output file gets: the usual ones, under the umask (mkstemp makes 0600 files)."""
    return 0o666 & ~_umask()


# ----------------------------------------------------------------------------- leftovers of killed processes
# Temporary files and folders carry the writer's process id (".last.pt.p1234.x8k2.tmp"), so the next
# run can tell a leftover of a killed process from the work of one still running beside it.

_STARTED = time.time()
_PID = re.compile(r"[.-]p(\d+)[.-]")


def pid_tag() -> str:
    """The marker temporary names carry: ``p<pid>``."""
    return f"p{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def is_stale(path: Path) -> bool:
    """A temporary left by a process that is gone: its pid is not running, or it is ours but older than
    this process (a restarted container reuses pids), or it has no pid (an older dogkit made it)."""
    m = _PID.search(path.name)
    if m is None:
        return True
    pid = int(m.group(1))
    if pid == os.getpid():
        try:
            return path.lstat().st_mtime < _STARTED - 1
        except OSError:
            return False
    return not _alive(pid)


def remove_stale(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Remove the stale temporaries matching ``pattern`` (a glob) in ``folder``; return what went."""
    removed = []
    try:
        candidates = sorted(Path(folder).glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        if not is_stale(path):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass  # not ours to remove (permissions); it only costs disk space
    return removed


def writable_problem(path: str | os.PathLike, *, folder: bool) -> str | None:
    """Why ``path`` cannot be written as an output folder (``folder``) or file, or None.

    Checked before any work, so a bad --out fails in a second instead of after the job. The nearest
    existing folder is probed by creating a file in it: that, not permission bits, is what counts
    (root ignores them; a read-only mount does not)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    if not folder and path.is_dir():
        return f"{path} is a folder; give a file name"
    probe = path if folder and path.is_dir() else path.parent
    while not probe.exists():
        if probe.is_symlink() or probe == probe.parent:
            return f"{path} cannot be created ({probe} is a broken link)" if probe.is_symlink() else None
        probe = probe.parent
    if not probe.is_dir():
        return f"{path} cannot be created: {probe} is not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dogkit-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"cannot write in {probe} ({e.strerror or e})"
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. Temporaries of
    this file left by a killed process are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{glob.escape(path.name)}.*.tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{pid_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, file_mode())
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    # newline="" keeps "\n" on every platform, so outputs are byte-identical across machines.
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def csv_text(header: Sequence, rows: Iterable[Sequence]) -> str:
    """CSV with "\\n" line ends on every platform, so the same rows always give the same bytes."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def atomic_write_csv(path: str | os.PathLike, header: Sequence, rows: Iterable[Sequence]) -> None:
    atomic_write_text(path, csv_text(header, rows))
