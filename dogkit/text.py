"""How a name from outside (a file, a folder, a class, a request) is shown: safe on any terminal or file.

File and class names come from strangers' folders and archives. A name may hold escape sequences
that rewrite the terminal, newlines that forge extra log lines, bidi overrides that reverse what
is read, or bytes that are not UTF-8 (Python keeps them as lone surrogates, which no UTF-8 writer
accepts). ``shown`` spells all of those out, so the name prints, logs and writes as one line.
"""

from __future__ import annotations

import json
import math
import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as surrogateescape keeps it
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def shown(text: object) -> str:
    """``text`` with control and format characters, line separators and lone surrogates escaped as in
    Python literals; every other character (accents, CJK, emoji, spaces) kept as it is."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char in _NAMED:
            out.append(_NAMED[char])
        elif char.isprintable() or unicodedata.category(char) == "Zs":  # spaces of any width print as spaces
            out.append(char)
        else:
            out.append(_escaped(char))
    return "".join(out)


def utf8(text: str) -> bool:
    """Whether ``text`` (a file name from the OS) is valid UTF-8, i.e. has no surrogate-escaped bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_a_file(path, most: int | None = None) -> str | None:
    """Why ``path`` is not a regular file to read (a FIFO would block, a device never ends), or is larger than
    ``most`` bytes; None when it is fine. From ``stat``, before anything opens it."""
    import os
    import stat

    try:
        info = os.stat(path)
    except OSError as e:
        return e.strerror or type(e).__name__
    if stat.S_ISDIR(info.st_mode):
        return "it is a folder"
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode)
                or stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
        return f"it is {kind}, not a file"
    if most is not None and info.st_size > most:
        return f"it holds {info.st_size:,} bytes, more than the {most:,} it may"
    return None


def finite(value):
    """``value`` (dicts, lists, tuples, numbers) with every NaN or infinity replaced by None: JSON has no such
    numbers, and a strict parser refuses Python's ``NaN``."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "dtype") and getattr(value, "ndim", None) == 0:  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value, **kwargs) -> str:
    """JSON as a strict parser reads it: non-finite numbers written as null (``finite``)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
