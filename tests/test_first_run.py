"""What a new user meets first: the offline quick study's export, its rerun, and the commands after it."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dogkit.deploy.predict import PredictionWriter, format_predictions, predict  # noqa: E402
from dogkit.deploy.runtime import OnnxClassifier  # noqa: E402
from dogkit.errors import DogkitError  # noqa: E402


def _moved_maps(monkeypatch, model, images: np.ndarray, scale: float) -> None:
    """ONNX Runtime's maps with the top-left value of each moved by ``scale`` times the size of the terms that
    map sums: what rounding in another order of summation looks like, at a chosen size."""
    from dogkit.training.export import torch_maps

    _, sizes = torch_maps(model, images)
    real = OnnxClassifier.run_maps
    seen = {"n": 0}

    def run_maps(self, batch):
        logits, cams = real(self, batch)
        n = seen["n"]
        seen["n"] += len(batch)
        cams = cams.copy()
        cams[:, :, 0, 0] += scale * sizes[n: n + len(batch)]
        return logits, cams

    monkeypatch.setattr(OnnxClassifier, "run_maps", run_maps)


def test_the_maps_gate_is_relative_to_what_float32_can_promise(explained: Path, monkeypatch):
    """Moved by half the tolerance, maps pass, though this barely trained network's maps are flat enough (their
    terms cancel) that the move shifts the drawn, normalised picture by more than the tolerance, which the gate
    refused before; moved by three times the tolerance, they fail, and the message says how to go on."""
    from dogkit.training.checkpoint import load_best
    from dogkit.training.export import MAP_TOL, MapsParityError, check_parity

    model, _, _ = load_best(explained.parent)
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    clean = check_parity(model, explained, images, 1e-3)
    assert clean["max_rel_map_diff"] < MAP_TOL / 10

    with monkeypatch.context() as m:
        _moved_maps(m, model, images, 0.5 * MAP_TOL)
        report = check_parity(model, explained, images, 1e-3)
    assert 0.4 * MAP_TOL < report["max_rel_map_diff"] <= 0.6 * MAP_TOL
    assert report["max_abs_map_diff"] > MAP_TOL  # the normalised picture moved more: the old gate's refusal

    with monkeypatch.context() as m:
        _moved_maps(m, model, images, 3 * MAP_TOL)
        with pytest.raises(MapsParityError, match=r"of the size of the terms each map sums \(allowed 0.0001.*"
                                                  r"dogkit export --no-explain"):
            check_parity(model, explained, images, 1e-3)


def test_bench_says_which_model_and_size_it_measured(exported: Path, tmp_path: Path):
    from dogkit.deploy.bench import bench, markdown

    result = bench(run=exported.parent, backends=["onnx"], batch_sizes=[1], threads=1, min_time=0.01, min_runs=1,
                   warmup=0)
    assert result["model"] == {"where": str(exported.parent), "arch": "resnet18", "image_size": 32, "classes": 120,
                               "what": f"{exported.parent} (resnet18, 32 px, 120 classes)"}
    assert f"Model: {exported.parent} (resnet18, 32 px, 120 classes)." in markdown(result)


def _finished(runs: Path, name: str, score: float, onnx: bool) -> Path:
    run = runs / name
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "best.pt").write_bytes(b"")
    (run / "test_metrics.json").write_text(json.dumps({"best": {"val": {"accuracy": score}}}))
    if onnx:
        (run / "model.onnx").write_bytes(b"")
    return run


def test_every_command_defaults_to_the_same_best_run_and_names_it_when_it_is_not_exported(tmp_path: Path):
    from dogkit.runs import best_run, exported_model

    runs = tmp_path / "runs"
    weaker = _finished(runs, "weaker", 0.2, onnx=True)
    better = _finished(runs, "better", 0.3, onnx=False)
    assert best_run(runs) == better  # eval --backend torch's choice
    with pytest.raises(DogkitError, match=r"better has no model.onnx; `dogkit export .*better` writes it"):
        exported_model(None, runs)  # eval --backend onnx, predict, serve: not quietly the weaker run
    (better / "model.onnx").write_bytes(b"")
    assert exported_model(None, runs) == better / "model.onnx"
    assert exported_model(weaker, runs) == weaker / "model.onnx"


def test_prediction_rows_stream_as_csv_and_as_one_json_array(exported: Path, sample_dir: Path):
    model = OnnxClassifier(exported)
    files = sorted((sample_dir / "Images" / "n02085620-Chihuahua").glob("*.jpg"))[:5]
    streamed = io.StringIO()
    writer = PredictionWriter(streamed, "csv")
    seen: list[int] = []

    def add(p):  # called while predicting: rows are out before the last batch is read
        writer.add(p)
        seen.append(streamed.getvalue().count("\n"))

    predictions, _ = predict(model, files, top_k=3, batch_size=2, on_prediction=add)
    writer.close([(Path("broken.jpg"), "not an image")])
    assert seen == [2, 3, 4, 5, 6]  # the header with the first row, then a row each
    header, *rows = list(csv.reader(io.StringIO(streamed.getvalue())))
    assert header == ["path", "label1", "prob1", "label2", "prob2", "label3", "prob3", "answer", "error"]
    assert [r[0] for r in rows] == [p.path for p in predictions] + ["broken.jpg"]
    assert rows[-1][-1] == "not an image" and all(r[-1] == "" for r in rows[:-1])
    assert streamed.getvalue() == format_predictions(predictions, "csv", [(Path("broken.jpg"), "not an image")])
    parsed = json.loads(format_predictions(predictions, "json", [(Path("broken.jpg"), "not an image")]))
    assert [r["path"] for r in parsed] == [p.path for p in predictions] + ["broken.jpg"]
    assert parsed[0]["top"][0] == {"label": predictions[0].labels[0], "prob": predictions[0].probs[0]}
    assert json.loads(format_predictions([], "json")) == []


def test_predict_into_a_pipe_that_closes_early_stops_quietly(exported: Path, sample_dir: Path):
    """`dogkit predict … | head -3`: the first rows come as they are made, and the pipe closing ends it with no
    error."""
    proc = subprocess.Popen([sys.executable, "-m", "dogkit", "predict", str(sample_dir / "Images"), "--model",
                             str(exported), "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()
    _, err = proc.communicate(timeout=600)
    assert first[0].startswith("path,label1,prob1") and first[1].count(",") == first[0].count(",")
    assert proc.returncode == 0, err
    assert "error" not in err and "Traceback" not in err


def test_export_says_a_refused_int8_once_and_keeps_fp32(tiny_run: Path, tmp_path: Path, capfd):
    from dogkit.cli import main

    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model*.onnx", "export.json", "eval", "bench.json"))
    # An untrained model flips answers under quantization: an agreement of 100 % refuses it.
    main(["export", str(run), "--int8", "--min-agreement", "1", "--parity-images", "8", "--calibration-images", "16"])
    err = capfd.readouterr().err
    assert err.count("gives fp32's top-1 on") == 1 and "not written: model.int8.onnx (refused above)" in err
    assert (run / "model.onnx").is_file() and not (run / "model.int8.onnx").exists()
    assert "error" in json.loads((run / "export.json").read_text())["int8"]


def test_downloading_weights_writes_nothing_on_stdout(monkeypatch, capfd):
    import torchvision

    from dogkit.training.models import imagenet_state_dict

    def chatty(self, progress=True, check_hash=True):
        print('Downloading: "https://example.invalid/resnet18.pth"')  # what torch.hub says
        return {"fc.bias": torch.zeros(1)}

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", chatty)
    assert list(imagenet_state_dict("resnet18")) == ["fc.bias"]
    out, err = capfd.readouterr()
    assert out == "" and "Downloading:" in err


def test_curves_of_one_epoch_are_drawn_and_percent_ticks_differ(tmp_path: Path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from dogkit.analysis import report as report_module
    from dogkit.analysis.report import Run, plot_learning_curves

    figures = []
    monkeypatch.setattr(report_module, "save", lambda fig, path: figures.append(fig) or path.name)
    row = {"epoch": 1.0, "train_loss": 4.8, "train_loss_plain": 4.8, "val_loss": 4.7, "train_accuracy": 0.009,
           "val_accuracy": 0.012}
    run = Run(tmp_path, {"exp": 1}, {}, [row, {**row, "epoch": 2.0, "val_accuracy": 0.0105}], {})
    plot_learning_curves([Run(tmp_path, {"exp": 3}, {}, [row], {}), run], tmp_path)
    accuracy = figures[0].axes[1]
    assert all(line.get_marker() == "o" for line in accuracy.get_lines())  # a single point is visible
    figures[0].canvas.draw()
    labels = [t.get_text() for t in accuracy.get_yticklabels() if t.get_text()]
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels


def test_a_rerun_of_the_offline_quick_study_skips_its_runs_without_false_warnings(tiny_run: Path, prepared_sample,
                                                                                 tmp_path: Path, monkeypatch, caplog):
    """Runs this smoke test trained from random weights (no ImageNet weights offline) are its own: a rerun
    neither calls them "trained with other settings" nor counts them as training still to go."""
    import dogkit.study as study_module
    import dogkit.training.models as models

    monkeypatch.setattr(models, "imagenet_weights_problem", lambda arch, timeout=20.0: "no network")
    runs = tmp_path / "runs"
    settings = {"arch": "resnet18", "image_size": 32, "batch_size": 16, "epochs": 1, "max_steps_per_epoch": 2,
                "amp": "off", "workers": 0}
    plan = study_module.BUDGETS["quick"]
    for exp in (1, 2, 3):  # finished as the study trains them offline: regimes 1 and 2 from random weights
        name = f"study-quick-exp{exp}"
        shutil.copytree(tiny_run, runs / name, ignore=shutil.ignore_patterns("model*.onnx", "export.json", "eval"))
        cfg = plan.config(exp, {**settings, "data": str(prepared_sample), "runs_dir": str(runs), "name": name,
                                "seed": 0, **({"pretrained": False} if exp != 3 else {})})
        (runs / name / "config.json").write_text(json.dumps(cfg.to_dict()))

    class Trained(Exception):
        pass

    def stop(*args):
        raise Trained

    monkeypatch.setattr(study_module, "_export", stop)  # the training section is what is checked here
    caplog.set_level(logging.INFO, logger="dogkit")
    with pytest.raises(Trained):
        study_module.study("quick", data=prepared_sample, runs_dir=runs, out=tmp_path / "report",
                           overrides=settings, bench=False)
    said = caplog.text
    assert said.count("is finished; skipping") == 3
    assert "other settings" not in said and "to go" not in said and "no ImageNet weights" not in said
