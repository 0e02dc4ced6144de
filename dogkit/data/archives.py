"""Safe extraction of dataset archives (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .zip).

Every member is checked before anything is written, so a malicious or damaged archive leaves no
trace: its path and type, and the input policy's limits (``dogkit.data.limits``) on member count, total
uncompressed size and compression ratio, so a small archive that unpacks to gigabytes (a "zip
bomb") is refused from its headers alone. Extraction goes to a temporary folder beside the
destination and is moved in only when complete, and a stamp file makes re-running with the same
archive a no-op.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..atomic import atomic_write_text, pid_tag, remove_stale
from ..errors import DogkitError
from ..text import shown
from .limits import GIB, Limits, limits, megabytes

ARCHIVE_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")

# How many offending members an error message lists; a hostile archive can hold thousands.
MAX_LISTED = 5

# Errors that mean "this file is not a readable archive" rather than a bug in dogkit.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError)

_DRIVE = re.compile(r"^[A-Za-z]:")


def is_archive(path: Path) -> bool:
    """True when the file name ends in a supported archive suffix (case-insensitive)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_zip(path: Path) -> bool:
    return path.name.lower().endswith(".zip")


# ----------------------------------------------------------------------------- member checks


def _path_problem(name: str) -> str | None:
    """Why a member name could land outside the destination, or None when it is safe.

    Backslashes count as separators too: a name harmless on Linux may traverse on Windows.
    """
    if "\x00" in name:
        return "name contains a NUL byte"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' path component"
    return None


def _tar_type_problem(member: tarfile.TarInfo) -> str | None:
    if member.isreg() or member.isdir():
        return None
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO (named pipe)"
    return f"unsupported member type {member.type!r}"


