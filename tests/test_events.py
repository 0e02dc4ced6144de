"""A run's events as a subscriber sees them: the exact sequence with the run's own values, resumed runs, a
failed run, and a subscriber that raises (the run goes on, one warning line names it; TensorBoard still
gets every scalar)."""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import pytest
import torch

from dogkit.errors import DogkitError
from dogkit.training.checkpoint import load_checkpoint
from dogkit.training.config import resolve_config
from dogkit.training.events import Event
from dogkit.training.trainer import train


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tiny(prepared: Path, runs: Path, **overrides):
    """A 0.4 M-weight network at 32 px, 2 steps an epoch: seconds a run."""
    settings = {"data": str(prepared), "runs_dir": str(runs), "arch": "shufflenet_v2_x0_5", "pretrained": False,
                "image_size": 32, "batch_size": 16, "epochs": 2, "max_steps_per_epoch": 2, "amp": "off",
                "workers": 0, **overrides}
    return resolve_config(1, None, settings)


class Recorder:
    """A subscriber that keeps every (event, payload) it is given."""

    def __init__(self):
        self.seen: list[tuple[Event, dict]] = []

    def __call__(self, event: Event, payload: dict) -> None:
        self.seen.append((event, payload))

    def events(self) -> list[tuple]:
        """Each event with what identifies it: the epoch, the file, the steps."""
        out = []
        for event, p in self.seen:
            if event in (Event.CHECKPOINT_SAVED, Event.BEST_SAVED):
                out.append((event, p["path"].name, p["epoch"], p.get("global_step")))
            elif event is Event.RUN_START:
                out.append((event, p["epoch"], p["global_step"], p["epochs"]))
            elif event is Event.EPOCH_END:
                out.append((event, p["epoch"]))
            else:
                out.append((event,))
        return out


def test_a_subscriber_sees_the_run_in_order_with_its_values(prepared_sample: Path, tmp_path: Path):
    # A recovery checkpoint at every synchronisation, every 2 steps: at each epoch's last step.
    recorder = Recorder()
    result = train(tiny(prepared_sample, tmp_path, sync_every=2, recovery_minutes=1e-9), callbacks=[recorder])
    run = result.run_dir
    last = load_checkpoint(run / "last.pt")
    history = last["history"]
    improved = [1] + [2] * (history[1]["val_loss"] < history[0]["val_loss"])  # best.pt written at these epochs
    expected = [(Event.RUN_START, 0, 0, 2)]
    for epoch in (1, 2):
        expected.append((Event.CHECKPOINT_SAVED, "recovery.pt", epoch - 1, 2 * epoch))
        if epoch in improved:
            expected.append((Event.BEST_SAVED, "best.pt", epoch, None))
        expected += [(Event.EPOCH_END, epoch), (Event.CHECKPOINT_SAVED, "last.pt", epoch, 2 * epoch)]
    expected += [(Event.CHECKPOINT_SAVED, "last.pt", 2, 4), (Event.RUN_END,)]  # tested: last.pt says so
    assert recorder.events() == expected
    assert all(p["run_dir"] == run for _, p in recorder.seen)

    # The values are the run's own: its metrics.csv rows, best.pt's metrics, the test results.
    ends = [p for e, p in recorder.seen if e is Event.EPOCH_END]
    assert [p["row"] for p in ends] == history and ends[-1]["best"] == last["best"]
    best = load_checkpoint(run / "best.pt")
    saved = [p for e, p in recorder.seen if e is Event.BEST_SAVED][-1]
    assert (saved["variant"], saved["epoch"], saved["metrics"]) == (best["variant"], best["epoch"],
                                                                    best["val_metrics"])
    end = recorder.seen[-1][1]["result"]
    assert end == result and end.finished and end.epochs_done == 2 and end.test["best"]["epoch"] == best["epoch"]

    # Resumed when finished: nothing trained, the run starts where it ended and ends at once.
    again = Recorder()
    train(resume=run, callbacks=[again])
    assert again.events() == [(Event.RUN_START, 2, 4, 2), (Event.RUN_END,)]


def test_a_failed_run_tells_its_subscribers_why(prepared_sample: Path, tmp_path: Path, monkeypatch):
    import dogkit.training.loop as loop

    real_ce = torch.nn.functional.cross_entropy

    def poisoned(logits, target, *args, **kwargs):
        loss = real_ce(logits, target, *args, **kwargs)
        return loss * float("nan") if "label_smoothing" in kwargs else loss  # training steps only

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    recorder = Recorder()
    with pytest.raises(DogkitError, match="loss became nan"):
        train(tiny(prepared_sample, tmp_path, epochs=1), callbacks=[recorder])
    assert recorder.events() == [(Event.RUN_START, 0, 0, 1), (Event.RUN_FAILED,)]
    error = recorder.seen[-1][1]["error"]
    assert isinstance(error, DogkitError) and "epoch 1, step 1" in str(error)


class FakeWriter:
    """Stands in for TensorBoard's SummaryWriter: the log folder and every scalar."""

    made: list[FakeWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.flushes = log_dir, [], 0
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushes += 1


def test_a_raising_subscriber_is_named_once_and_the_run_goes_on(prepared_sample: Path, tmp_path: Path,
                                                                monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeWriter.made = []

    def broken_subscriber(event: Event, payload: dict) -> None:
        if event is Event.EPOCH_END:
            payload["row"]["train_loss"] = -1.0  # a copy: the run's own row is untouched
            raise RuntimeError("the tracking server is down")

    recorder = Recorder()
    result = train(tiny(prepared_sample, tmp_path, epochs=1, tensorboard=True), callbacks=[broken_subscriber, recorder])
    assert result.finished and result.epochs_done == 1
    warnings = [line for line in (result.run_dir / "run.log").read_text().splitlines() if "warning:" in line]
    assert len(warnings) == 1
    assert warnings[0].endswith(
        "warning: subscriber test_events.test_a_raising_subscriber_is_named_once_and_the_run_goes_on.<locals>."
        "broken_subscriber failed on epoch_end (RuntimeError: the tracking server is down); training goes on")
    # The subscriber after it still got every event; the run kept its own row.
    assert [e for e, _ in recorder.seen] == [Event.RUN_START, Event.BEST_SAVED, Event.EPOCH_END,
                                             Event.CHECKPOINT_SAVED, Event.CHECKPOINT_SAVED, Event.RUN_END]
    row = load_checkpoint(result.run_dir / "last.pt")["history"][0]
    assert row["train_loss"] > 0 and float(read_rows(result.run_dir / "metrics.csv")[0]["train_loss"]) > 0
    # TensorBoard, the first subscriber: one writer in <run>/tensorboard, every numeric column at its epoch.
    (writer,) = FakeWriter.made
    assert writer.log_dir == str(result.run_dir / "tensorboard") and writer.flushes == 1
    assert writer.scalars == [(k.replace("_val_", "/val_"), v, 1) for k, v in row.items()
                              if isinstance(v, float | int) and k != "epoch"]
