import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from dogkit.analysis.report import report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, name: str, exp: int, correct: np.ndarray, labels: np.ndarray, averages=False) -> Path:
    """A finished run folder with known test predictions: image i is right iff correct[i]."""
    run = root / name
    run.mkdir(parents=True)
    n_classes = 4
    preds = np.where(correct, labels, (labels + 1) % n_classes)
    logits = np.full((len(labels), n_classes), -2.0)
    logits[np.arange(len(labels)), preds] = 2.0
    config = {"exp": exp, "data": str(root / "missing-dataset"), "seed": 0, "optimizer": "adam", "lr": 1e-4,
              "schedule": "cosine", "epochs": 2, "batch_size": 8, "image_size": 32, "weights": None,
              "pretrained": exp != 3}
    (run / "config.json").write_text(json.dumps(config))
    (run / "environment.json").write_text(json.dumps({"git_commit": "abc123def456", "manifest_sha256": "f" * 64,
                                                      "torch": "2.x", "parameters": 23_756_984}))
    rows = []
    for epoch in (1, 2):
        row = {"epoch": epoch, "train_loss": 2.0 / epoch, "train_accuracy": 0.3 * epoch, "val_loss": 2.2 / epoch,
               "val_accuracy": 0.25 * epoch, "epoch_time_s": 30.0, "img_per_s": 20.0}
        if averages:
            row.update({"P_val_loss": 2.1 / epoch, "P_val_accuracy": 0.26 * epoch, "G0.99_val_loss": 2.0 / epoch,
                        "G0.99_val_accuracy": 0.27 * epoch})
        rows.append(row)
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    acc = float(correct.mean())
    test = {"accuracy": acc, "top5": 1.0, "precision_macro": acc, "recall_macro": acc, "f1_macro": acc, "loss": 1.0}
    report_json = {"best": {"variant": "G0.99" if averages else "raw", "epoch": 2, "val": {"accuracy": acc},
                            "test": test}}
    if averages:
        report_json["final"] = {k: test for k in ("raw", "P", "G0.99")}
    (run / "test_metrics.json").write_text(json.dumps(report_json))
    np.savez(run / "test_predictions.npz", logits=logits, labels=labels,
             paths=np.array([f"c{k}/{i}.jpg" for i, k in enumerate(labels)]))
    return run


def test_report_numbers_match_the_runs_and_plots_are_real_pngs(tmp_path: Path):
    labels = np.arange(40) % 4
    right1 = np.arange(40) < 30  # 75% correct
    right2 = np.arange(40) < 36  # 90%: right on 6 images run 1 misses, never wrong where run 1 is right
    right3 = np.arange(40) < 10  # 25%
    runs = [fake_run(tmp_path, "exp1-resnet50", 1, right1, labels),
            fake_run(tmp_path, "exp2-resnet50", 2, right2, labels, averages=True),
            fake_run(tmp_path, "exp3-resnet50", 3, right3, labels)]
    out = tmp_path / "report"
    path = report(runs, out, resamples=200)
    text = path.read_text()
    assert "| 1: pretrained + Adam — exp1-resnet50 | raw | 75.0 [" in text
    assert "| 2: pretrained + Averaged Adam — exp2-resnet50 | G0.99 | 90.0 [" in text
    assert "| 3: from scratch + Adam — exp3-resnet50 | raw | 25.0 [" in text
    assert "| exp1 | exp2 | 0 | 6 | 0.0312 |" in text  # exact McNemar: 2 * (1/2)^6
    assert "| exp1 | exp3 | 20 | 0 |" in text
    assert "Stanford Dogs was built from ImageNet images" in text
    assert "23.8 M" in text and "abc123def4" in text
    # The best model (highest validation accuracy) is regime 2; its ECE: confidence 0.9526 everywhere, accuracy 0.9.
    confidence = np.exp(2) / (np.exp(2) + 3 * np.exp(-2))
    ece = float(re.search(r"Expected calibration error: \*\*([0-9.]+)\*\*", text).group(1))
    assert abs(ece - abs(confidence - 0.9)) < 1e-3
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        data = (out / image).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, image
    assert {"learning_curves.png", "averaged_adam.png", "worst_breeds.png", "reliability.png",
            "confusion.png"} <= {p.name for p in out.iterdir()}
    lo, hi = json.loads((out / "summary.json").read_text())["exp1-resnet50"]["accuracy_ci"]
    assert lo < 0.75 < hi