def _zip_type_problem(info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & 0x1:
        # zipfile would stop half-way asking for a password; refuse up front instead.
        return "encrypted"
    # Unix tools keep st_mode in the high 16 bits; Windows tools leave the file-type bits zero.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == 0 or stat.S_ISREG(file_type) or stat.S_ISDIR(file_type):
        return None
    if stat.S_ISLNK(file_type):
        return "symbolic link"
    return "not a regular file or folder"


def _tar_members(path: Path) -> Iterator[tuple[str, bool, str | None, int, int | None]]:
    """(name, is regular file, problem or None, size, compressed size or None) for each tar member,
    streamed header by header."""
    with tarfile.open(path) as tf:
        for member in tf:
            yield (member.name, member.isreg(), _path_problem(member.name) or _tar_type_problem(member),
                   member.size if member.isreg() else 0, None)


def _zip_members(path: Path) -> Iterator[tuple[str, bool, str | None, int, int | None]]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            yield (info.filename, not info.is_dir(), _path_problem(info.filename) or _zip_type_problem(info),
                   info.file_size, info.compress_size)


# End of central directory record, and zip64's locator and record (APPNOTE 4.3.14-16).
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
# A central directory entry is 46 bytes plus its name, extra field and comment; real archives average far
# below this, so more per member means a count forged low over a huge directory.
MAX_DIRECTORY_ENTRY = 1024


def _zip_directory(path: Path) -> tuple[int, int, int] | None:
    """(member count, central directory bytes, where the directory starts) as the zip's end records state them,
    read from its last 64 kB; None when there is no end record (zipfile then says what is wrong). The start is
    found as zipfile finds it: the directory ends where the end records begin (data may precede the zip)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - (_EOCD.size + 0xFFFF + _ZIP64_LOCATOR.size))
        f.seek(start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06", 0, max(0, len(tail) - _EOCD.size + 4))
        if at < 0:
            return None
        _, _, _, _, count, directory, _, _ = _EOCD.unpack_from(tail, at)
        end = start + at
        locator = at - _ZIP64_LOCATOR.size
        if locator >= 0 and tail[locator: locator + 4] == b"PK\x06\x07":
            offset = _ZIP64_LOCATOR.unpack_from(tail, locator)[2]
            f.seek(offset)
            record = f.read(_ZIP64_EOCD.size)
            if len(record) == _ZIP64_EOCD.size and record[:4] == b"PK\x06\x06":
                fields = _ZIP64_EOCD.unpack(record)
                count, directory = fields[7], fields[8]
                end = start + locator - _ZIP64_EOCD.size
    return count, directory, end - directory


_ENTRY = struct.Struct("<4s6H3L5H2L")  # a central directory entry's fixed part (APPNOTE 4.3.12)


def _count_directory(path: Path, start: int, size: int, limit: int) -> int:
    """How many entries the central directory really holds, walked entry by entry a megabyte at a time, stopping
    once past ``limit``: end records can lie, and zipfile keeps every entry it reads in memory."""
    count, at, buffer = 0, 0, b""
    with open(path, "rb") as f:
        f.seek(max(0, start))
        left = size
        while count <= limit:
            if len(buffer) - at < _ENTRY.size + 3 * 0xFFFF and left:
                chunk = f.read(min(left, 2**20))
                left -= len(chunk)
                buffer, at = buffer[at:] + chunk, 0
            if len(buffer) - at < _ENTRY.size or buffer[at: at + 4] != b"PK\x01\x02":
                break  # the directory's end, or damage zipfile will name
            fields = _ENTRY.unpack_from(buffer, at)
            at += _ENTRY.size + fields[10] + fields[11] + fields[12]  # name, extra field, comment
            count += 1
    return count


def _check_zip_directory(path: Path, policy: Limits) -> None:
    """Refuse the zip from its end record alone, before zipfile reads (and keeps in memory) every entry of
    its central directory."""
    stated = _zip_directory(path)
    if stated is None:
        return
    count, directory, start = stated
    if count > policy.max_archive_members:
        raise DogkitError(_refusal(path, f"more than {policy.max_archive_members} members "
                                         f"(DOGKIT_MAX_ARCHIVE_MEMBERS): its directory lists {count}"))
    if directory > max(count, 1) * MAX_DIRECTORY_ENTRY:
        raise DogkitError(f"refusing to extract {shown(path)}: its central directory of {megabytes(directory)} is "
                          f"far larger than its {count} members need, so the archive is damaged or forged. Nothing "
                          "was extracted. Download it again.")
    if _count_directory(path, start, directory, policy.max_archive_members) > policy.max_archive_members:
        raise DogkitError(_refusal(path, f"more than {policy.max_archive_members} members "
                                         f"(DOGKIT_MAX_ARCHIVE_MEMBERS): its directory holds more, though its end "
                                         f"record says {count}"))


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GB" if n >= GIB else megabytes(n)


def _size_problem(policy: Limits, count: int, total: int, archive_bytes: int, name: str, size: int,
                  compressed: int | None) -> str | None:
    """Why the archive is refused so far by the input policy, or None. Checked member by member, so a
    bomb is refused before its gigabytes are even streamed through."""
    if count > policy.max_archive_members:
        return f"more than {policy.max_archive_members} members (DOGKIT_MAX_ARCHIVE_MEMBERS)"
    if total > policy.max_archive_bytes:
        return (f"it unpacks to more than {_gb(policy.max_archive_bytes)} (DOGKIT_MAX_ARCHIVE_GB)")
    if compressed is not None and size > policy.archive_ratio_floor and size > policy.max_archive_ratio * max(
            compressed, 1):
        return (f"member {name!r} unpacks to {_gb(size)} from {megabytes(compressed)}, a compression ratio above "
                f"{policy.max_archive_ratio:g} (DOGKIT_MAX_ARCHIVE_RATIO): a decompression bomb")
    if total > policy.archive_ratio_floor and total > policy.max_archive_ratio * max(archive_bytes, 1):
        return (f"it unpacks to more than {_gb(total)} from {megabytes(archive_bytes)}, a compression ratio above "
                f"{policy.max_archive_ratio:g} (DOGKIT_MAX_ARCHIVE_RATIO): a decompression bomb")
    return None


def _unsafe_message(path: Path, problems: list[tuple[str, str]]) -> str:
    listed = "; ".join(f"{name!r}: {reason}" for name, reason in problems[:MAX_LISTED])
    more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return (
        f"refusing to extract {shown(path)}: {len(problems)} unsafe member(s): {listed}{more}. "
        "Nothing was extracted. Use an archive from a trusted source (e.g. the official download), "
        "or extract it yourself and pass the folder as --source."
    )


def check_archive(path: Path, policy: Limits | None = None) -> list[str]:
    """Validate every member of ``path`` without writing anything; return the regular files' names.

    Raises DogkitError for an unsafe archive (absolute or '..' paths, links, devices, FIFOs and other
    special members), for one beyond the input policy's limits (member count, total size,
    compression ratio) and for a corrupt or unreadable one.
    """
    return _check(path, policy or limits())[0]


def _check(path: Path, policy: Limits) -> tuple[list[str], int]:
    """check_archive's work; also returns the total uncompressed size."""
    if not is_archive(path):
        raise DogkitError(f"{shown(path)} is not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
    files: list[str] = []
    problems: list[tuple[str, str]] = []
    try:
        archive_bytes = path.stat().st_size
        if _is_zip(path):
            _check_zip_directory(path, policy)
        members = _zip_members(path) if _is_zip(path) else _tar_members(path)
        total = 0
        for count, (name, is_file, problem, size, compressed) in enumerate(members, 1):
            total += size
            if too_big := _size_problem(policy, count, total, archive_bytes, name, size, compressed):
                raise DogkitError(_refusal(path, too_big))
            if problem is not None:
                problems.append((name, problem))
            elif is_file:
                files.append(name)
    except _READ_ERRORS as e:
        raise DogkitError(
            f"cannot read archive {shown(path)} ({_cause(e)}); it may be truncated or corrupt. "
            "Nothing was extracted. Download it again."
        ) from e
    if problems:
        raise DogkitError(_unsafe_message(path, problems))
    return files, total


def _refusal(path: Path, why: str) -> str:
    return (f"refusing to extract {shown(path)}: {why}. Nothing was extracted. Raise the limit if you trust the "
            "archive, or extract it yourself and pass the folder as --source.")


def _cause(error: BaseException) -> str:
    """The error in one line: tarfile lists each compression it tried on a line of its own."""
    lines = [line.strip(" -") for line in str(error).splitlines() if line.strip(" -")]
    if not lines:
        return type(error).__name__
    text = lines[0].rstrip(":") + (": " + "; ".join(lines[1:]) if lines[1:] else "")
    return shown(f"{type(error).__name__}: {text}")


# ----------------------------------------------------------------------------- extraction


# Bumped when the checks before extraction change: an extraction stamped by an older dogkit was not
# checked against today's limits, so it is checked and extracted again rather than trusted.
CHECKS_VERSION = 2


def _stamp_path(archive: Path, dest: Path) -> Path:
    return dest / f".{archive.name}.extracted"


def _archive_signature(archive: Path) -> dict[str, int]:
    st = archive.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_extracted(archive: Path, dest: Path) -> bool:
    """True when a stamp says this very archive (same size and mtime) was fully extracted into dest
    and everything it put at the top level is still there."""
    try:
        stamp = json.loads(_stamp_path(archive, dest).read_text(encoding="utf-8"))
        signature = _archive_signature(archive)
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or any(stamp.get(k) != v for k, v in signature.items()):
        return False
    if stamp.get("checks") != CHECKS_VERSION:
        return False
    entries = stamp.get("entries")
    return isinstance(entries, list) and all(isinstance(e, str) and (dest / e).exists() for e in entries)


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            # Defence in depth on Pythons that have it (3.10.12+, 3.11.4+): check_archive already
            # refused anything this filter would catch.
            tf.extractall(target, filter="data")
        else:
            tf.extractall(target)  # every member was already validated by check_archive


def _extract_zip(archive: Path, target: Path) -> None:
    # ZipFile.extractall streams each member to disk in chunks; memory stays flat.
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)


