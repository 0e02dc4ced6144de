"""The export variants, one row each: the fp32 model and the models derived from it (INT8, fp16). No torch here.

Export, bench, serve, runs, the report and the study read this table instead of spelling file names, backends
or flags; each derived row's builder lives in ``dogkit.training.export`` (``BUILDERS``, keyed by the row's name).
Every lookup reads ``VARIANTS`` when it is called, so a row added to the table is seen everywhere at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Variant:
    name: str  # its key in export.json, its precision on a model card, its builder's key
    file: str  # in the run folder
    label: str  # as text names it: "INT8"
    description: str  # what it is, after "Also write" in the CLI's help
    gate: Literal["parity", "accuracy"]  # against PyTorch (fp32), or against the fp32 model's answers
    ort_backend: str  # the bench backend that runs it in ONNX Runtime
    opencv_backend: str | None = None  # the one that runs it in OpenCV's DNN module, where that is benchmarked
    precision_key: str | None = None  # the metadata entry its export writes, the model card's precision_detail
    flag: str | None = None  # the `dogkit export` option that asks for it; None: always written
    study: bool = False  # the study exports and benchmarks it, the report shows it, bench runs it by default

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in (self.ort_backend, self.opencv_backend) if b)

    @property
    def record(self) -> str:
        """Its key in export.json: the parity report for fp32, the accuracy gate's report (or why it failed) else."""
        return "parity" if self.gate == "parity" else self.name


VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", "model.onnx", "fp32", "the fp32 model, checked against PyTorch", "parity", "onnx", "opencv",
            study=True),
    Variant("int8", "model.int8.onnx", "INT8", "a static INT8 model (QDQ, per-channel)", "accuracy", "onnx-int8",
            "opencv-int8", precision_key="quantization", flag="--int8", study=True),
    Variant("fp16", "model.fp16.onnx", "fp16", "an fp16 model for GPU deployment", "accuracy", "onnx-fp16",
            precision_key="precision", flag="--fp16"),
)


def base() -> Variant:
    """The fp32 model every other variant is derived from."""
    return next(v for v in VARIANTS if v.gate == "parity")


def derived() -> tuple[Variant, ...]:
    """The variants built from the fp32 model, each behind the accuracy gate, in table order."""
    return tuple(v for v in VARIANTS if v.gate == "accuracy")


def in_study() -> tuple[Variant, ...]:
    """The variants the study exports and benchmarks and its report shows, fp32 first."""
    return tuple(v for v in VARIANTS if v.study)


def names() -> tuple[str, ...]:
    return tuple(v.name for v in VARIANTS)


def by_name(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no export variant {name!r}; the variants are {', '.join(names())}")


def by_flag(flag: str) -> Variant:
    for v in VARIANTS:
        if v.flag == flag:
            return v
    raise KeyError(f"no export variant is asked for with {flag}")


def by_backend(backend: str) -> Variant | None:
    """The variant a bench backend runs, or None (the PyTorch backends run best.pt)."""
    return next((v for v in VARIANTS if backend in (v.ort_backend, v.opencv_backend)), None)


def files() -> tuple[str, ...]:
    return tuple(v.file for v in VARIANTS)


def ort_backends() -> tuple[str, ...]:
    return tuple(v.ort_backend for v in VARIANTS)


def opencv_backends() -> tuple[str, ...]:
    return tuple(v.opencv_backend for v in VARIANTS if v.opencv_backend)


def backend_files() -> dict[str, str]:
    """Every ONNX bench backend → the file it runs: ONNX Runtime's first, then OpenCV's."""
    return {**{v.ort_backend: v.file for v in VARIANTS},
            **{v.opencv_backend: v.file for v in VARIANTS if v.opencv_backend}}


def from_metadata(info: Callable[[str], object]) -> tuple[Variant, object]:
    """Which variant a model file is, from the precision entry its export wrote (fp32 writes none), and that
    entry's value; ``info`` reads one metadata entry, None when absent."""
    for v in derived():
        if v.precision_key and (value := info(v.precision_key)):
            return v, value
    return base(), None
