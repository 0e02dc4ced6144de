"""Why an exported model's INT8 file passes its gate or not: agreement with fp32 under several calibrations, the speed
of each file, and ONNX Runtime's profile of where the INT8 time goes (depthwise convolutions against the others).

Each INT8 file is built by dogkit's own ``quantize_int8`` (QDQ, per-channel weights, the export's 256 calibration
images) with the calibration method swapped; agreement and accuracy are on the whole validation split.

    python scripts/int8_probe.py RUN/model.onnx --data artifacts/data/dogs51 --methods MinMax Percentile Entropy
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.quantization as oq

from dogkit.data.dataset import load_dataset
from dogkit.deploy import quantize
from dogkit.deploy.preprocess import eval_transform
from dogkit.deploy.runtime import OnnxClassifier
from dogkit.training.export import calibration_batch, onnx_logits


def images_per_second(path: Path, batch: np.ndarray, seconds: float = 3.0) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch}
    for _ in range(5):
        session.run(None, feed)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        session.run(None, feed)
        n += len(batch)
    return n / (time.perf_counter() - start)


def conv_milliseconds(path: Path, batch: np.ndarray, out: Path, runs: int = 30) -> dict[str, float]:
    """Milliseconds per batch in depthwise convolutions, in the other convolutions, in the other ops and in all,
    from ORT's profile (its node names are the optimised graph's, saved into ``out`` to read the groups)."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(out / path.stem)
    options.optimized_model_filepath = str(out / f"{path.stem}.opt.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1)
              for n in onnx.load(str(out / f"{path.stem}.opt.onnx")).graph.node}
    spent = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            kind = ("depthwise" if groups.get(node, 1) > 1 else "other convolutions") if "Conv" in e["args"][
                "op_name"] else "other ops"
            spent[kind] += e["dur"] / 1e3 / runs
    return {**spent, "total": sum(spent.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an exported fp32 model.onnx")
    parser.add_argument("--data", type=Path, required=True, help="its prepared dataset")
    parser.add_argument("--methods", nargs="+", default=["MinMax", "Percentile", "Entropy"])
    args = parser.parse_args()
    dataset, spec = load_dataset(args.data), OnnxClassifier(args.model).spec
    val = dataset.split("val")
    images = np.stack([eval_transform(dataset.load_rgb(r), spec) for r in val])
    labels = np.array([r.label for r in val])
    reference = onnx_logits(args.model, images).argmax(1)
    calibration = calibration_batch(dataset, spec, 256)
    batch = images[:8]
    plain = oq.quantize_static
    with tempfile.TemporaryDirectory() as tmp:  # the INT8 files and the profiles: nothing is left beside the model
        print(f"fp32: validation top-1 {(reference == labels).mean():.2%}, {images_per_second(args.model, batch):.0f} "
              f"img/s at batch 8; {conv_milliseconds(args.model, batch, Path(tmp))}")
        for method in args.methods:
            def with_method(*a, method=method, **k):
                return plain(*a, **k, calibrate_method=getattr(oq.CalibrationMethod, method),
                             **({"extra_options": {"CalibPercentile": 99.99}} if method == "Percentile" else {}))
            oq.quantize_static = with_method
            out = Path(tmp) / f"int8-{method}.onnx"
            quantize.quantize_int8(args.model, out, calibration)
            answers = onnx_logits(out, images).argmax(1)
            print(f"INT8 {method}: validation top-1 {(answers == labels).mean():.2%}, agreement with fp32 "
                  f"{(answers == reference).mean():.2%}, {images_per_second(out, batch):.0f} img/s at batch 8; "
                  f"{conv_milliseconds(out, batch, Path(tmp))}", flush=True)
    oq.quantize_static = plain


if __name__ == "__main__":
    main()
