"""Value checks for the settings dataclasses of the commands (``PrepareConfig``, ``ExportSettings``, …).

Each dataclass checks its values in ``__post_init__`` with these helpers, so that a library caller and the command
line get the same refusal. A refusal is a ``SettingError`` naming the field; the command line names the option that
gave the value instead (``--top-k`` for ``top_k``), and that is all it adds.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

from .errors import DogkitError


class SettingError(DogkitError):
    """``setting`` (a dataclass field) holds a value it cannot take; ``problem`` says what it allows."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting}: {problem}")
        self.setting, self.problem = setting, problem


def whole(value: object, low: int) -> bool:
    """``value`` is a whole number of at least ``low`` (a library caller's 2.5 or True is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def at_least(obj: object, low: int, *names: str) -> None:
    """Each of ``names`` is None or a whole number of at least ``low``."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not whole(value, low):
            raise SettingError(name, f"must be a whole number of at least {low}, got {value!r}")


def within(obj: object, name: str, low: float, high: float, *, open_low: bool = False) -> None:
    """``name`` is None or a finite number in [low, high] (``open_low``: (low, high])."""
    value = getattr(obj, name)
    if value is None:
        return
    if not math.isfinite(value) or value > high or (value <= low if open_low else value < low):
        raise SettingError(name, f"must be a number in {'(' if open_low else '['}{low:g}, {high:g}], got {value}")


def positive(obj: object, *names: str) -> None:
    """Each of ``names`` is None or a positive finite number."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SettingError(name, f"must be a positive finite number, got {value}")


def one_of(obj: object, name: str, allowed: Collection[str]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise SettingError(name, f"must be one of {', '.join(allowed)}, got {value!r}")


def writable(obj: object, name: str, *, folder: bool) -> None:
    """``name`` is None or a path this process can write as an output folder (or file): checked before any work,
    so that a bad output fails in a second instead of after the job."""
    value = getattr(obj, name)
    if value is None:
        return
    from .atomic import writable_problem

    if problem := writable_problem(Path(value), folder=folder):
        raise SettingError(name, problem)
