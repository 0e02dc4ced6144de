"""A run's state: one record, saved whole with every checkpoint and restored whole, from which every resume
decision is read (train on, test, or nothing to do), so that no decision recombines flags kept elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import DogkitError
from ..text import shown

RUN_FORMAT = 2  # checkpoints from before the record (format 1 or none) are refused, not converted


@dataclass
class RunState:
    epochs: int  # planned: the config's now (a resume may give more, or fewer but not fewer than done)
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps, skipped ones included
    stopped: bool = False  # early stopping ended the run
    tested: bool = False  # the test results of these epochs are written
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    best: dict = field(default_factory=dict)  # value, epoch, variant and monitor of best.pt
    history: list[dict] = field(default_factory=list)  # metrics.csv's rows
    averages: dict | None = None  # Averager.state_dict() in a checkpoint (None in a live run: the Averager has it)
    position: dict | None = None  # inside an epoch (recovery.pt): micro-batches done and the epoch's sums so far

    @property
    def finished(self) -> bool:
        """Training is over: the planned epochs are done, or early stopping ended it."""
        return self.stopped or self.epoch >= self.epochs

    @property
    def done(self) -> bool:
        """Trained and tested: nothing left to do."""
        return self.finished and self.tested

    def replan(self, epochs: int) -> bool:
        """The run planned for ``epochs`` now. True when a finished run is given more and trains on: its test
        results then belong to fewer epochs than it will have."""
        trains_on = epochs > self.epochs and self.finished and self.epoch < epochs
        self.epochs = epochs
        if trains_on:
            self.stopped = self.tested = False
        return trains_on

    def to_checkpoint(self, **changes) -> dict:
        """The record as a checkpoint's fields (beside the weights), with ``changes``."""
        record = replace(self, **changes)
        return {"run_format": RUN_FORMAT, **{f.name: getattr(record, f.name) for f in fields(record)}}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path: Path) -> RunState:
        """The record a checkpoint holds, every field checked, so that an edited or damaged file is one line naming
        it and the field rather than an error deep inside the training."""
        def damaged(problem: str) -> DogkitError:
            return DogkitError(f"{shown(path)}: {problem}; the run folder was edited or damaged: start a new run")

        if ckpt.get("run_format") != RUN_FORMAT:
            raise DogkitError(f"{shown(path)} was saved by an older dogkit, before the run-state record: it cannot be "
                              "resumed; start a new run (its best.pt still evaluates and exports)")
        for name in ("epochs", "epoch", "global_step", "bad_epochs"):
            value = ckpt.get(name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62):
                raise damaged(f"{name} must be a whole number of 0 or more, got {shown(repr(value))[:40]}")
        for name, kind, what in (("stopped", bool, "true or false"), ("tested", bool, "true or false"),
                                 ("best", dict, "an object"), ("history", list, "a list"),
                                 ("averages", dict | None, "an object"), ("position", dict | None, "an object")):
            if not isinstance(ckpt.get(name), kind):
                raise damaged(f"{name} is not {what}")
        if not all(isinstance(row, dict) for row in ckpt["history"]):
            raise damaged("history holds a row that is not an object")
        return cls(**{f.name: ckpt.get(f.name) for f in fields(cls)})
