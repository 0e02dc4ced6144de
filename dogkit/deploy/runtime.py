"""ONNX Runtime inference with no PyTorch: load a dogkit model, read what it carries, run batches.

A dogkit ONNX file takes uint8 RGB images, NHWC, at the size its preprocessing spec names, and
returns logits; class names and the spec travel in its metadata. Preprocessing is the very
function training's evaluation transform uses (``dogkit.deploy.preprocess.eval_transform``).
"""

from __future__ import annotations

import json
import os
import re
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..calibration import T_RANGE, probabilities
from ..errors import DogkitError
from ..system import available_cpus
from ..text import shown
from ..variants import base, from_metadata
from .preprocess import PreprocessSpec, eval_transform

META_PREFIX = "dogkit."
MAPS_OUTPUT = "cams"  # the second output of an explainable model (dogkit.training.cam writes it)
DEVICES = ("cpu", "cuda")
# One graph optimisation level wherever dogkit runs a model (export's gates, eval, predict, bench): an INT8
# model's outputs depend on it (the fused QLinear kernels round differently from the unfused QDQ ops, enough
# to change some top-1s), so the accuracy gate's verdict holds only at the level it ran at. export.json
# records it.
GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"


def ort_message(error: Exception) -> str:
    """ONNX Runtime's message on one line, without its prefix ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ")."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)[:500] or type(error).__name__


def providers_for(device: str) -> list[str]:
    """CUDA only when asked for and present (onnxruntime-gpu lists it even without a GPU); else the CPU."""
    if device not in DEVICES:
        raise DogkitError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DogkitError("--device cuda needs onnxruntime-gpu with CUDA; this ONNX Runtime has "
                              f"{', '.join(ort.get_available_providers())}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION)
    # The CPUs this process may use (affinity, containers), not the machine's count: oversubscribed
    # thread pools spin against each other.
    opts.intra_op_num_threads = threads or available_cpus()
    opts.inter_op_num_threads = 1
    return opts


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A model file's metadata, without running anything."""
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own exception types for unreadable models
        raise DogkitError(f"ONNX Runtime cannot load {shown(path)}: {ort_message(e)}") from e
    return dict(session.get_modelmeta().custom_metadata_map)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def stored_calibration(metadata: dict[str, str]) -> dict:
    """The ``dogkit.calibration`` entry of a model's metadata (``read_metadata``); {} for models made before (or a
    ``null`` entry), and for a derived file (INT8, fp16) whose entry was not fitted on its own outputs (exports
    before each file had its own copied fp32's: its threshold's precision was never checked on that file's answers).
    An entry export could not have written is refused, naming the field: a forged temperature or threshold must
    not pass for a calibration."""
    raw = metadata.get(META_PREFIX + "calibration")
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: thousands of nested brackets
        raise DogkitError(f"dogkit.calibration is not JSON ({type(e).__name__})") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DogkitError(f"dogkit.calibration is {type(value).__name__}, not an object")
    stored_temperature(value)
    stored_threshold(value)
    variant, _ = from_metadata(lambda key: metadata.get(META_PREFIX + key))
    if variant != base() and value.get("fitted_for") != variant.name:
        return {}
    return value


def stored_temperature(calibration: dict) -> float:
    """The stored temperature (1 without one): a number in the range export fits it in (``T_RANGE``); a temperature
    far below it makes logits / T overflow into NaN."""
    t = calibration.get("temperature", 1.0)
    if "temperature" in calibration and not (_number(t) and T_RANGE[0] <= t <= T_RANGE[1]):
        raise DogkitError(f"dogkit.calibration: temperature must be a number from {T_RANGE[0]:g} to "
                          f"{T_RANGE[1]:g}, got {shown(json.dumps(t))[:40]}")
    return float(t)


