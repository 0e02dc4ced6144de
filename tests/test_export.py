import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dogkit.dataset import load_dataset
from dogkit.errors import DogkitError
from dogkit.evaluate import evaluate
from dogkit.export import NHWCInput, ParityError, export, load_best
from dogkit.images import read_rgb
from dogkit.predict import collect_paths, predict, write_predictions
from dogkit.preprocess import eval_transform
from dogkit.runtime import OnnxClassifier


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
    import dogkit.export as export_module

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model*.onnx", "eval"))
    real_export = export_module.export_onnx

    def perturbed(model, spec, path):
        real_export(model, spec, path)
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


def test_int8_export_reports_its_gate_and_refuses_beyond_the_threshold(tiny_run: Path, exported: Path, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval"))
    result = export(run, parity_images=8, int8=True, calibration_images=32, max_drop=1.0)
    gate = result.int8
    assert gate["images"] == 120 and 0 <= gate["top1_agreement_with_fp32"] <= 1
    assert gate["accuracy_change"] == pytest.approx(gate["accuracy"] - gate["accuracy_fp32"])
    int8 = OnnxClassifier(run / "model.int8.onnx")
    assert int8.class_names == OnnxClassifier(exported).class_names
    ops = {n.op_type for n in onnx.load(str(run / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    (run / "model.int8.onnx").unlink()
    with pytest.raises(DogkitError, match="it was not kept"):
        export(run, parity_images=8, int8=True, calibration_images=32, max_drop=-1.0)
    assert not (run / "model.int8.onnx").exists()


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
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "path,label1,prob1,label2,prob2,label3,prob3"
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
    # The spec the runtime reads is the one training used: same pixels from the same function.
    dataset = load_dataset(prepared_sample)
    runner = OnnxClassifier(exported)
    rec = dataset.split("test")[0]
    np.testing.assert_array_equal(runner.preprocess(dataset.load_rgb(rec)), eval_transform(dataset.load_rgb(rec),
                                                                                             runner.spec))


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


BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name.startswith("torchvision"):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _NoTorch())
from dogkit.cli import main
sys.argv = ["dogkit"] + sys.argv[1:]
main()
"""


def test_onnx_paths_never_import_torch(exported: Path, sample_dir: Path, prepared_sample: Path, tmp_path: Path):
    env = dict(os.environ)

    def run(*args):
        return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, env=env,
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
