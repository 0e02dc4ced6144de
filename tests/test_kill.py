"""Runs that finish and resume exactly from anywhere: a run SIGKILLed again and again (inside an epoch, inside
validation, the averages' BatchNorm pass and the test, halfway through a checkpoint) and resumed each time ends
bit for bit where an uninterrupted one does: weights, optimizer, every average and its step range, the
metrics and the test results. The same under two gloo processes and with a step the GradScaler skips.

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
    settings = {"data": str(prepared), "runs_dir": str(runs), "name": "run", "arch": "mobilenet_v3_small",
                "pretrained": False, "image_size": 32, "batch_size": 8, "epochs": 2, "max_steps_per_epoch": 4,
                "avg_window": 3, "avg_bn_images": 16, "workers": 1, "amp": "off", "sync_every": 2,
                "recovery_minutes": 1e-9, "device": "cpu", **extra}
    path = runs.with_suffix(".json")
    path.write_text(json.dumps(resolve_config(2, None, settings).to_dict()))
    return path


def launch(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*prefix, str(KILLRUN), *args], capture_output=True, text=True, timeout=600)


def killed_and_resumed(config: Path, kills: list[str], *extra: str, torchrun: bool = False) -> Path:
    """Start the run killed at kills[0], resume it killed at each next point, then resume it to the end."""
    run = Path(json.loads(config.read_text())["runs_dir"]) / "run"
    for i, point in enumerate(kills):
        args = [str(config)] if i == 0 else ["--resume", str(run)]
        proc = launch(*args, "--kill", point, *extra, torchrun=torchrun)
        died = proc.returncode == KILLED if not torchrun else proc.returncode != 0
        assert died, f"{point}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    proc = launch("--resume", str(run), *extra, torchrun=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def uninterrupted(config: Path, *extra: str, torchrun: bool = False) -> Path:
    proc = launch(str(config), *extra, torchrun=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(json.loads(config.read_text())["runs_dir"]) / "run"


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
        "averager": {k: v for k, v in last["averager"].items()}, "steps": (last["epoch"], last["global_step"]),
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


def test_a_run_killed_anywhere_and_resumed_equals_an_uninterrupted_one(prepared_sample: Path, tmp_path: Path):
    reference = uninterrupted(write_config(prepared_sample, tmp_path / "straight"))
    resumed = killed_and_resumed(write_config(prepared_sample, tmp_path / "killed"), KILLS)
    assert_same(fingerprint(resumed), fingerprint(reference))
    log = (resumed / "run.log").read_text()
    assert "resuming" in log and "inside epoch 1, at step 2 (recovery.pt)" in log
    assert "the test did not complete; testing now" in log
    assert not (resumed / "recovery.pt").exists()  # superseded by last.pt at the end of each epoch
    steps = json.loads((reference / "test_metrics.json").read_text())["final"]["P"]["steps"]
    assert steps == [6, 8]  # M = 3: the last window ends on the last of the 8 steps


def test_a_skipped_gradscaler_step_resumes_exactly_and_p_ends_on_the_last_step(prepared_sample: Path,
                                                                               tmp_path: Path):
    skip = ("--skip-step", "7")  # inside the last window of M = 3 (steps 6–8): it must reach back to step 5
    reference = uninterrupted(write_config(prepared_sample, tmp_path / "straight"), *skip)
    resumed = killed_and_resumed(write_config(prepared_sample, tmp_path / "killed"), ["step:7", "bn:1"], *skip)
    assert_same(fingerprint(resumed), fingerprint(reference))
    averager = fingerprint(reference)["averager"]
    assert (averager["steps"], averager["attempts"]) == (7, 8)
    # The last three steps taken are 5, 6 and 8 (7 was skipped); the P that is tested is their mean.
    assert json.loads((reference / "test_metrics.json").read_text())["final"]["P"]["steps"] == [5, 8]


def test_a_two_process_run_killed_inside_an_epoch_resumes_exactly(prepared_sample: Path, tmp_path: Path):
    reference = uninterrupted(write_config(prepared_sample, tmp_path / "straight", workers=0), torchrun=True)
    resumed = killed_and_resumed(write_config(prepared_sample, tmp_path / "killed", workers=0), ["step:3"],
                                 torchrun=True)
    assert_same(fingerprint(resumed), fingerprint(reference))
    assert "inside epoch 1, at step 2 (recovery.pt)" in (resumed / "run.log").read_text()
    assert json.loads((resumed / "environment.json").read_text())["processes"] == 2
