"""What dogkit says while it works: Python logging, shown on the Rich console and kept in a run's ``run.log``.

Library code logs through ``log`` (``log.info``, ``log.warning``), with Rich markup where it helps on a
terminal, and configures nothing: importing dogkit adds no handler anywhere, as a library should. ``setup()``
shows the messages on the Rich console (the CLI calls it; a notebook or an application may); the handler
renders the markup. ``run_log(folder)`` adds a file handler that writes the same lines as plain text with a
timestamp, so what a run printed outlives the terminal, whether or not ``setup()`` was called.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from rich.errors import MarkupError
from rich.markup import escape
from rich.text import Text

from .errors import interruption, one_line
from .progress import console

RUN_LOG = "run.log"
log = logging.getLogger("dogkit")


class RichConsoleHandler(logging.Handler):
    """Records on dogkit's Rich console (stderr), markup rendered and long lines kept whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.print(record.getMessage())
        except Exception:  # logging must never take the program down
            self.handleError(record)


class PlainFormatter(logging.Formatter):
    """A timestamp and the message with its Rich markup removed: a file that reads well in any editor."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        with suppress(MarkupError):  # unescaped brackets: keep the text as it is
            text = Text.from_markup(text).plain
        return f"{self.formatTime(record, '%Y-%m-%d %H:%M:%S')} {text}"


def setup(level: int = logging.INFO) -> None:
    """dogkit's messages from ``level`` up on its Rich console (stderr), and not passed on to the root logger (an
    application's own root handlers would print every line twice). Calling it again changes nothing more."""
    if not any(isinstance(h, RichConsoleHandler) for h in log.handlers):
        log.addHandler(RichConsoleHandler())
    log.setLevel(level)
    log.propagate = False


@contextmanager
def run_log(folder: str | Path, resume: str | None = None) -> Iterator[None]:
    """Append everything logged inside the block to ``folder/run.log``; an error that ends the block is
    written there too, as one line (the console gets it from the CLI, as always). ``resume``: the command that
    continues the work, named with an interruption here and, through the exception, by the CLI."""
    handler = logging.FileHandler(Path(folder) / RUN_LOG, encoding="utf-8")
    handler.setFormatter(PlainFormatter())
    log.addHandler(handler)
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:  # no setup(): the run's log still gets every line
        log.setLevel(logging.INFO)
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt) and resume and not getattr(e, "next_step", None):
            e.next_step = f"`{resume}` continues it"
        what = interruption(e) if isinstance(e, KeyboardInterrupt) else f"error: {one_line(e)}"
        handler.emit(log.makeRecord(log.name, logging.ERROR, __file__, 0, escape(what), None, None))
        raise
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()