def _move_entries(source: Path, dest: Path, trash: Path) -> list[str]:
    """Move every top-level entry of ``source`` into ``dest``; return their names.

    An existing entry of the same name is a stale earlier extraction: it is first renamed into
    ``trash`` (a cheap rename on the same file system) so the new one takes its place at once.
    """
    names = sorted(entry.name for entry in source.iterdir())
    for name in names:
        target = dest / name
        if target.exists() or target.is_symlink():
            trash.mkdir(exist_ok=True)
            os.replace(target, trash / name)
        os.replace(source / name, target)
    return names


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` safely and return ``dest``.

    A current stamp file makes this a no-op. Otherwise the archive is checked first (an unsafe or
    corrupt one raises DogkitError before anything, even ``dest``, is created), extracted into a
    temporary folder beside ``dest`` and its top-level entries moved in, replacing stale ones.
    Other archives' entries in ``dest`` are left alone.
    """
    if _is_extracted(archive, dest):
        return dest
    if dest.exists() and not dest.is_dir():
        raise DogkitError(f"cannot extract {shown(archive)} into {shown(dest)}: it exists and is not a folder. "
                          "Move it away.")
    _, total = _check(archive, limits())
    # Taken before extracting: if the archive is replaced meanwhile, the stamp will not match it.
    signature = _archive_signature(archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if total > free:
        raise DogkitError(f"extracting {shown(archive)} needs {_gb(total)} but {shown(dest.parent)} has "
                          f"{_gb(free)} free; free some space or extract it elsewhere. Nothing was extracted.")
    # Beside dest, so the final moves are renames on one file system, and hidden so that folder
    # scans ignore a leftover from a killed process (removed here by the next run).
    remove_stale(dest.parent, f".{glob.escape(dest.name)}.extracting-*")
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extracting-{pid_tag()}-"))
    try:
        content = work / "content"
        content.mkdir()
        try:
            (_extract_zip if _is_zip(archive) else _extract_tar)(archive, content)
        except _READ_ERRORS as e:
            raise DogkitError(
                f"extracting {shown(archive)} failed ({_cause(e)}); nothing was placed in {shown(dest)}. "
                "Check free disk space, or download the archive again if it is corrupt."
            ) from e
        dest.mkdir(exist_ok=True)
        stamp = _stamp_path(archive, dest)
        # A stamp from an earlier extraction must not vouch for a tree that is half replaced.
        stamp.unlink(missing_ok=True)
        entries = _move_entries(content, dest, work / "replaced")
        record = {"archive": archive.name, **signature, "checks": CHECKS_VERSION, "entries": entries}
        atomic_write_text(stamp, json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
