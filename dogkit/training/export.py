"""``dogkit export``: a run's best model → one self-describing ONNX file, trusted only after it agrees
with PyTorch on real validation images.

The file takes uint8 RGB NHWC images (dynamic batch) and returns logits; its ``metadata_props``
carry the class names, the preprocessing spec, the architecture, the run and its metrics. A model
that fails the parity gate is never left where a valid one would be. The graph is plain operators
(no shape-computing subgraph), so OpenCV's DNN module opens it too. ``--int8`` adds a static INT8
model (QDQ from the first convolution on, per-channel, calibrated on training images) behind an
accuracy gate, ``--fp16`` a half-precision model for GPUs; either failing is one line naming the
cause, and ``dogkit study`` goes on without it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.markup import escape
from torch import nn

from .. import __version__
from ..atomic import atomic_write_text, pid_tag, remove_stale
from ..data.dataset import Dataset, load_dataset
from ..deploy.preprocess import PreprocessSpec, eval_transform
from ..deploy.runtime import GRAPH_OPTIMIZATION, META_PREFIX, OnnxClassifier
from ..errors import DogkitError
from ..progress import console
from ..runs import best_run
from .checkpoint import load_best

OPSET = 18


class ParityError(DogkitError):
    pass


class NHWCInput(nn.Module):
    """Deployment feeds decoded images as they come (uint8 RGB, NHWC); the graph transposes them.

    ``contiguous()`` matters: on the permuted (channels-last) view, the exporter turns the flatten after
    global pooling into a shape-computing subgraph (Shape → Range → Gather → Mul …) that OpenCV 4.x refuses
    and onnxruntime's symbolic shape inference can trip on; on a contiguous tensor it is one Reshape."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2).contiguous())


@dataclass
class ExportResult:
    run_dir: Path
    onnx_path: Path
    parity: dict
    int8: dict | None = None
    fp16: dict | None = None


def validation_batch(dataset: Dataset, spec: PreprocessSpec, split: str, limit: int | None) -> tuple[np.ndarray, ...]:
    records = dataset.split(split)[:limit] if limit else dataset.split(split)
    if not records:
        raise DogkitError(f"{dataset.root} has no {split} images to check the export against")
    images = np.stack([eval_transform(dataset.load_rgb(r, spec.box_crop), spec) for r in records])
    return images, np.array([r.label for r in records])


def torch_logits(model: nn.Module, images: np.ndarray, batch: int = 32) -> np.ndarray:
    wrapped = NHWCInput(model).eval()
    with torch.inference_mode():
        return np.concatenate([wrapped(torch.from_numpy(images[i: i + batch])).numpy()
                               for i in range(0, len(images), batch)])


