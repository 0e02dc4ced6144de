"""The exception types the CLI turns into a clean message instead of a traceback, and how a message is made one
line."""

from __future__ import annotations

from .text import shown


class DogkitError(Exception):
    """A problem the user can act on: the message says what failed and what to do next."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, Kubernetes, SLURM, systemd): ended as Ctrl-C is, work kept, exit 143."""


# An error re-raised from a DataLoader worker (or any error quoting a traceback) carries it in its message.
_TRACEBACK = "Traceback (most recent call last):"


def one_line(text: object) -> str:
    """A message as one line, nothing of its own lost: a quoted traceback gives its original error (its last
    line); any other message keeps every line, joined with " · ". Control characters left in names are escaped
    (``text.shown``), so the line cannot drive a terminal."""
    text = str(text)
    lines = [line.strip() for line in text.strip().split("\n") if line.strip()]
    if _TRACEBACK in text:
        lines = lines[-1:]
    return shown(" · ".join(lines))


def interruption(e: BaseException) -> str:
    """'interrupted (Ctrl-C)' or 'interrupted (SIGTERM)', and what continues the work when the code that was
    interrupted attached that (``e.next_step``, set by ``log.run_log``)."""
    what = "interrupted (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
    step = getattr(e, "next_step", None)
    return f"{what}; {step}" if step else what
