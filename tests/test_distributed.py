"""DDP on the CPU: two processes with the gloo backend, launched by torchrun as a user would."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dogkit.data.dataset import load_dataset
from dogkit.deploy.preprocess import PreprocessSpec
from dogkit.metrics import classification_metrics
from dogkit.training.checkpoint import load_best, load_checkpoint
from dogkit.training.evaluation import predict_logits
from dogkit.training.loaders import ManifestImages, make_loader
from dogkit.training.transforms import EvalFn


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dogkit", "train", *args], capture_output=True, text=True, timeout=600)


# Two processes on the CPU (gloo), asked for with --device cpu: on a machine with one GPU, the default
# (auto) would give each process a GPU and be refused. The resumed run reads the device from its config.
# A 0.4 M-weight network with stages: what is synchronised is the same as for a ResNet, the checkpoints smaller.
ARCH = "shufflenet_v2_x0_5"


@pytest.fixture(scope="module")
def ddp_run(prepared_sample: Path, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("ddp")
    proc = torchrun("--exp", "2", "--device", "cpu", "--data", str(prepared_sample), "--runs-dir", str(runs),
                    "--arch", ARCH,
                    "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--amp", "off",
                    "--set", "pretrained=false", "--set", "workers=0", "--set", "max_steps_per_epoch=3",
                    "--set", "accumulate=2", "--set", "avg_window=2", "--set", "avg_bn_images=32")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("epoch 1/1: train loss") == 1  # rank 0 alone reports
    assert [p.name for p in runs.iterdir()] == [f"exp2-{ARCH}"]  # one run folder, not one per process
    return runs / f"exp2-{ARCH}"


def test_two_processes_train_and_write_everything_once(ddp_run: Path, prepared_sample: Path):
    for name in ("config.json", "environment.json", "metrics.csv", "last.pt", "best.pt", "test_metrics.json",
                 "test_predictions.npz"):
        assert (ddp_run / name).is_file(), name
    assert not [p for p in ddp_run.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((ddp_run / "environment.json").read_text())["processes"] == 2
    last = load_checkpoint(ddp_run / "last.pt")
    # 3 optimizer steps of 2 micro-batches on each of 2 processes; the averages saw every step.
    assert last["global_step"] == 3 and last["averages"]["steps"] == 3
    assert len(last["rng"]) == 2
    with open(ddp_run / "metrics.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert set(json.loads((ddp_run / "test_metrics.json").read_text())["final"]) == {"raw", "P", "G0.99", "G0.999"}
    with np.load(ddp_run / "test_predictions.npz") as npz:
        assert len(npz["labels"]) == 120  # every test image exactly once, no padding
        expected_paths = [r.path for r in load_dataset(prepared_sample).split("test")]
        assert npz["paths"].tolist() == expected_paths


def test_validation_metrics_equal_a_single_process_evaluation(ddp_run: Path, prepared_sample: Path):
    model, ckpt, _ = load_best(ddp_run)
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    dataset = load_dataset(prepared_sample)
    loader = make_loader(ManifestImages(dataset, dataset.split("val"), EvalFn(spec), "none"), 16, shuffle=False,
                         workers=0)
    logits, labels = predict_logits(model, loader, torch.device("cpu"), None, channels_last=True)
    single = {"loss": float(torch.nn.functional.cross_entropy(logits, labels)),
              **classification_metrics(labels.numpy(), logits.numpy())}
    assert len(labels) == 120
    for key in ("loss", "accuracy", "top5", "precision_macro", "recall_macro", "f1_macro"):
        assert ckpt["val_metrics"][key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


def test_resume_under_ddp_continues_the_run(ddp_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    proc = torchrun("--resume", str(run), "--epochs", "2")  # a finished run given one more epoch
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("resuming") == 1 and proc.stderr.count("settings changed on resume: epochs 1 → 2") == 1
    resumed = load_checkpoint(run / "last.pt")
    assert (resumed["epoch"], resumed["global_step"], resumed["epochs"], resumed["tested"]) == (2, 6, 2, True)
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    with open(run / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    # The one-epoch test results are kept beside the new ones.
    assert (run / "test_metrics.1-epochs.json").is_file() and (run / "test_metrics.json").is_file()


@pytest.fixture(scope="module")
def devices_run(prepared_sample: Path, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`dogkit train --devices 2`, which relaunches itself under torchrun, with a gradual freeze over 2 epochs."""
    runs = tmp_path_factory.mktemp("devices")
    proc = subprocess.run(
        [sys.executable, "-m", "dogkit", "train", "--devices", "2", "--device", "cpu", "--exp", "1", "--data",
         str(prepared_sample), "--runs-dir", str(runs), "--arch", ARCH, "--image-size", "32", "--epochs", "2",
         "--batch-size", "8", "--amp", "off", "--freeze", "gradual", "--set", "pretrained=false",
         "--set", "workers=0", "--set", "max_steps_per_epoch=3"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, runs / f"exp1-{ARCH}"


def test_freeze_schedules_train_under_ddp(devices_run: tuple[subprocess.CompletedProcess, Path]):
    _, run = devices_run
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Epoch 1 trains the head alone, epoch 2 the head and the last stage: each with three steps on both ranks.
    assert [r["trainable"] for r in rows] == ["head + 0 of 4 stages", "head + 1 of 4 stages"]
    assert load_checkpoint(run / "last.pt")["global_step"] == 6


def test_devices_option_relaunches_under_torchrun(devices_run: tuple[subprocess.CompletedProcess, Path]):
    proc, run = devices_run
    env = json.loads((run / "environment.json").read_text())
    assert env["processes"] == 2
    assert proc.stderr.count("Run folder:") == 1


# ----------------------------------------------------------------------------- one process per GPU
# torch.cuda is mocked: these run the same with or without a GPU.


def test_devices_above_the_visible_gpus_are_refused_before_any_process_starts(monkeypatch):
    import dogkit.training.distributed as distributed
    from dogkit.errors import DogkitError

    started = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: started.append(cmd) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DogkitError, match=r"^2 training processes on this node but 1 CUDA GPU visible; start at "
                                          r"most 1 .* or pass --device cpu"):
        distributed.launch(2, ["train", "--exp", "1"])
    with pytest.raises(DogkitError, match="3 training processes"):
        distributed.launch(3, ["train", "--set", "device=cuda"])
    assert started == []
    # Asked for: N processes on the CPU, and N GPUs when there are N.
    assert distributed.launch(2, ["train", "--exp", "1", "--device", "cpu"]) == 0
    assert distributed.launch(2, ["train", "--device=cpu"]) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.launch(2, ["train", "--exp", "1"]) == 0
    assert len(started) == 3 and started[0][-5:] == ["train", "--exp", "1", "--device", "cpu"]


def test_each_torchrun_process_checks_the_gpus_before_joining(monkeypatch):
    import dogkit.training.distributed as distributed
    from dogkit.errors import DogkitError

    joined = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in ("0", "1"):  # rank 0 has a GPU too, but must stop with rank 1 rather than wait for it
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(DogkitError, match="2 training processes on this node but 1 CUDA GPU visible"):
            distributed.init_distributed(use_cuda=True)
    assert joined == []
    # On the CPU (--device cpu) the same two processes join with gloo; with two GPUs, with NCCL.
    assert distributed.init_distributed(use_cuda=False).world == 2 and joined == ["gloo"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.init_distributed(use_cuda=True).local_rank == 1 and joined == ["gloo", "nccl"]
