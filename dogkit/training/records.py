"""What a run writes about itself besides checkpoints: environment.json, metrics.csv, TensorBoard scalars and
the test split's metrics and per-image predictions."""

from __future__ import annotations

import io
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..atomic import atomic_write_bytes, atomic_write_csv, atomic_write_text
from ..data.dataset import Dataset
from ..errors import DogkitError
from ..system import available_cpus
from ..text import json_text
from .config import TrainConfig
from .events import Event


def environment(cfg: TrainConfig, dataset: Dataset, device: torch.device, parameters: int) -> dict:
    import albumentations
    import cv2
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "dogkit": __version__, "git_commit": commit, "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "albumentations": albumentations.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpus": available_cpus(), "torch_threads": torch.get_num_threads(),
        "dataset": str(dataset.root.resolve()), "manifest_sha256": dataset.manifest_sha256,
        "parameters": parameters,
    }


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    cells = ([f"{v:.6g}" if isinstance(v, float) else v for v in (row.get(k, "") for k in keys)] for row in history)
    atomic_write_csv(path, keys, cells)


class TensorBoardLog:
    """Each metrics.csv row as TensorBoard scalars (``tensorboard=true``), in ``<run>/tensorboard``: a subscriber
    to the run's events (``events``). The package is checked here, before the run starts; the writer is made at
    the first epoch's end, when the run folder exists."""

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise DogkitError("tensorboard=true needs the tensorboard package: pip install tensorboard") from e
        self.make_writer = SummaryWriter
        self.writer = None

    def __call__(self, event: Event, payload: dict) -> None:
        if event is Event.EPOCH_END:
            self.add(payload["run_dir"], payload["row"])

    def add(self, run_dir: Path, row: dict) -> None:
        if self.writer is None:
            self.writer = self.make_writer(str(run_dir / "tensorboard"))
        for key, value in row.items():
            if isinstance(value, float | int) and key != "epoch":
                self.writer.add_scalar(key.replace("_val_", "/val_"), value, row["epoch"])
        self.writer.flush()


def write_test_outputs(run_dir: Path, report: dict, logits: np.ndarray, labels: np.ndarray, paths: list[str]) -> None:
    """``test_metrics.json``, and the per-image predictions the report needs for paired tests, intervals and
    calibration (``test_predictions.npz``)."""
    buf = io.BytesIO()
    np.savez(buf, logits=logits, labels=labels, paths=np.array(paths))
    atomic_write_bytes(run_dir / "test_predictions.npz", buf.getvalue())
    atomic_write_text(run_dir / "test_metrics.json", json_text(report, indent=2) + "\n")
