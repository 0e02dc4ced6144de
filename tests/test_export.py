import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torchless import CLI_WITHOUT_TORCH

from dogkit.analysis.evaluate import evaluate
from dogkit.data.dataset import load_dataset
from dogkit.data.images import read_rgb
from dogkit.deploy.predict import collect_paths, predict, write_predictions
from dogkit.deploy.preprocess import PreprocessSpec
from dogkit.deploy.runtime import OnnxClassifier
from dogkit.errors import DogkitError
from dogkit.training.checkpoint import load_best
from dogkit.training.export import NHWCInput, ParityError, export


def test_export_carries_metadata_and_passes_the_full_checker(exported: Path, tiny_run: Path):
    onnx.checker.check_model(str(exported), full_check=True)
    model = onnx.load(str(exported))
    assert model.opset_import[0].version >= 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    runner = OnnxClassifier(exported)
    assert runner.class_names[0] == "Chihuahua" and len(runner.class_names) == 120
    assert runner.spec.size == 32 and runner.spec.resize == 37
    assert runner.info("arch") == "resnet18" and runner.info("run") == tiny_run.name
    assert set(runner.info("val_metrics")) >= {"accuracy", "precision_macro", "recall_macro"}
    report = json.loads((tiny_run / "export.json").read_text())
    assert report["parity"]["top1_agreement"] == 1.0 and report["parity"]["max_abs_logit_diff"] <= 1e-3


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_dynamic_batch_matches_pytorch_row_for_row(exported: Path, tiny_run: Path, batch: int):
    torch_model, _, _ = load_best(tiny_run)
    images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = NHWCInput(torch_model)(images).numpy()
    got = OnnxClassifier(exported).run(images.numpy())
    assert got.shape == (batch, 120)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_parity_gate_refuses_a_perturbed_model(tiny_run: Path, tmp_path: Path, monkeypatch):
    import dogkit.training.export as export_module

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model*.onnx", "eval"))
    real_export = export_module.export_onnx

    def perturbed(model, spec, path, maps=False):
        real_export(model, spec, path, maps)
        graph = onnx.load(str(path))
        init = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
        weights = onnx.numpy_helper.to_array(init).copy()
        weights += 0.05 * np.random.default_rng(0).standard_normal(weights.shape).astype(weights.dtype)
        init.CopyFrom(onnx.numpy_helper.from_array(weights, init.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(export_module, "export_onnx", perturbed)
    with pytest.raises(ParityError, match=r"max \|Δlogit\| [0-9.e-]+ \(allowed 0.001\)"):
        export(run, parity_images=16)
    assert not (run / "model.onnx").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".export")]


# The operators each exported network is made of (Unsqueeze: the head's weights as the 1 × 1 convolution that
# makes the activation maps). Lite0's "same" padding is static at a fixed input size: folded into Conv's pads.
OPERATORS = {"resnet18": {"Transpose", "Cast", "Mul", "Add", "Conv", "Relu", "MaxPool", "ReduceMean", "Reshape",
                          "Gemm", "Unsqueeze"},
             "timm/tf_efficientnet_lite0": {"Transpose", "Cast", "Mul", "Add", "Conv", "Clip", "ReduceMean",
                                            "Reshape", "Gemm", "Unsqueeze"}}