def stored_threshold(calibration: dict) -> float | None:
    """See ``OnnxClassifier.threshold``: None without selective information, inf when its target was unreachable
    (export writes a null threshold); a threshold that is not a confidence (0 to 1) is refused."""
    selective = calibration.get("selective")
    if selective is None or selective == {}:
        return None
    if not isinstance(selective, dict):
        raise DogkitError(f"dogkit.calibration: selective is {type(selective).__name__}, not an object")
    t = selective.get("threshold")
    if t is None:
        return float("inf")
    if not (_number(t) and 0 <= t <= 1):
        raise DogkitError(f"dogkit.calibration: selective.threshold must be a number from 0 to 1 or null, got "
                          f"{shown(json.dumps(t))[:40]}")
    return float(t)


def refuse_unvalidated(path: Path, metadata: dict, runtime: str, provider: str | None = None) -> None:
    """A model whose export gate ran on named runtimes only (INT8: ``validated_on``) is not run elsewhere: other
    runtimes execute its quantized operators differently, some silently wrong (OpenCV 4's DNN)."""
    raw = metadata.get(META_PREFIX + "validated_on")
    if raw is None:
        return  # fp32 and fp16 models: no such restriction
    try:
        places = json.loads(raw)
        ok = any(p["runtime"] == runtime and (provider is None or p.get("provider") in (None, provider))
                 for p in places)
        named = ", ".join(f"{p['runtime']} ({p['provider']})" if p.get("provider") else p["runtime"] for p in places)
    except (TypeError, ValueError, KeyError) as e:
        raise DogkitError(f"{path} has malformed validated_on metadata ({e}); export it again") from e
    if not ok:
        where = f"{runtime} ({provider})" if provider else runtime
        instead = "--device cpu" if provider else "ONNX Runtime (dogkit predict, eval, serve)"
        raise DogkitError(f"{path.name} was validated on {named} only (its export gate ran there); {where} runs "
                          f"its quantized operators differently, so dogkit does not run it there: use {instead}, "
                          "or model.onnx")


