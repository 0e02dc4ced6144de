"""Runs that finish and resume exactly from anywhere: a run SIGKILLed again and again (inside an epoch, inside
validation, the averages' BatchNorm pass and the test, halfway through a checkpoint) and resumed each time ends
bit for bit where an uninterrupted one does: weights, optimizer, every average and its step range, the
metrics and the test results. The same under a gradual freeze schedule, under two gloo processes, and for a
run with a step the GradScaler skips that is given an odd number of epochs more on resume.

The kills come from tests/killrun.py, which patches the run in its own process."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from dogkit.training.config import resolve_config

KILLRUN = Path(__file__).with_name("killrun.py")
TIMING = {"epoch_time_s", "val_time_s", "img_per_s", "data_wait_share"}
KILLED = -signal.SIGKILL


def write_config(prepared: Path, runs: Path, **extra) -> Path:
    """Regime 2 (averages, BatchNorm recompute) on a small network: 2 epochs of 4 steps, a loader worker, a
    recovery checkpoint at every synchronisation (every 2 steps)."""
    settings = {"data": str(prepared), "runs_dir": str(runs), "name": "run", "arch": "shufflenet_v2_x0_5",
                "pretrained": False, "image_size": 32, "batch_size": 8, "epochs": 2, "max_steps_per_epoch": 4,
                "avg_window": 3, "avg_bn_images": 16, "workers": 1, "amp": "off", "sync_every": 2,
                "recovery_minutes": 1e-9, "device": "cpu", **extra}
    path = runs.with_suffix(".json")
    path.write_text(json.dumps(resolve_config(2, None, settings).to_dict()))
    return path


def run_of(config: Path) -> Path:
    return Path(json.loads(config.read_text())["runs_dir"]) / "run"


def killed(config: Path, kills: list[str], *, new: bool = True, **extra) -> list[dict]:
    """The segments of a run started (``new``; else resumed) and killed at kills[0], resumed and killed at each
    next point, then resumed to the end; ``extra`` goes into each (skip_step; epochs: for the resumes)."""
    run = run_of(config)
    segments = [{"config": str(config)} if i == 0 and new else {"resume": str(run)} for i in range(len(kills))]
    segments = [{**s, "kill": point} for s, point in zip(segments, kills)] + [{"resume": str(run)}]
    for s in segments:
        s.update({k: v for k, v in extra.items() if k != "epochs" or "resume" in s})
    return segments


def straight(config: Path, **extra) -> list[dict]:
    return [{"config": str(config), **extra}]


def chained(*chains: list[dict]) -> None:
    """Each chain's segments in one launch of killrun --chain, each segment in a fresh process: every kill kills,
    every other segment finishes. The chains are independent runs and go at the same time (one thread each)."""
    launched = []
    for i, segments in enumerate(chains):
        path = Path(segments[0].get("config") or segments[0]["resume"]).parent / f"chain{i}.json"
        path.write_text(json.dumps(segments))
        with open(path.with_suffix(".out"), "w") as out, open(path.with_suffix(".err"), "w") as err:
            launched.append((segments, path, subprocess.Popen([sys.executable, str(KILLRUN), "--chain", str(path)],
                                                              stdout=out, stderr=err, text=True)))
    for segments, path, proc in launched:
        proc.wait(timeout=900)
        ends = [json.loads(line)["end"] for line in path.with_suffix(".out").read_text().splitlines()
                if line.startswith('{"segment"')]
        assert proc.returncode == 0 and ends == ["killed" if s.get("kill") else 0 for s in segments], \
            (ends, path.with_suffix(".err").read_text()[-3000:])


def fingerprint(run: Path) -> dict:
    """Everything a run computed (no timings, no paths)."""
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    with open(run / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]
    with np.load(run / "test_predictions.npz") as npz:
        logits = npz["logits"]
    history = [{k: v for k, v in r.items() if k not in TIMING} for r in last["history"]]
    return {
        "model": last["model"], "optimizer": last["optimizer"]["state"], "scheduler": last["scheduler"],
        "averages": last["averages"], "steps": (last["epoch"], last["global_step"], last["stopped"], last["tested"]),
        "history": history, "best": (last["best"], best["variant"], best["epoch"], best["model"]),
        "metrics": rows, "test": json.loads((run / "test_metrics.json").read_text()), "logits": logits,
    }


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor | np.ndarray):
        assert type(a) is type(b) and a.shape == b.shape and (a == b).all(), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN equals NaN here


# In order, each in a fresh process: a mid-epoch kill (resumed from the recovery checkpoint of step 2); just
# after the recovery checkpoint at the epoch's last step (resumed straight into validation); inside validation;
# halfway through writing last.pt; at epoch 2's step 2, before its recovery checkpoint (back to last.pt);
# inside the averages' BatchNorm pass; inside the test, before its results are written; inside the test's own
# BatchNorm pass (a run trained to the end, tested on resume without training again).
KILLS = ["step:3", "recovery:1", "eval:1", "save:2", "step:2", "bn:1", "test:1", "bn:1"]
# A network with stages, under the gradual schedule: epoch 1 trains the head, epoch 2 the last stage too. A run
# killed inside its test and resumed tested before any epoch ran apply_freeze, so every BatchNorm layer of every
# average, the frozen stem included, was recomputed; the frozen ones come from the schedule now.
FROZEN = {"freeze": "gradual"}


def test_a_run_killed_anywhere_and_resumed_equals_an_uninterrupted_one(prepared_sample: Path, tmp_path: Path):
    config = write_config(prepared_sample, tmp_path / "killed", **FROZEN)
    reference_config = write_config(prepared_sample, tmp_path / "straight", **FROZEN)
    chained(straight(reference_config), killed(config, KILLS))
    reference, resumed = run_of(reference_config), run_of(config)
    assert_same(fingerprint(resumed), fingerprint(reference))
    log = (resumed / "run.log").read_text()
    assert "resuming" in log and "inside epoch 1, at step 2 (recovery.pt)" in log
    assert "the test did not complete; testing now" in log
    assert not (resumed / "recovery.pt").exists()  # superseded by last.pt at the end of each epoch
    steps = json.loads((reference / "test_metrics.json").read_text())["final"]["P"]["steps"]
    assert steps == [6, 8]  # M = 3: the last window ends on the last of the 8 steps
    assert json.loads((reference / "test_metrics.json").read_text())["best"]["epoch"] in (1, 2)
    rows = fingerprint(reference)["history"]
    assert [r["trainable"] for r in rows] == ["head + 0 of 4 stages", "head + 1 of 4 stages"]


def test_a_run_with_a_skipped_step_extended_on_resume_ends_as_one_planned_that_long(prepared_sample: Path,
                                                                                   tmp_path: Path):
    """Planned for 2 epochs, killed, finished and tested; then given one epoch more (an odd number), killed inside
    it, and resumed: it ends where a run planned for 3 epochs from the start does. M = 6 reaches back into
    epoch 2, before the extension, and the skipped step 10 inside the last window makes it reach one further."""
    reference_config = write_config(prepared_sample, tmp_path / "straight", epochs=3, avg_window=6)
    config = write_config(prepared_sample, tmp_path / "killed", epochs=2, avg_window=6)
    chained(straight(reference_config, skip_step=10),
            [*killed(config, ["step:7"], skip_step=10),  # the 2-epoch run, killed, then to its end
             *killed(config, ["step:2", "bn:1"], new=False, skip_step=10, epochs=3)])
    reference, run = run_of(reference_config), run_of(config)
    # The 2-epoch run's results, kept when it was extended.
    assert json.loads((run / "test_metrics.2-epochs.json").read_text())["final"]["P"]["steps"] == [3, 8]
    assert_same(fingerprint(run), fingerprint(reference))
    averages = fingerprint(reference)["averages"]
    assert (averages["steps"], averages["attempts"]) == (11, 12)
    # The last six steps taken are 6–9, 11 and 12 (10 was skipped); the P that is tested is their mean.
    final = json.loads((reference / "test_metrics.json").read_text())["final"]["P"]
    assert (final["steps"], final["iterates"]) == ([6, 12], 6)


def test_a_two_process_run_killed_inside_an_epoch_resumes_exactly(prepared_sample: Path, tmp_path: Path):
    reference_config = write_config(prepared_sample, tmp_path / "straight", workers=0)
    config = write_config(prepared_sample, tmp_path / "killed", workers=0)
    two = {"ranks": 2}  # as torchrun --nproc_per_node=2 starts them (test_distributed runs torchrun itself)
    chained([{**s, **two} for s in (*straight(reference_config), *killed(config, ["step:3"]))])
    reference, resumed = run_of(reference_config), run_of(config)
    assert_same(fingerprint(resumed), fingerprint(reference))
    assert "inside epoch 1, at step 2 (recovery.pt)" in (resumed / "run.log").read_text()
    assert json.loads((resumed / "environment.json").read_text())["processes"] == 2