def test_quick_study_runs_end_to_end_on_the_real_sample(prepared_sample: Path, tmp_path: Path):
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "report"
    args = [sys.executable, "-m", "dogkit", "study", "--budget", "quick", "--data", str(prepared_sample),
            "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--weights", str(weights),
            "--set", "arch=resnet18", "--set", "image_size=32", "--set", "epochs=1", "--set",
            "max_steps_per_epoch=2", "--set", "workers=0", "--set", "avg_bn_images=32"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert "expected training time" in log and "smoke test" in log and "the report is" in log
    text = (out / "report.md").read_text()
    assert "Smoke test" in text and text.count("| study-quick-exp") >= 3
    def score(run):
        return json.loads((run / "test_metrics.json").read_text())["best"]["val"]["accuracy"]

    runs = sorted((tmp_path / "runs").iterdir())
    exported = [r for r in runs if (r / "model.onnx").is_file()]
    assert len(runs) == 3 and len(exported) == 1
    best = exported[0]
    assert score(best) == max(score(r) for r in runs)
    for name in ("model.onnx", "model.int8.onnx", "bench.json", "export.json"):
        assert (best / name).is_file(), name
    assert list((best / "eval").glob("onnx-model-test/metrics.json"))
    # Running it again skips every finished step.
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stderr.count("is finished; skipping") == 3
    assert again.stderr.count("is current; skipping") == 3  # export, evaluation and benchmark


def test_study_goes_on_with_fp32_when_int8_fails_and_the_report_says_why(tiny_run: Path, prepared_sample: Path,
                                                                         tmp_path: Path, monkeypatch):
    import shutil

    import onnxruntime.quantization as quantization

    from dogkit.analysis.study import study

    def broken(*args, **kwargs):
        raise RuntimeError("calibration ran out of memory\nsecond line of detail")

    monkeypatch.setattr(quantization, "quantize_static", broken)
    runs = tmp_path / "runs"
    for exp in (1, 2, 3):  # three finished runs: the study skips training
        shutil.copytree(tiny_run, runs / f"study-quick-exp{exp}",
                        ignore=shutil.ignore_patterns("model*.onnx", "export.json", "eval", "bench.json"))
    out = tmp_path / "report"
    settings = {"arch": "resnet18", "image_size": 32, "batch_size": 4}
    study("quick", data=prepared_sample, runs_dir=runs, out=out, overrides=settings, bench=False)
    best = runs / "study-quick-exp1"  # equal scores: the first of the three
    why = "INT8 quantization failed: RuntimeError: calibration ran out of memory"
    assert json.loads((best / "export.json").read_text())["int8"] == {"error": why}
    assert (best / "model.onnx").is_file() and not (best / "model.int8.onnx").exists()
    assert json.loads((best / "eval" / "onnx-model-test" / "metrics.json").read_text())["images"] == 120
    text = (out / "report.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("No INT8 model for"))
    assert line.endswith(f"so only its fp32 model runs: {why}")
    assert "graph optimisation level ORT_ENABLE_ALL" in text
    # Re-running does not retry the export: its outcome, INT8's reason included, is on record.
    monkeypatch.setattr(quantization, "quantize_static", lambda *a, **k: pytest.fail("export ran again"))
    study("quick", data=prepared_sample, runs_dir=runs, out=out, overrides=settings, bench=False)