class OnnxClassifier:
    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DogkitError(f"no ONNX model at {self.path}; run `dogkit export` first")
        providers = providers_for(device)
        if device == "cuda":
            # A CUDA provider that cannot start logs raw loader errors and falls back to the CPU;
            # silence them and say it in one line below instead.
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=providers)
        except Exception as e:  # ORT raises its own exception types for unreadable or invalid models
            raise DogkitError(f"ONNX Runtime cannot load {shown(self.path)}: {ort_message(e)}") from e
        finally:
            ort.set_default_logger_severity(2)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise DogkitError("--device cuda: ONNX Runtime's CUDA provider could not start (no usable GPU, or "
                              "CUDA/cuDNN libraries missing); use --device cpu")
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if META_PREFIX + "class_names" not in self.metadata:
            raise DogkitError(f"{self.path} carries no dogkit metadata (class names, preprocessing); "
                              "export it with `dogkit export`")
        try:
            self.class_names: list[str] = json.loads(self.metadata[META_PREFIX + "class_names"])
            self.spec = PreprocessSpec.from_json(self.metadata[META_PREFIX + "preprocess"])
            if not (isinstance(self.class_names, list) and self.class_names
                    and all(isinstance(c, str) for c in self.class_names)):
                raise ValueError("class_names is not a list of names")
        except (KeyError, TypeError, ValueError) as e:
            raise DogkitError(f"{self.path} has malformed dogkit metadata ({type(e).__name__}: {e}); "
                              "export the model again with `dogkit export`") from e
        try:
            self.calibration  # noqa: B018 (parsed and checked now: a forged entry is refused at load)
        except DogkitError as e:
            raise DogkitError(f"{shown(self.path)}: {e}; export the model again with `dogkit export`") from None
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.logits_name = outputs[0] if outputs else "logits"
        self.maps_name = MAPS_OUTPUT if MAPS_OUTPUT in outputs[1:] else None
        self._check_graph()
        refuse_unvalidated(self.path, self.metadata, "onnxruntime", self.session.get_providers()[0])

    def _check_graph(self) -> None:
        """The graph agrees with its metadata: one uint8 NHWC input at the spec's size and logits for exactly the
        class names listed. A file whose metadata was edited (or forged) is refused here, in one line, instead of
        failing on every image later."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        size = self.spec.size
        problem = None
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            problem = (f"its graph takes {', '.join(f'{i.type} {i.shape}' for i in inputs)}, not one uint8 batch of "
                       "NHWC images")
        elif any(isinstance(d, int) and d != want for d, want in zip(inputs[0].shape[1:], (size, size, 3))):
            problem = (f"its graph takes images of {inputs[0].shape[1:]}, but its preprocessing spec says "
                       f"{size}×{size}×3")
        elif not outputs or len(outputs[0].shape) != 2:
            problem = "its graph's first output is not a batch of logits"
        else:
            classes = outputs[0].shape[1]
            if not isinstance(classes, int):  # a symbolic class dimension: one tiny run says how many
                classes = self.run(np.zeros((1, size, size, 3), np.uint8)).shape[1]
            if classes != len(self.class_names):
                problem = f"its graph has {classes} outputs but its metadata names {len(self.class_names)} classes"
            maps = next((o for o in outputs if o.name == self.maps_name), None)
            if maps is not None and not problem and (len(maps.shape) != 4 or (
                    isinstance(maps.shape[1], int) and maps.shape[1] != len(self.class_names))):
                problem = f"its {MAPS_OUTPUT} output is {maps.shape}, not batch × classes × height × width"
        if problem:
            raise DogkitError(f"{shown(self.path)} is not a usable dogkit model: {problem}; export it again with "
                              "`dogkit export`")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def info(self, key: str, default=None):
        """A metadata entry (JSON-decoded when it is JSON)."""
        value = self.metadata.get(META_PREFIX + key)
        if value is None:
            return default
        try:
            return json.loads(value)
        except ValueError:
            return value

    @cached_property
    def calibration(self) -> dict:
        """What export fitted on validation (``dogkit.calibration.calibrate``); {} for models made before. Parsed
        once: serve reads it for every image."""
        return stored_calibration(self.metadata)

    @property
    def temperature(self) -> float:
        return stored_temperature(self.calibration)

    @property
    def threshold(self) -> float | None:
        """The calibrated confidence below which the answer is "unsure" (None: every answer stands, as for models
        exported before selective prediction; a target no threshold met answers nothing)."""
        return stored_threshold(self.calibration)

    def probabilities(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Softmax of the logits, divided first by the stored temperature unless ``calibrated`` is false."""
        return probabilities(logits, self.temperature if calibrated else 1.0)

    @property
    def explains(self) -> bool:
        return self.maps_name is not None

    def why_no_maps(self) -> str:
        explain = self.info("explain", {})
        if isinstance(explain, dict) and explain.get("unavailable"):
            return f"{self.path.name} has no activation maps: {explain['unavailable']}"
        return f"{self.path.name} has no activation maps (exported before dogkit had them); export it again"

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        return eval_transform(rgb, self.spec)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NHWC batch of preprocessed images → float32 logits (N, classes)."""
        return self._run([self.logits_name], batch)[0]

    def run_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC batch → (logits (N, classes), activation maps (N, classes, h, w))."""
        if not self.explains:
            raise DogkitError(self.why_no_maps())
        logits, maps = self._run([self.logits_name, self.maps_name], batch)
        return logits, maps

    def _run(self, outputs: list[str], batch: np.ndarray) -> list[np.ndarray]:
        if batch.dtype != np.uint8 or batch.ndim != 4:
            raise DogkitError(f"the model takes uint8 NHWC images, got {batch.dtype} with shape {batch.shape}")
        try:
            return self.session.run(outputs, {self.input_name: np.ascontiguousarray(batch)})
        except Exception as e:  # ORT's own types (InvalidArgument, Fail, …): the message is what matters
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise DogkitError(f"ONNX Runtime failed on {shown(self.path.name)}: {ort_message(e)}") from e