def onnx_logits(path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    runner = OnnxClassifier(path)
    return np.concatenate([runner.run(images[i: i + batch]) for i in range(0, len(images), batch)])


def export_onnx(model: nn.Module, spec: PreprocessSpec, path: Path) -> None:
    """Dynamo export traced at batch 2 with a dynamic batch axis, one file, no external data."""
    example = torch.randint(0, 256, (2, spec.size, spec.size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        torch.onnx.export(NHWCInput(model).eval(), (example,), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_shapes={"images": {0: batch}}, opset_version=OPSET,
                          dynamo=True, external_data=False, verbose=False)
    except Exception as e:  # the exporter raises many types; all mean "this model did not export"
        raise DogkitError(f"ONNX export failed: {e}") from e


def add_metadata(path: Path, metadata: dict[str, object]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    keep_used_opsets(model)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def check_parity(model: nn.Module, path: Path, images: np.ndarray, atol: float) -> dict:
    """fp32 ONNX vs PyTorch on the same uint8 images: max |Δlogit| within ``atol`` and every top-1 equal."""
    expected = torch_logits(model, images)
    got = onnx_logits(path, images)
    diff = float(np.abs(expected - got).max())
    agree = float((expected.argmax(1) == got.argmax(1)).mean())
    report = {"images": len(images), "max_abs_logit_diff": diff, "atol": atol, "top1_agreement": agree}
    if not (diff <= atol and agree == 1.0):
        raise ParityError(f"ONNX and PyTorch disagree on {len(images)} validation images: max |Δlogit| {diff:.3g} "
                          f"(allowed {atol:g}), top-1 agreement {agree:.2%} (required 100%). No model was written.")
    return report


def batch_sizes_ok(path: Path, spec: PreprocessSpec, sizes=(1, 3, 8)) -> None:
    """Some exporter versions silently fix the batch to the traced one: run each size for real."""
    runner = OnnxClassifier(path)
    for n in sizes:
        out = runner.run(np.zeros((n, spec.size, spec.size, 3), np.uint8))
        if out.shape[0] != n:
            raise DogkitError(f"the exported model returned {out.shape[0]} rows for a batch of {n}")


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed training images."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self.batches = iter([{"images": images[i: i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def cause(e: BaseException) -> str:
    """One line naming what failed: the exception, its first message line, and where a bare assert fired."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if not message:
        frames = traceback.extract_tb(e.__traceback__)
        message = f"in {frames[-1].name} ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def preprocessing_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The in-model preprocessing: every node the first convolution's input depends on (the Transpose, the
    Cast and the normalisation of the full-resolution image)."""
    producer = {out: node for node in graph.node for out in node.output}
    first_conv = next((n for n in graph.node if n.op_type == "Conv"), None)
    if first_conv is None:
        raise DogkitError("the model has no convolution to start INT8 quantization from")
    found, todo = {}, [first_conv.input[0]]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in found:
            found[node.name] = node
            todo.extend(node.input)
    return list(found.values())


def keep_used_opsets(model: onnx.ModelProto) -> None:
    """Drop opset imports no node uses (quantization pre-processing declares nine domains it never uses), so
    any consumer, not only onnxruntime, can open the file."""
    used = {n.domain for n in model.graph.node} | {n.domain for f in model.functions for n in f.node}
    used |= {f.domain for f in model.functions}
    used |= {"", "ai.onnx"}  # the default domain, by either name
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def fold_normalisation(model: onnx.ModelProto) -> bool:
    """Rewrite ``Conv(W, x·a + b)`` as ``Conv(W·a, x − c)`` with ``c = −b/a`` (a, b per channel) in place.

    Exact: the convolution pads with zeros, and ``x − c`` is zero exactly where ``x·a + b`` is, so padding in
    the new space is padding in the old one (folding ``b`` into the bias instead would not be: it would pad
    with the pixel value 0 rather than with the mean). It leaves one Sub on the full-resolution image
    instead of a Mul and an Add. Returns False, changing nothing, when the graph is not in that form.
    """
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def split(node, op):  # (data input, constant) of a two-input node with one initializer
        if node is None or node.op_type != op or len(node.input) != 2:
            return None, None
        a, b = node.input
        return (a, init[b]) if b in init else (b, init[a]) if a in init else (None, None)

    conv = next((n for n in graph.node if n.op_type == "Conv"), None)
    if conv is None or len(conv.input) < 2 or conv.input[1] not in init or len(consumers[conv.input[1]]) != 1:
        return False
    if any(a.name == "group" and a.i != 1 for a in conv.attribute):
        return False
    add = producer.get(conv.input[0])
    mul_out, shift = split(add, "Add")
    mul = producer.get(mul_out)
    x, scale = split(mul, "Mul")
    if x is None or len(consumers[conv.input[0]]) != 1 or len(consumers[mul_out]) != 1:
        return False
    weight = onnx.numpy_helper.to_array(init[conv.input[1]])
    channels = weight.shape[1]
    a = onnx.numpy_helper.to_array(scale).astype(np.float64)
    b = onnx.numpy_helper.to_array(shift).astype(np.float64)
    if a.size != channels or b.size != channels or not np.all(a != 0):
        return False
    a, b = a.reshape(1, channels, 1, 1), b.reshape(1, channels, 1, 1)
    init[conv.input[1]].CopyFrom(onnx.numpy_helper.from_array((weight * a).astype(weight.dtype), conv.input[1]))
    mean = graph.initializer.add()
    mean.CopyFrom(onnx.numpy_helper.from_array((-b / a).astype(np.float32), conv.input[0] + "_pixel_mean"))
    sub = onnx.helper.make_node("Sub", [x, mean.name], [conv.input[0]], name=(add.name or "normalise") + "_folded")
    position = list(graph.node).index(mul)
    graph.node.remove(mul)
    graph.node.remove(add)
    graph.node.insert(position, sub)
    for t in (scale, shift):
        if not any(t.name in n.input for n in graph.node):
            graph.initializer.remove(t)
    return True


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Static QDQ INT8: uint8 activations × int8 per-channel weights (the fast pairing on x86 VNNI), from the
    first convolution on. The preprocessing in front of it stays in float: quantized element-wise ops on the
    full-resolution image cost a third of the INT8 run and buy nothing, since the image is uint8 already."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre))
            prepared = onnx.load(str(pre))
            fold_normalisation(prepared)
            for i, node in enumerate(prepared.graph.node):  # nodes_to_exclude goes by name
                node.name = node.name or f"{node.op_type}_{i}"
            onnx.save(prepared, str(pre))
            exclude = [n.name for n in preprocessing_nodes(prepared.graph)]
            quantize_static(str(pre), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude)
        except DogkitError:
            raise
        except Exception as e:  # the quantization tools raise anything from AssertionError to ORT errors
            raise DogkitError(f"INT8 quantization failed: {cause(e)}") from e


def copy_metadata(src: Path, dst: Path, extra: dict) -> None:
    meta = {p.key.removeprefix(META_PREFIX): p.value for p in onnx.load(str(src)).metadata_props}
    add_metadata(dst, {**meta, **extra})


def accuracy_gate(ref: np.ndarray, candidate: Path, images: np.ndarray, labels: np.ndarray, max_drop: float) -> dict:
    """The candidate against the fp32 model's logits ``ref`` on the same validation images."""
    got = onnx_logits(candidate, images)
    acc_ref, acc = float((ref.argmax(1) == labels).mean()), float((got.argmax(1) == labels).mean())
    report = {"images": len(images), "top1_agreement_with_fp32": float((ref.argmax(1) == got.argmax(1)).mean()),
              "accuracy_fp32": acc_ref, "accuracy": acc, "accuracy_change": acc - acc_ref, "max_drop": max_drop}
    if acc_ref - acc > max_drop:
        raise DogkitError(
            f"{candidate.name} loses {100 * (acc_ref - acc):.2f} accuracy points on {len(images)} validation images "
            f"({acc_ref:.2%} → {acc:.2%}; top-1 agreement {report['top1_agreement_with_fp32']:.2%}), more than the "
            f"allowed {100 * max_drop:.2f}; it was not kept. Raise --max-drop to accept it."
        )
    return report


def gated_variant(final: Path, path: Path, build, extra_metadata: dict, reference: np.ndarray, images: np.ndarray,
                  labels: np.ndarray, max_drop: float) -> dict:
    """Build a derived model (INT8, fp16) from ``final`` in a temporary folder; keep it only if it passes
    the accuracy gate. On any failure a file left by an earlier export is removed too: it was derived from
    another ``model.onnx``."""
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".export-{pid_tag()}-{path.stem}-") as tmp:
            candidate = Path(tmp) / path.name
            build(candidate)
            copy_metadata(final, candidate, extra_metadata)
            report = accuracy_gate(reference, candidate, images, labels, max_drop)
            os.replace(candidate, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    console.print(f"{path.name}: validation accuracy {report['accuracy_fp32']:.2%} → {report['accuracy']:.2%}, "
                  f"top-1 agreement with fp32 {report['top1_agreement_with_fp32']:.2%} → {escape(str(path))}")
    return report


def to_fp16(final: Path, out: Path) -> None:
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(final)), keep_io_types=True), str(out))
    except Exception as e:  # the converter fails in many ways on unexpected graphs
        raise DogkitError(f"fp16 conversion failed: {cause(e)}") from e


def export(run_dir: Path | None = None, *, runs_dir: Path = Path("artifacts/runs"), data: Path | None = None,
           atol: float = 1e-3, parity_images: int = 64, int8: bool = False, calibration_images: int = 256,
           max_drop: float = 0.01, fp16: bool = False, keep_going: bool = False) -> ExportResult:
    """fp32 ``model.onnx`` behind the parity gate, then the INT8 and fp16 models asked for, each behind the
    accuracy gate. A derived model that cannot be built or fails its gate is recorded in ``export.json`` as
    ``{"error": …}``; with ``keep_going`` that is all (``dogkit study`` goes on with fp32), else the error is
    raised once ``export.json`` is written."""
    run_dir = Path(run_dir) if run_dir else best_run(runs_dir, need="best.pt")
    start = time.perf_counter()
    model, ckpt, cfg = load_best(run_dir)
    remove_stale(run_dir, ".export-*")  # left by an export that was killed
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    dataset = load_dataset(data or cfg.data)
    # The accuracy gates use the whole validation split; the parity gate alone needs only a few images.
    val_images, val_labels = validation_batch(dataset, spec, "val", None if int8 or fp16 else parity_images)
    test_metrics = {}
    if (run_dir / "test_metrics.json").is_file():
        test_metrics = json.loads((run_dir / "test_metrics.json").read_text())["best"].get("test", {})
    metadata = {
        "class_names": ckpt["class_names"], "preprocess": spec.to_json(), "arch": ckpt["arch"],
        "run": run_dir.name, "variant": ckpt.get("variant", "raw"), "epoch": ckpt.get("epoch"),
        "val_metrics": ckpt.get("val_metrics", {}), "test_metrics": test_metrics, "dogkit_version": __version__,
        "input": "images: uint8 RGB, NHWC, batch x size x size x 3; normalisation is inside the model",
    }
    final = run_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=f".export-{pid_tag()}-") as tmp:
        candidate = Path(tmp) / "model.onnx"
        console.print(f"exporting {escape(str(run_dir / 'best.pt'))} ({ckpt['arch']}, {ckpt.get('variant', 'raw')}) "
                      "to ONNX …")
        export_onnx(model, spec, candidate)
        add_metadata(candidate, metadata)
        batch_sizes_ok(candidate, spec)
        parity = check_parity(model, candidate, val_images[:parity_images], atol)
        os.replace(candidate, final)
    result = ExportResult(run_dir, final, parity)
    console.print(f"parity: max |Δlogit| {parity['max_abs_logit_diff']:.2e} on {parity['images']} validation "
                  f"images, top-1 agreement {parity['top1_agreement']:.0%} → {escape(str(final))}")

    reference = onnx_logits(final, val_images) if int8 or fp16 else None
    failures = []

    def variant(path: Path, build, extra: dict) -> dict:
        try:
            return gated_variant(final, path, build, extra, reference, val_images, val_labels, max_drop)
        except Exception as e:  # "for any reason": quantizer, converter, checker or gate
            error = e if isinstance(e, DogkitError) else DogkitError(f"{path.name} failed: {cause(e)}")
            failures.append(error)
            console.print(f"[yellow]{escape(path.name)} not written: {escape(str(error))}[/]")
            return {"error": str(error)}

    if int8:
        # Calibrate on exactly what the model will be fed: uint8 images from the evaluation transform.
        train_records = dataset.split("train")
        pick = np.random.default_rng(0).permutation(len(train_records))[:calibration_images]
        calibration = np.stack([eval_transform(dataset.load_rgb(train_records[i], spec.box_crop), spec)
                                for i in sorted(pick)])
        result.int8 = variant(run_dir / "model.int8.onnx", lambda out: quantize_int8(final, out, calibration),
                              {"quantization": f"static int8 QDQ from the first convolution on, per-channel, uint8 "
                                               f"activations, {len(calibration)} calibration images"})
    if fp16:
        result.fp16 = variant(run_dir / "model.fp16.onnx", lambda out: to_fp16(final, out),
                              {"precision": "fp16 weights and activations, fp32 logits"})
    report = {"model": final.name, "seconds": time.perf_counter() - start, "opset": OPSET,
              # The level every gate ran at, and the one eval, predict and bench use.
              "onnxruntime": {"version": ort_version(), "graph_optimization_level": GRAPH_OPTIMIZATION},
              "parity": parity, "int8": result.int8, "fp16": result.fp16,
              "metadata": {k: v for k, v in metadata.items() if k != "class_names"}}
    atomic_write_text(run_dir / "export.json", json.dumps(report, indent=2, default=str) + "\n")
    if failures and not keep_going:
        raise failures[0] from None
    return result


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
