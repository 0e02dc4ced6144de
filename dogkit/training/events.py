"""What a training run tells its subscribers (TensorBoard, and any integration: MLflow, W&B, a dashboard).

A subscriber is one function ``callback(event, payload)``, called for every event, in the order the
subscribers were given; it picks the events it wants. Add one with ``train(cfg, callbacks=[callback])``
(or ``Trainer(..., callbacks=[...])``). Events fire on the main process only (rank 0 under DDP), at the
moments below; every payload has ``run_dir`` (the run folder) and:

- ``RUN_START``: ``epoch`` (epochs done: more than 0 when resumed), ``global_step``, ``epochs`` (planned)
- ``EPOCH_END``: ``epoch`` (1-based), ``row`` (a copy of the epoch's metrics.csv row), ``best`` (the best
  so far: ``value``, ``epoch``, ``variant``, ``monitor``); after metrics.csv is written, before last.pt
- ``BEST_SAVED``: ``path`` (best.pt), ``epoch``, ``variant``, ``metrics`` (its validation metrics)
- ``CHECKPOINT_SAVED``: ``path`` (last.pt at an epoch's end and once more when the run is tested, recovery.pt
  inside an epoch), ``epoch`` (epochs done), ``global_step``
- ``RUN_END``: ``result`` (the ``RunResult``: run folder, finished, epochs done, best, test metrics)
- ``RUN_FAILED``: ``error`` (the exception, ``KeyboardInterrupt`` for Ctrl-C); it is raised again after

Payloads are for reading: rows and metrics are copies, so an edit never reaches the run (it does reach the
subscribers after). A subscriber that raises does not stop training: the run logs one warning line naming
it, the event and the error, and goes on (the subscriber stays subscribed). Only ``Exception`` is caught:
Ctrl-C still stops the run. Subscribers run inline, so a slow one slows training (under DDP every process
waits for it at the next synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from rich.markup import escape

from ..errors import one_line
from ..log import log
from ..text import shown


class Event(str, Enum):
    RUN_START = "run_start"
    EPOCH_END = "epoch_end"
    BEST_SAVED = "best_saved"
    CHECKPOINT_SAVED = "checkpoint_saved"
    RUN_END = "run_end"
    RUN_FAILED = "run_failed"


Callback = Callable[[Event, dict[str, Any]], None]


def callback_name(callback: Callback) -> str:
    """How a warning names a subscriber: its qualified name (a function, a method, an object's class)."""
    named = getattr(callback, "__qualname__", None) or type(callback).__qualname__
    module = getattr(callback, "__module__", None) or type(callback).__module__
    return f"{module}.{named}" if module else named


class Events:
    """The subscribers of one run, called in the order they were subscribed."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: list[Callback] = list(callbacks)

    def subscribe(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def emit(self, event: Event, **payload: Any) -> None:
        for callback in self.callbacks:
            try:
                callback(event, payload)
            except Exception as e:  # an integration's failure is no reason to lose the training run
                log.warning(f"[yellow]warning:[/] subscriber {escape(shown(callback_name(callback)))} failed on "
                            f"{event.value} ({escape(type(e).__name__)}: {escape(one_line(e))}); training goes on")