@pytest.fixture(scope="module", params=list(OPERATORS))
def exported_64(tmp_path_factory, request) -> Path:
    """A resnet18 (the session's 64 px run exported as users get it) and a random timm EfficientNet-Lite0 exported at
    64 px: at 32 px the last feature map is 1×1 and hides the strided flatten that larger inputs (ResNet50 at 224
    px) exported as a shape-computing subgraph."""
    from dogkit.training.export import add_metadata, export_onnx
    from dogkit.training.models import build_model, weights_preprocess

    if request.param == "resnet18":
        return request.getfixturevalue("explained")
    pytest.importorskip("timm")
    spec = weights_preprocess(request.param, 64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export64") / "model.onnx"
    export_onnx(build_model(request.param, 120, spec=spec).eval(), spec, path, maps=True)  # the graph users get
    add_metadata(path, {"class_names": [f"breed {i}" for i in range(120)], "preprocess": spec.to_json(),
                        "arch": request.param})
    return path


def test_a_model_exported_into_the_graph_traced_for_another_is_the_file_a_fresh_trace_writes(tmp_path, monkeypatch):
    """A study exports several models of one structure: the second is not traced again, its weights go into the
    first one's graph. The file must be the very bytes a fresh trace gives, and another structure is traced anew."""
    import dogkit.training.export as export_module
    from dogkit.training.cam import WithMaps
    from dogkit.training.models import build_model, weights_preprocess

    spec = weights_preprocess("resnet18", 32)
    torch.manual_seed(0)
    first, second = (build_model("resnet18", 120, spec=spec).eval() for _ in range(2))
    monkeypatch.setattr(export_module, "_traced", None)
    export_module.export_onnx(first, spec, tmp_path / "first.onnx", maps=True)
    traced = export_module._traced
    export_module.export_onnx(second, spec, tmp_path / "reused.onnx", maps=True)
    assert export_module._traced is traced  # not traced again
    monkeypatch.setattr(export_module, "_traced", None)
    export_module.export_onnx(second, spec, tmp_path / "fresh.onnx", maps=True)
    reused, fresh = (tmp_path / "reused.onnx").read_bytes(), (tmp_path / "fresh.onnx").read_bytes()
    assert reused == fresh and reused != (tmp_path / "first.onnx").read_bytes()
    # Another structure is traced anew: ten classes, a dropout before the head, another input size.
    def key(model, size=32):
        wrapped = WithMaps(model)
        return export_module.graph_key(wrapped, export_module.module_tensors(wrapped), size)

    assert key(second) == traced.key
    others = [build_model("resnet18", 10, spec=spec), build_model("resnet18", 120, spec=spec, dropout=0.2)]
    assert all(key(other) != traced.key for other in others) and key(second, 64) != traced.key


def test_exported_graph_is_plain_operators_with_no_shape_computation(exported_64: Path):
    """torch.flatten after a channels-last global pool used to export as Shape → Range → Gather → Mul …, a
    subgraph that OpenCV 4.x refuses and onnxruntime's symbolic shape inference asserts on."""
    graph = onnx.load(str(exported_64)).graph
    ops = {n.op_type for n in graph.node}
    arch = next(e.value for e in onnx.load(str(exported_64)).metadata_props if e.key == "dogkit.arch")
    assert ops == OPERATORS[arch]
    assert [o.name for o in graph.output] == ["logits", "cams"]
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    reshape = next(n for n in graph.node if n.op_type == "Reshape")
    assert reshape.input[1] in constants  # a static target shape, batch left to -1
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert OnnxClassifier(exported_64).run(np.zeros((5, 64, 64, 3), np.uint8)).shape == (5, 120)


def feeds(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def test_int8_quantizes_from_the_first_convolution_on(exported_int8: Path, exported: Path):
    graph = onnx.load(str(exported_int8)).graph
    consumers = feeds(graph)
    producer = {o: n for n in graph.node for o in n.output}
    # Follow the image from the input to the first QuantizeLinear: plain float preprocessing only.
    path, tensor = [], graph.input[0].name
    while True:
        (node,) = consumers[tensor]
        if node.op_type == "QuantizeLinear":
            break
        path.append(node)
        assert not any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input)
        (tensor,) = node.output
    assert [n.op_type for n in path] == ["Transpose", "Cast", "Sub"]  # Mul and Add folded into the first Conv
    (dq,) = consumers[node.output[0]]
    assert dq.op_type == "DequantizeLinear" and [n.op_type for n in consumers[dq.output[0]]] == ["Conv"]
    ops = [n.op_type for n in graph.node]
    assert not [op for op in ops if op.startswith("QLinear")]
    assert ops.count("Conv") == 21 and ops.count("QuantizeLinear") > 21  # resnet18's 20 and the maps', all quantized
    # Quantization pre-processing declares nine domains it never uses; only the used ones remain.
    model = onnx.load(str(exported_int8))
    assert {o.domain for o in model.opset_import} == {n.domain for n in graph.node} == {""}


def test_normalisation_fold_is_exact_including_the_zero_padded_border(exported: Path):
    from dogkit.deploy.quantize import fold_normalisation

    model = onnx.load(str(exported))
    assert fold_normalisation(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops[:4] == ["Transpose", "Cast", "Sub", "Conv"] and "Mul" not in ops
    folded = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    images[0] = 0  # the border is where folding the shift into the bias would go wrong
    images[1] = 255
    expected = OnnxClassifier(exported).run(images)
    got = folded.run(None, {"images": images})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_int8_gate_at_its_real_default_threshold(exported_int8: Path):
    import inspect

    import dogkit.training.export as export_module
    from dogkit.cli import export as cli_export

    report = json.loads((exported_int8.parent / "export.json").read_text())
    assert report["int8"]["max_drop"] == 0.01 == inspect.signature(export).parameters["max_drop"].default
    assert inspect.signature(cli_export).parameters["max_drop"].default == 0.01
    assert report["int8"]["images"] == 120 and report["int8"]["accuracy_fp32"] - report["int8"]["accuracy"] <= 0.01
    assert report["onnxruntime"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    # The gate itself at 0.01 on 120 images: one image lost (0.83 points) passes, two (1.67 points) do not.
    labels = np.arange(120) % 4
    reference = np.eye(4)[labels] * 5.0
    reference[60:] = np.eye(4)[(labels[60:] + 1) % 4] * 5.0  # fp32: 60 of 120 right

    def candidate_losing(k: int) -> np.ndarray:
        got = reference.copy()
        got[:k] = np.eye(4)[(labels[:k] + 1) % 4]
        return got

    for k, passes in ((0, True), (1, True), (2, False)):
        if passes:
            gate = export_module.accuracy_gate(reference, candidate_losing(k), labels, exported_int8.name, 0.01,
                                               min_agreement=0.0)
            assert gate["accuracy_change"] == pytest.approx(-k / 120)
        else:
            with pytest.raises(DogkitError, match=r"^model\.int8\.onnx loses 1\.67 accuracy points .* allowed 1\.00; "
                                                  r"it was not kept"):
                export_module.accuracy_gate(reference, candidate_losing(k), labels, exported_int8.name, 0.01,
                                            min_agreement=0.0)


def test_int8_gate_refuses_a_model_that_changes_answers_at_the_same_accuracy(exported_int8: Path):
    import inspect

    import dogkit.training.export as export_module
    from dogkit.cli import export as cli_export

    assert inspect.signature(export).parameters["min_agreement"].default == 0.97 == export_module.MIN_AGREEMENT
    assert inspect.signature(cli_export).parameters["min_agreement"].default == 0.97
    # fp32 right on 60 of 120; the candidate moves k wrong answers to other wrong classes: accuracy is unchanged.
    labels = np.arange(120) % 4
    reference = np.eye(4)[labels] * 5.0
    reference[60:] = np.eye(4)[(labels[60:] + 1) % 4] * 5.0

    def candidate_flipping(k: int) -> np.ndarray:
        got = reference.copy()
        got[60:60 + k] = np.eye(4)[(labels[60:60 + k] + 2) % 4] * 5.0
        return got

    for k, passes in ((3, True), (4, False)):  # 117/120 = 97.5 % agree; 116/120 = 96.7 % do not
        if passes:
            gate = export_module.accuracy_gate(reference, candidate_flipping(k), labels, exported_int8.name, 0.01)
            assert gate["accuracy_change"] == 0 and gate["top1_agreement_with_fp32"] == pytest.approx(117 / 120)
        else:
            with pytest.raises(DogkitError, match=r"fp32's top-1 on only 96\.67% of 120 validation images "
                                                  r"\(required 97%; accuracy 50\.00% → 50\.00%\)"):
                export_module.accuracy_gate(reference, candidate_flipping(k), labels, exported_int8.name, 0.01)


def test_int8_failure_is_one_line_and_keeps_fp32(tiny_run: Path, tmp_path: Path, monkeypatch):
    import onnxruntime.quantization as quantization

    def broken(*args, **kwargs):
        raise AssertionError  # what a bare assert in symbolic shape inference raises

    monkeypatch.setattr(quantization, "quantize_static", broken)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model*.onnx", "export.json", "eval"))
    (run / "model.int8.onnx").write_bytes(b"left by an earlier export")
    with pytest.raises(DogkitError) as info:
        export(run, parity_images=8, variants=["int8"], calibration_images=16)
    message = str(info.value)
    assert re.fullmatch(r"INT8 quantization failed: AssertionError: in broken \(test_export\.py:\d+\)", message)
    assert (run / "model.onnx").is_file() and not (run / "model.int8.onnx").exists()
    assert json.loads((run / "export.json").read_text())["int8"] == {"error": message}
    result = export(run, parity_images=8, variants=["int8"], calibration_images=16, keep_going=True)
    assert result.derived["int8"] == {"error": message} and result.onnx_path.is_file()


def _with_calibration(source: Path, dest: Path, calibration: dict) -> Path:
    """A copy of an exported model whose dogkit.calibration entry is ``calibration``."""
    model = onnx.load(str(source))
    next(e for e in model.metadata_props if e.key == "dogkit.calibration").value = json.dumps(calibration)
    onnx.save(model, str(dest))
    return dest


def test_the_int8_file_carries_a_calibration_fitted_on_its_own_validation_logits(exported_int8: Path,
                                                                                 prepared_sample: Path):
    from scipy.special import softmax
    from sklearn.metrics import log_loss

    from dogkit.calibration import calibrate
    from dogkit.deploy.evaluate import onnx_evaluation
    from dogkit.deploy.evaluate import onnx_logits as split_logits
    from dogkit.deploy.serve import explain_card

    run = exported_int8.parent
    report = json.loads((run / "export.json").read_text())
    int8, fp32 = OnnxClassifier(exported_int8), OnnxClassifier(run / "model.onnx")
    # onnxruntime's own outputs of each file on the validation split, computed here
    logits, labels, _, _ = split_logits(exported_int8, prepared_sample, "val", 32)
    fp32_logits, _, _, _ = split_logits(run / "model.onnx", prepared_sample, "val", 32)
    record = int8.calibration
    assert record == report["int8"]["calibration"]  # the file's metadata and export.json say the same
    assert record["fitted_for"] == "int8" and record["split"] == "val" and record["images"] == len(labels) == 120
    expected, fp32_fit = calibrate(logits, labels), calibrate(fp32_logits, labels)
    for key in ("temperature", "ece_raw", "ece", "nll_raw", "nll"):
        assert record[key] == pytest.approx(expected[key], rel=1e-6), key
    assert record["selective"] == expected["selective"]
    # scikit-learn's log loss of INT8's probabilities at its own temperature
    probs = softmax(logits.astype(np.float64) / record["temperature"], axis=1)
    assert record["nll"] == pytest.approx(log_loss(labels, probs, labels=range(120)), rel=1e-6)
    # INT8 answers differently from fp32 (86 % top-1 agreement here), so its record is not fp32's
    assert record["ece_raw"] != pytest.approx(fp32_fit["ece_raw"], rel=0.05)
    assert fp32.calibration == report["calibration"] and fp32.calibration["fitted_for"] == "fp32"
    assert fp32.calibration["ece_raw"] == pytest.approx(fp32_fit["ece_raw"], rel=1e-6)
    # what predict, serve and eval use for each file: its own
    assert int8.temperature == record["temperature"] != fp32.temperature
    assert int8.threshold == (record["selective"]["threshold"] or float("inf"))
    card = explain_card(int8)
    assert card["temperature"] == record["temperature"]
    assert card["threshold_source"] == ("model" if record["selective"]["met"] else "unreachable")
    evaluated = onnx_evaluation(exported_int8, prepared_sample, "val", 32, localise=False)
    assert evaluated.calibration == record and evaluated.temperature == record["temperature"]
    np.testing.assert_array_equal(evaluated.logits, logits)


def test_a_stored_threshold_is_checked_as_served_and_one_that_misses_its_target_is_refused(
        exported_int8: Path, prepared_sample: Path, tmp_path: Path):
    from dogkit.calibration import probabilities
    from dogkit.deploy.evaluate import onnx_logits as split_logits
    from dogkit.training.export import check_unsure

    logits, labels, _, _ = split_logits(exported_int8, prepared_sample, "val", 32)
    record = OnnxClassifier(exported_int8).calibration
    cal = probabilities(logits, record["temperature"])
    lowest = float(cal.max(1).min())  # a threshold that answers every image, at INT8's accuracy
    accuracy = float((cal.argmax(1) == labels).mean())
    assert 0 < accuracy < 0.05
    path = tmp_path / exported_int8.name
    for target, kept in ((accuracy, True), (accuracy + 1e-3, False)):
        forged = {**record, "selective": {**record["selective"], "threshold": lowest, "met": True,
                                          "target_precision": target}}
        _with_calibration(exported_int8, path, forged)
        if kept:
            check_unsure(path, logits, labels)
        else:
            with pytest.raises(DogkitError, match=rf"^model\.int8\.onnx's \"unsure\" threshold {lowest:.4g} gives "
                                                  rf"{100 * accuracy:.2f}% precision on 120 validation images \(120 "
                                                  r"answered\), below its target 2%; it was not kept$"):
                check_unsure(path, logits, labels)
    # No threshold (its target unreachable): the file says so, and every answer is unsure.
    _with_calibration(exported_int8, path, {**record, "selective": {**record["selective"], "threshold": None,
                                                                    "met": False}})
    check_unsure(path, logits, labels)
    assert OnnxClassifier(path).threshold == float("inf")
    # A derived file without a record of its own (fp32's, copied by exports before) is refused too.
    fp32_record = OnnxClassifier(exported_int8.parent / "model.onnx").calibration
    _with_calibration(exported_int8, path, fp32_record)
    with pytest.raises(DogkitError, match=r"^model\.int8\.onnx carries no \"unsure\" threshold of its own$"):
        check_unsure(path, logits, labels)


def test_an_int8_file_carrying_fp32s_calibration_is_served_uncalibrated(exported_int8: Path, sample_dir: Path,
                                                                        tmp_path: Path):
    """A file from an export before each file had its own calibration: fp32's record was never checked on its
    answers, so predict, serve and eval use none (temperature 1, never unsure), and predict says so."""
    run = exported_int8.parent
    fp32_record = json.loads((run / "export.json").read_text())["calibration"]
    legacy = {k: v for k, v in fp32_record.items() if k != "fitted_for"}  # as exports before wrote it
    path = _with_calibration(exported_int8, tmp_path / exported_int8.name, legacy)
    model = OnnxClassifier(path)
    assert model.calibration == {} and model.temperature == 1.0 and model.threshold is None
    fp32 = _with_calibration(run / "model.onnx", tmp_path / "model.onnx", legacy)
    assert OnnxClassifier(fp32).calibration == legacy  # an fp32 file's record is its own, however old
    photos = sorted((sample_dir / "Images" / "n02085620-Chihuahua").iterdir())[:3]
    proc = subprocess.run([sys.executable, "-m", "dogkit", "predict", *map(str, photos), "--model", str(path),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert " ".join(proc.stderr.split()).count("predates calibration (no temperature or unsure threshold fitted "
                                               "on its own outputs in its metadata)") == 1
    assert not any(row["unsure"] for row in json.loads(proc.stdout))


def test_a_variant_whose_own_threshold_misses_its_target_is_not_kept(tiny_run: Path, tmp_path: Path, monkeypatch):
    import dogkit.training.export as export_module
    from dogkit.calibration import probabilities

    fitted = export_module.own_calibration

    def lowered(variant, logits, labels, target):  # INT8's threshold moved down to answer every image
        record = fitted(variant, logits, labels, target)
        if variant.name == "int8":
            lowest = float(probabilities(logits, record["temperature"]).max(1).min())
            record["selective"] = {**record["selective"], "threshold": lowest, "met": True}
        return record

    monkeypatch.setattr(export_module, "own_calibration", lowered)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model*.onnx", "export.json", "eval", "bench.json"))
    (run / "model.int8.onnx").write_bytes(b"left by an earlier export")
    result = export(run, parity_images=8, variants=["int8"], calibration_images=32, min_agreement=0.0,
                    keep_going=True)
    error = result.derived["int8"]["error"]
    assert re.fullmatch(r"model\.int8\.onnx's \"unsure\" threshold [0-9.e-]+ gives [0-9.]+% precision on 120 "
                        r"validation images \(120 answered\), below its target 95%; it was not kept", error)
    assert (run / "model.onnx").is_file() and not (run / "model.int8.onnx").exists()
    assert json.loads((run / "export.json").read_text())["int8"] == {"error": error}


def test_fp32_export_runs_in_opencv_dnn_and_agrees_with_onnxruntime(exported_64: Path, prepared_sample: Path):
    import cv2

    if not hasattr(cv2, "dnn"):
        pytest.skip(f"OpenCV {cv2.__version__} was built without its DNN module")
    dataset = load_dataset(prepared_sample)
    runner = OnnxClassifier(exported_64)
    images = np.stack([runner.preprocess(dataset.load_rgb(r)) for r in dataset.split("val")[:32]])
    net = cv2.dnn.readNetFromONNX(str(exported_64))
    net.setInput(images)
    got, maps = net.forward(["logits", "cams"])  # by name: OpenCV 4 would return the last layer, the maps
    expected, expected_maps = runner.run_maps(images)
    assert got.shape == expected.shape == (32, 120)
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert maps.shape == expected_maps.shape == (32, 120, 2, 2) and np.abs(maps - expected_maps).max() < 1e-4


OPENCV4 = os.environ.get("DOGKIT_OPENCV4_PYTHON")


@pytest.mark.skipif(not OPENCV4, reason="set DOGKIT_OPENCV4_PYTHON to a Python with opencv-python-headless 4.x")
def test_fp32_export_runs_in_opencv_4(exported_64: Path, tmp_path: Path):
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = ("import sys, cv2, numpy as np; assert cv2.__version__.startswith('4.'), cv2.__version__; "
              "net = cv2.dnn.readNetFromONNX(sys.argv[1]); net.setInput(np.load(sys.argv[2])); "
              "logits, maps = net.forward(['logits', 'cams']); np.save(sys.argv[3], logits); "
              "np.save(sys.argv[3] + '.maps.npy', maps)")
    proc = subprocess.run([OPENCV4, "-c", script, str(exported_64), str(tmp_path / "images.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (got, maps), (expected, expected_maps) = [np.load(tmp_path / "out.npy"), np.load(tmp_path / "out.npy.maps.npy")], \
        OnnxClassifier(exported_64).run_maps(images)
    assert np.abs(got - expected).max() < 1e-4 and (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(maps - expected_maps).max() < 1e-4


def test_predict_skips_unreadable_files_and_keeps_a_stable_order(exported: Path, sample_dir: Path, tmp_path: Path):
    folder = tmp_path / "photos"
    shutil.copytree(sample_dir / "Images" / "n02085620-Chihuahua", folder / "a")
    shutil.copytree(sample_dir / "Images" / "n02110958-pug", folder / "b")
    good = sorted((folder / "a").glob("*.jpg"))[0]
    (folder / "a" / "corrupt.jpg").write_bytes(good.read_bytes()[:2000])
    (folder / "b" / "notes.txt").write_text("not an image")
    paths = collect_paths([str(folder / "a"), str(folder / "b" / "*.jpg"), str(folder / "b" / "notes.txt")])
    assert len(paths) == 8 + 1 + 8 + 1
    model = OnnxClassifier(exported)
    predictions, failures = predict(model, paths, top_k=3, batch_size=5)
    assert {Path(p).name: r for p, r in failures} == {"corrupt.jpg": "truncated JPEG (no end-of-image marker)",
                                                      "notes.txt": "not an image (unrecognised file format)"}
    assert [p.path for p in predictions] == [str(p) for p in paths if p.name not in ("corrupt.jpg", "notes.txt")]
    first = predictions[0]
    assert len(first.labels) == 3 and first.probs == sorted(first.probs, reverse=True) and 0 < sum(first.probs) <= 1
    logits = model.run(model.preprocess(read_rgb(first.path))[None])
    assert first.labels[0] == model.class_names[int(logits.argmax())]
    write_predictions(predictions, tmp_path / "p.csv")
    write_predictions(predictions, tmp_path / "p.json")
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "path,label1,prob1,label2,prob2,label3,prob3,answer,error"
    assert len(json.loads((tmp_path / "p.json").read_text())) == 16


def test_torch_and_onnx_evaluation_agree(exported: Path, tiny_run: Path, prepared_sample: Path, tmp_path: Path):
    onnx_result = evaluate("onnx", model=exported, out=tmp_path / "onnx")
    torch_result = evaluate("torch", run=tiny_run, out=tmp_path / "torch")
    np.testing.assert_array_equal(onnx_result.labels, torch_result.labels)
    assert np.abs(onnx_result.logits - torch_result.logits).max() < 1e-3
    assert (onnx_result.logits.argmax(1) == torch_result.logits.argmax(1)).all()
    assert onnx_result.metrics == pytest.approx(torch_result.metrics, abs=1e-9)
    for name in ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png"):
        assert (tmp_path / "onnx" / name).stat().st_size > 0
    rows = (tmp_path / "onnx" / "confusion.csv").read_text().splitlines()
    assert len(rows) == 121 and sum(int(v) for r in rows[1:] for v in r.split(",")[1:]) == 120
    # Each backend against an independent computation: the torch backend against the checkpoint's model run
    # directly on the pixels the ONNX runtime prepares from its own metadata, the ONNX backend against a
    # fresh ONNX Runtime session over the same pixels. The model must tell images apart, or agreement is empty.
    dataset = load_dataset(prepared_sample)
    runner = OnnxClassifier(exported)
    model, ckpt, _ = load_best(tiny_run)
    assert runner.spec == PreprocessSpec.from_dict(ckpt["preprocess"])
    records = dataset.split("test")
    pixels = np.stack([runner.preprocess(dataset.load_rgb(r)) for r in records])
    with torch.inference_mode():
        direct = NHWCInput(model)(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(torch_result.logits, direct, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(onnx_result.logits, runner.run(pixels), atol=1e-6, rtol=1e-6)
    assert direct.std(axis=0).min() > 1e-3 and len(set(direct.argmax(1).tolist())) > 1
    assert onnx_result.metrics["accuracy"] == pytest.approx(float((direct.argmax(1) == torch_result.labels).mean()))
    assert torch_result.labels.tolist() == [r.label for r in records]


def test_eval_on_a_folder_of_class_folders(exported: Path, sample_dir: Path, tmp_path: Path):
    folder = tmp_path / "my-photos"
    shutil.copytree(sample_dir / "Images" / "n02085620-Chihuahua", folder / "Chihuahua")
    shutil.copytree(sample_dir / "Images" / "n02110958-pug", folder / "n02110958-pug")
    result = evaluate("onnx", model=exported, data=folder, out=tmp_path / "eval")
    runner = OnnxClassifier(exported)
    assert sorted(set(result.labels.tolist())) == [0, runner.class_names.index("pug")]
    assert len(result.labels) == 16
    # The metrics are the model's on these 16 photos, macro-averaged over the classes present (scikit-learn's rule).
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    files = sorted((folder / "Chihuahua").iterdir()) + sorted((folder / "n02110958-pug").iterdir())
    logits = runner.run(np.stack([runner.preprocess(read_rgb(f)) for f in files]))
    np.testing.assert_allclose(result.logits, logits, rtol=0, atol=1e-5)
    preds = logits.argmax(1)
    p, r, f, _ = precision_recall_fscore_support(result.labels, preds, average="macro", zero_division=0)
    assert result.metrics["accuracy"] == pytest.approx(accuracy_score(result.labels, preds))
    assert (result.metrics["precision_macro"], result.metrics["recall_macro"], result.metrics["f1_macro"]) == \
        pytest.approx((p, r, f))
    assert result.metrics["macro_classes"] == len(set(result.labels) | set(preds))
    assert "classes present" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["macro_average"]
    (folder / "Unicorn").mkdir()
    (folder / "Unicorn" / "x.jpg").write_bytes((folder / "Chihuahua").iterdir().__next__().read_bytes())
    with pytest.raises(DogkitError, match="class folders the model does not know: Unicorn"):
        evaluate("onnx", model=exported, data=folder, out=tmp_path / "eval2")




def test_onnx_paths_never_import_torch(exported: Path, sample_dir: Path, prepared_sample: Path, tmp_path: Path):
    env = dict(os.environ)

    def run(*args):
        return subprocess.run([sys.executable, "-c", CLI_WITHOUT_TORCH, *args], capture_output=True, text=True, env=env,
                              timeout=300)

    images = sample_dir / "Images" / "n02085620-Chihuahua"
    proc = run("predict", str(images), "--model", str(exported), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 9
    proc = run("eval", "--backend", "onnx", "--model", str(exported), "--data", str(prepared_sample), "--out",
               str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 120
    # The guard really blocks: the torch backend fails inside the same harness.
    proc = run("eval", "--backend", "torch", "--run", str(exported.parent), "--out", str(tmp_path / "t"))
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_results_pipe_on_stdout_and_everything_else_goes_to_stderr(exported: Path, sample_dir: Path,
                                                                   prepared_sample: Path, tmp_path: Path):
    import csv
    import io

    def run(*args):
        return subprocess.run([sys.executable, "-m", "dogkit", *args], capture_output=True, text=True, timeout=300)

    images = sample_dir / "Images" / "n02085620-Chihuahua"
    piped = run("predict", str(images), "--model", str(exported), "--top-k", "2")  # stdout is a pipe here
    dash = run("predict", str(images), "--model", str(exported), "--top-k", "2", "--out", "-")
    as_json = run("predict", str(images), "--model", str(exported), "--top-k", "2", "--json")
    for proc in (piped, dash, as_json):
        assert proc.returncode == 0, proc.stderr
        assert "8 images predicted, 0 skipped" in proc.stderr and "images predicted" not in proc.stdout
    rows = list(csv.DictReader(io.StringIO(piped.stdout)))  # no box drawing, no folding: rows a program reads
    assert piped.stdout == dash.stdout and len(rows) == 8 and list(rows[0]) == ["path", "label1", "prob1",
                                                                                 "label2", "prob2", "answer",
                                                                                 "error"]
    top = json.loads(as_json.stdout)
    assert [r["path"] for r in top] == [r["path"] for r in rows]
    assert [t["top"][0]["label"] for t in top] == [r["label1"] for r in rows]
    assert all(abs(t["top"][0]["prob"] - float(r["prob1"])) < 1e-6 for t, r in zip(top, rows))

    proc = run("eval", "--backend", "onnx", "--model", str(exported), "--data", str(prepared_sample), "--out",
               str(tmp_path / "eval"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "top-1" in proc.stderr  # the human summary stays on stderr
    proc = run("eval", "--backend", "onnx", "--model", str(exported), "--data", str(prepared_sample), "--out",
               str(tmp_path / "eval2"))
    fields = dict(f.split("=", 1) for f in proc.stdout.strip().split("\t"))
    assert float(fields["accuracy"]) == pytest.approx(json.loads(
        (tmp_path / "eval2" / "metrics.json").read_text())["metrics"]["accuracy"], abs=1e-4)
    assert fields["images"] == "120" and fields["report"] == str(tmp_path / "eval2")


def test_the_int8_file_names_where_it_was_validated_and_dogkit_runs_it_nowhere_else(exported_int8: Path,
                                                                                    exported: Path):
    import onnxruntime

    from dogkit.deploy.runtime import OnnxClassifier, read_metadata, refuse_unvalidated

    meta = read_metadata(exported_int8)
    assert json.loads(meta["dogkit.validated_on"]) == [
        {"runtime": "onnxruntime", "provider": "CPUExecutionProvider", "graph_optimization_level": "ORT_ENABLE_ALL",
         "version": onnxruntime.__version__}]
    OnnxClassifier(exported_int8)  # where its gate ran: accepted
    refuse_unvalidated(exported_int8, meta, "onnxruntime", "CPUExecutionProvider")
    for runtime, provider, advice in (("onnxruntime", "CUDAExecutionProvider", "use --device cpu"),
                                      ("opencv", None, r"use ONNX Runtime \(dogkit predict, eval, serve\)")):
        with pytest.raises(DogkitError, match=rf"^model\.int8\.onnx was validated on onnxruntime "
                                              rf"\(CPUExecutionProvider\) only .* {advice}, or model\.onnx$"):
            refuse_unvalidated(exported_int8, meta, runtime, provider)
    # The fp32 file carries no such restriction.
    assert "dogkit.validated_on" not in read_metadata(exported)
    refuse_unvalidated(exported, read_metadata(exported), "opencv")


def test_exporting_an_unfinished_run_says_so(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "unfinished"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model*.onnx", "export.json", "eval",
                                                                 "test_metrics*.json"))
    export(run, parity_images=8)
    assert json.loads((run / "export.json").read_text())["run_finished"] is False
    log = " ".join((run / "run.log").read_text().split())
    assert "unfinished is not finished: exporting its best so far (epoch 1 of 1, no test metrics yet)" in log
    assert f"dogkit train --resume {run}" in log


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_best_pt_loads_into_plain_torchvision_with_one_call(prepared_sample: Path, tmp_path: Path, dropout: float):
    import torch
    import torchvision

    from dogkit.training.checkpoint import load_best, torchvision_model
    from dogkit.training.config import resolve_config
    from dogkit.training.trainer import train

    cfg = resolve_config(3, None, {"data": str(prepared_sample), "runs_dir": str(tmp_path), "arch": "resnet18",
                                   "image_size": 32, "batch_size": 16, "epochs": 1, "max_steps_per_epoch": 1,
                                   "amp": "off", "workers": 0, "dropout": dropout})
    run = train(cfg).run_dir
    net = torchvision_model(run / "best.pt")
    assert type(net) is torchvision.models.ResNet and isinstance(net.fc, torch.nn.Linear) and not net.training
    dogkit_model, ckpt, _ = load_best(run)
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    mean, std = (torch.tensor(ckpt["preprocess"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    plain = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std  # what torchvision's recipes feed
    with torch.no_grad():
        torch.testing.assert_close(net(plain), dogkit_model(x.permute(0, 3, 1, 2)), rtol=1e-4, atol=1e-4)
