"""Rich progress bars on a terminal, plain periodic log lines elsewhere (CI, nohup, pipes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class _Console(Console):
    """A Console that never crashes on a stray ``[/…]`` in text it was not meant to parse.

    Callers escape what users typed (``rich.markup.escape``); this is the safety net for a path or
    name that slipped through unescaped: it is printed as plain text rather than raising."""

    def print(self, *objects, **kwargs) -> None:
        try:
            super().print(*objects, **kwargs)
        except MarkupError:
            super().print(*(escape(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Logs, progress and errors go to stderr; results (``dogkit predict``'s table) to stdout, so that
# `dogkit predict … > out.txt` captures them and nothing else.
# soft_wrap: long lines stay whole in logs instead of being folded at 80 columns.
console = _Console(stderr=True, soft_wrap=True)
stdout = _Console(soft_wrap=True)
if not stdout.is_terminal and "COLUMNS" not in __import__("os").environ:
    stdout.width = 400  # a table written to a file keeps whole paths on one line


class _PlainBar:
    """Stands in for a Rich task when output is not a terminal: one log line every few seconds."""

    def __init__(self, description: str, total: float | None, every_s: float = 10.0, unit: str = ""):
        self.description = description
        self.total = total
        self.done = 0.0
        self.every_s = every_s
        self.unit = unit
        self.start = self.last = time.monotonic()
        self.text = ""

    def set_text(self, text: str) -> None:
        self.text = text

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total:.0f}" if self.total else ""
        text = f" {self.text}" if self.text else ""
        line = f"{self.description}: {self.done:.0f}{of}{self.unit} ({rate:.1f}{self.unit}/s){text}"
        logging.getLogger("dogkit").info(escape(line))  # dogkit's logger by name: log.py imports this module

    def finish(self) -> None:
        self._log(time.monotonic())


class _RichBar:
    def __init__(self, progress: Progress, task_id):
        self.progress = progress
        self.task_id = task_id

    def advance(self, n: float = 1) -> None:
        self.progress.advance(self.task_id, n)

    def set_text(self, text: str) -> None:
        self.progress.update(self.task_id, text=escape(text))

    def finish(self) -> None:
        pass


@contextmanager
def progress_bar(description: str, total: float | None, *, bytes_: bool = False, completed: float = 0) -> Iterator:
    """A bar with ``.advance(n)``: Rich on a terminal, a log line every 10 s otherwise."""
    if not console.is_terminal:
        bar = _PlainBar(description, total, unit=" B" if bytes_ else "")
        bar.done = completed
        yield bar
        bar.finish()
        return
    if bytes_:
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn()]
    else:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[text]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        yield _RichBar(progress, progress.add_task(escape(description), total=total, completed=completed, text=""))
