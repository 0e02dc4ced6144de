"""Derived ONNX models: an exported fp32 file turned into a static INT8 or an fp16 one. No torch here.

INT8 is QDQ from the first convolution on (per-channel int8 weights, uint8 activations, calibrated on
training images); the in-model preprocessing in front of it stays in float, with the normalisation folded
into the first convolution. fp16 converts weights and activations and keeps fp32 inputs and logits.
``export`` puts each derived file behind the accuracy gate; any failure here is one ``DogkitError`` line.
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path

import numpy as np
import onnx

from ..errors import DogkitError


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


def to_fp16(final: Path, out: Path) -> None:
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(final)), keep_io_types=True), str(out))
    except Exception as e:  # the converter fails in many ways on unexpected graphs
        raise DogkitError(f"fp16 conversion failed: {cause(e)}") from e
