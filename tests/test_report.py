import csv
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dogkit.analysis.report import report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, name: str, exp: int, correct: np.ndarray, labels: np.ndarray, averages=False, seed=0,
             weights=None) -> Path:
    """A finished run folder with known test predictions: image i is right iff correct[i]."""
    run = root / name
    run.mkdir(parents=True)
    n_classes = 4
    preds = np.where(correct, labels, (labels + 1) % n_classes)
    logits = np.full((len(labels), n_classes), -2.0)
    logits[np.arange(len(labels)), preds] = 2.0
    config = {"exp": exp, "data": str(root / "missing-dataset"), "seed": seed, "optimizer": "adam", "lr": 1e-4,
              "schedule": "cosine", "epochs": 2, "batch_size": 8, "image_size": 32, "weights": weights,
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


@pytest.mark.parametrize(("monitor", "said"), [(None, "lowest validation loss"),
                                               ("accuracy", "highest validation accuracy")])
def test_the_variants_table_names_the_best_validation_value_by_its_direction(tmp_path: Path, monitor, said: str):
    from dogkit.analysis.report import _variants_table, load_run

    run = fake_run(tmp_path, "exp2-resnet50", 2, np.arange(40) < 30, np.arange(40) % 4, averages=True)
    if monitor:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "monitor": monitor}))
    text = "\n".join(_variants_table(load_run(run)))
    assert f"**G0.99** from epoch 2, {said} over every epoch and variant" in text
    assert ("lowest" in text) == (monitor is None) and ("highest" in text) == (monitor == "accuracy")


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
    # No run is exported: raw ECE and NLL from the training's test logits, and one line each on why no more.
    # Regime 2: confidence 0.9526 on every image, accuracy 0.9.
    confidence = np.exp(2) / (np.exp(2) + 3 * np.exp(-2))
    row = re.search(r"^\| exp2 \| 40 \| ([0-9.]+) → – \| ([0-9.]+) → – \| – \|$", text, re.M)
    assert abs(float(row.group(1)) - abs(confidence - 0.9)) < 1e-3
    assert abs(float(row.group(2)) - (-0.9 * np.log(confidence) - 0.1 * np.log((1 - confidence) / 3))) < 1e-3
    why = "no model.onnx (not exported: `dogkit export"
    for name in ("exp1", "exp2", "exp3"):
        assert f"No calibrated numbers for {name}: {why}" in text and f"No maps scored for {name}: {why}" in text
    assert f"No risk–coverage curve for exp2: {why}" in text and f"No gallery for exp2: {why}" in text
    assert "| run | images with boxes |" not in text  # no table without a row
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        data = (out / image).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, image
    assert {"learning_curves.png", "averaged_adam.png", "worst_breeds.png", "reliability.png", "per_breed_recall.png",
            "confusion.png"} <= {p.name for p in out.iterdir()}
    lo, hi = json.loads((out / "summary.json").read_text())["exp1-resnet50"]["accuracy_ci"]
    assert lo < 0.75 < hi


def test_report_across_seeds_gives_mean_sd_paired_differences_and_same_seed_mcnemar(tmp_path: Path):
    labels = np.arange(40) % 4
    # A pretraining run folder, as `dogkit study --pretrain-source` leaves it: the stand-in for ImageNet.
    pre = tmp_path / "study-x-pretrain"
    pre.mkdir()
    (pre / "config.json").write_text(json.dumps({"data": "artifacts/data/dogs69-crops", "epochs": 20,
                                                 "image_size": 64}))
    (pre / "test_metrics.json").write_text(json.dumps({"best": {"test": {"accuracy": 0.4}}}))
    correct = {(1, 0): 30, (1, 1): 32, (1, 2): 28, (3, 0): 10, (3, 1): 14, (3, 2): 9}  # images right per run
    runs = [fake_run(tmp_path, f"study-x-exp{exp}-seed{seed}", exp, np.arange(40) < k, labels, seed=seed,
                     weights=str(pre / "best.pt") if exp == 1 else None) for (exp, seed), k in correct.items()]
    out = tmp_path / "report"
    text = report(runs, out, resamples=50).read_text()
    assert "Stand-in for ImageNet" in text and "Stanford Dogs was built from ImageNet" not in text
    assert "`study-x-pretrain`, trained from scratch on dogs69-crops (20 epochs at 64 px, its test top-1 40.0%)" in text
    # Mean ± sd over the three seeds: regime 1 is 75, 80, 70 % right.
    assert "| 1: pretrained + Adam | 0, 1, 2 | 75.0 ± 5.0 |" in text
    recall = next(line for line in text.splitlines() if line.startswith("| exp1 | exp3 | recall |"))
    assert "+50.0, +45.0, +47.5" in recall and "| +47.5 |" in recall
    summary = json.loads((out / "summary.json").read_text())["across_seeds"]
    row = next(d for d in summary["paired"] if d["metric"] == "recall_macro")
    assert row["seeds"] == [0, 1, 2] and row["ci"][0] < 0.475 < row["ci"][1] and row["p_value"] < 0.01
    # McNemar pairs models trained with the same seed only, named by regime and seed.
    mcnemar_rows = [line for line in text.splitlines() if re.match(r"\| exp\d-seed\d \| exp\d-seed\d \|", line)]
    assert len(mcnemar_rows) == 3
    assert "| exp1-seed1 | exp3-seed1 | 18 | 0 |" in text
    assert "exp1-seed0 | exp3-seed1" not in text


def test_report_shows_the_baselines_beside_the_regimes_and_where_the_weights_came_from(tmp_path: Path):
    """The study's baselines.json (the untrained ImageNet head, a linear probe) becomes a table beside the mean of
    each pretrained regime's seeds; environment.json's ImageNet weights are named."""
    labels = np.arange(40) % 4
    runs = [fake_run(tmp_path, f"study-y-exp{exp}-seed{seed}", exp, np.arange(40) < k, labels, seed=seed)
            for (exp, seed), k in {(1, 0): 36, (1, 1): 34, (3, 0): 8, (3, 1): 6}.items()]
    for run in runs:
        env = json.loads((run / "environment.json").read_text())
        (run / "environment.json").write_text(json.dumps({**env, "imagenet_weights": "the package's Lite0 file"}))
    out = tmp_path / "report"
    out.mkdir()
    metrics = {"accuracy": 0.8, "top5": 0.95, "precision_macro": 0.81, "recall_macro": 0.79, "f1_macro": 0.785}
    (out / "baselines.json").write_text(json.dumps({
        "zero_shot": {"key": {}, "results": [{"size": 32, "classes": 4, "accuracy": 0.8, "accuracy_imagenet": 0.7,
                                              "test": metrics}]},
        "linear_probe": {"run": "study-y-probe", "epochs": 2, "size": 32, "lr": 0.001,
                         "test": {**metrics, "accuracy": 0.85}}}))
    text = report(runs, out, resamples=50).read_text()
    assert "| zero-shot: the ImageNet head restricted to the 4 breeds' synsets | nothing | 32 | 80.0 | 81.0 | 79.0 | " \
           "78.5 | 95.0 |" in text
    assert "| linear probe (`study-y-probe`) | a new head on frozen features, 2 epochs at 0.001 | 32 | 85.0 |" in text
    # Regime 1's row is the mean of its two seeds (90 % and 85 % right); regime 3 trains from scratch: no row.
    assert "| 1: pretrained + Adam (mean of 2 seeds) | fine-tuned, 2 epochs | 32 | 87.5 |" in text
    assert "3: from scratch + Adam (mean" not in text
    assert "top-1 among all 1000 ImageNet classes: 70.0% at 32 px" in text
    assert "started from ImageNet weights (the package's Lite0 file)" in text
    (out / "baselines.json").unlink()
    assert "## Baselines" not in report(runs, out, resamples=50).read_text()


def test_quick_study_runs_end_to_end_on_the_real_sample(quick_study):
    """The README's offline first run (the session's quick study: no internet, no weights cached): it prepares the
    sample, trains the three regimes (1 and 2 from random weights, as it says), exports, evaluates, benchmarks and
    reports; run again, it skips every finished step and warns of nothing."""
    args, env, work = quick_study
    log = (work / "study.stderr").read_text()
    assert "expected time about" in log and "smoke test" in log and "the report is" in log
    assert log.count("min left") == 2  # re-made after regimes 1 and 2
    assert log.count("no ImageNet weights") == 1  # asked once, when regime 1 was about to train
    runs = sorted((work / "study-runs").iterdir())
    assert [r.name for r in runs] == ["study-quick-exp1", "study-quick-exp2", "study-quick-exp3"]
    for run in runs:
        assert json.loads((run / "config.json").read_text())["pretrained"] is False
    text = (work / "study-report" / "report.md").read_text()
    assert "Smoke test" in text and text.count("| study-quick-exp") >= 3
    assert "> **No pretrained weights.** exp1, exp2 started from random weights" in text
    assert "Caveat" not in text  # no ImageNet weights, so no ImageNet caveat

    def score(run):
        return json.loads((run / "test_metrics.json").read_text())["best"]["val"]["accuracy"]

    # Every run has its fp32 model and its calibration and maps on test; INT8 and the benchmark are the best's.
    assert all((r / "model.onnx").is_file() and (r / "explain.json").is_file() for r in runs)
    exported = [r for r in runs if (r / "model.int8.onnx").is_file()]
    assert len(exported) == 1
    best = exported[0]
    assert score(best) == max(score(r) for r in runs)
    for name in ("model.onnx", "model.int8.onnx", "bench.json", "export.json"):
        assert (best / name).is_file(), name
    assert list((best / "eval").glob("onnx-model-test/metrics.json"))
    # Running it again skips every finished step.
    again = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0 and again.stderr.count("is finished; skipping") == 3
    # the best's export, the other two runs' fp32 exports, three explain.json, the evaluation and the benchmark
    assert again.stderr.count("is current; skipping") == 8
    assert "warning" not in again.stderr.lower()


def test_study_goes_on_with_fp32_when_int8_fails_and_the_report_says_why(tiny_run: Path, prepared_sample: Path,
                                                                         tmp_path: Path, monkeypatch):
    import shutil

    import onnxruntime.quantization as quantization

    from dogkit.study import study

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
    # Every run exported in fp32 and scored (all three are copies of one regime-1 run, so all are "exp1"): a
    # calibration row and a localisation row each.
    for exp in (1, 2, 3):
        assert json.loads((runs / f"study-quick-exp{exp}" / "explain.json").read_text())["images"] == 120
    assert len(re.findall(r"^\| exp1 \| 120 \| [0-9.]+ → [0-9.]+ \|", text, re.M)) == 3
    assert len(re.findall(r"^\| exp1 \| 120 \| [0-9.]+% \|", text, re.M)) == 3
    assert not (runs / "study-quick-exp2" / "model.int8.onnx").exists()
    # Re-running does not retry the export: its outcome, INT8's reason included, is on record.
    monkeypatch.setattr(quantization, "quantize_static", lambda *a, **k: pytest.fail("export ran again"))
    made = {p: p.stat().st_mtime_ns for p in runs.glob("*/*") if p.name in ("model.onnx", "explain.json")}
    study("quick", data=prepared_sample, runs_dir=runs, out=out, overrides=settings, bench=False)
    assert len(made) == 6 and made == {p: p.stat().st_mtime_ns for p in made}  # nor any run's fp32 model or maps


def test_study_pretrains_a_stand_in_and_trains_every_regime_per_seed(prepared_sample: Path, sample_dir: Path,
                                                                      tmp_path: Path, monkeypatch):
    import shutil

    import dogkit.study as study_module
    from dogkit.study import study

    class Trained(Exception):
        pass

    def stop(*args):
        raise Trained

    # Pretraining and the seeds are what this follows: the study stops at its export (which is the same for any
    # number of runs; test_quick_study_runs_end_to_end_on_the_real_sample follows it) and the report is made from
    # the six runs.
    monkeypatch.setattr(study_module, "_export", stop)
    # A pretraining set of other classes: five breeds of the sample, as a class-folder dataset.
    pre_source = tmp_path / "other-breeds"
    for folder in sorted((sample_dir / "Images").iterdir())[:5]:
        shutil.copytree(folder, pre_source / folder.name)
    runs, out = tmp_path / "runs", tmp_path / "report"
    settings = {"arch": "shufflenet_v2_x0_5", "image_size": 32, "epochs": 1, "max_steps_per_epoch": 2, "workers": 0,
                "avg_bn_images": 32, "amp": "off"}
    kwargs = dict(data=prepared_sample, runs_dir=runs, out=out, overrides=settings, bench=False, seeds=[0, 1],
                  pretrain_sources=[pre_source], pretrain_data=tmp_path / "pre-data")
    with pytest.raises(Trained):
        study("quick", **kwargs)
    names = sorted(p.name for p in runs.iterdir())
    assert names == ["study-quick-exp1-seed0", "study-quick-exp1-seed1", "study-quick-exp2-seed0",
                     "study-quick-exp2-seed1", "study-quick-exp3-seed0", "study-quick-exp3-seed1",
                     "study-quick-pretrain"]
    pre = json.loads((runs / "study-quick-pretrain" / "config.json").read_text())
    assert pre["exp"] is None and pre["pretrained"] is False and pre["data"] == str(tmp_path / "pre-data")
    assert pre["optimizer"] == "adam" and pre["augment"] == "strong"  # preset 3's recipe
    assert (runs / "study-quick-pretrain" / "best.pt").is_file()
    for name in names[:-1]:
        config = json.loads((runs / name / "config.json").read_text())
        assert config["seed"] == int(name[-1])
        assert config["weights"] == (str(runs / "study-quick-pretrain" / "best.pt") if config["exp"] != 3 else None)
    # The seed reaches the run: seeds 0 and 1 of one regime train differently.
    first = [json.loads((runs / f"study-quick-exp3-seed{s}" / "test_metrics.json").read_text()) for s in (0, 1)]
    assert first[0]["best"]["val"]["loss"] != first[1]["best"]["val"]["loss"]
    times = json.loads((out / "study_times.json").read_text())
    assert set(times["steps"]) == {"prepare the pretraining set", "pretrain",
                                   *(f"train {name}" for name in names[:-1])}
    assert times["total_s"] == pytest.approx(sum(times["steps"].values()), abs=0.2)
    text = report([runs / name for name in names[:-1]], out, resamples=50).read_text()
    assert "Stand-in for ImageNet" in text and "## Across seeds" in text and "## Time per step" in text
    assert "| exp1-seed1 | exp3-seed1 |" in text
    # Again: every run is finished and skipped, so the training steps' times do not grow.
    with pytest.raises(Trained):
        study("quick", **kwargs)
    again = json.loads((out / "study_times.json").read_text())
    assert again["steps"]["pretrain"] == times["steps"]["pretrain"]
    assert again["steps"]["train study-quick-exp1-seed0"] == times["steps"]["train study-quick-exp1-seed0"]


def test_study_times_add_up_resumed_work_and_replace_work_done_again(tmp_path: Path):
    from dogkit.study import Timings

    timings = Timings(tmp_path / "study_times.json", "cpu")
    timings.run("train a", lambda: True)
    timings.add("train a", 60.0, resumed=True)  # the same run, continued after Ctrl-C
    timings.run("export", lambda: False)  # skipped: nothing recorded
    saved = json.loads((tmp_path / "study_times.json").read_text())
    assert saved["budget"] == "cpu" and set(saved["steps"]) == {"train a"}
    assert 60.0 <= saved["steps"]["train a"] < 61.0 and saved["total_s"] == saved["steps"]["train a"]
    again = Timings(tmp_path / "study_times.json", "cpu")  # a later invocation reads what was recorded
    again.add("train a", 5.0)  # trained again from nothing: its new time
    assert json.loads((tmp_path / "study_times.json").read_text())["steps"] == {"train a": 5.0}
    other = Timings(tmp_path / "study_times.json", "quick")  # another budget's study starts a new record
    assert other.steps == {}


def test_runs_made_differently_are_flagged_and_not_tested_against_each_other(tmp_path: Path):
    labels = np.arange(40) % 4
    runs = [fake_run(tmp_path, "exp1-resnet50", 1, np.arange(40) < 30, labels),
            fake_run(tmp_path, "exp2-resnet50", 2, np.arange(40) < 36, labels, averages=True)]
    config = json.loads((runs[1] / "config.json").read_text())
    (runs[1] / "config.json").write_text(json.dumps({**config, "image_size": 96, "epochs": 10}))
    config = json.loads((runs[0] / "config.json").read_text())
    (runs[0] / "config.json").write_text(json.dumps({**config, "epochs": 10}))
    text = report(runs, tmp_path / "report", resamples=50).read_text()
    assert text.startswith("# Dog-breed classification on Stanford Dogs: two training regimes compared")
    assert "Smoke test" not in text  # ten epochs each, uncapped
    assert "> **Not comparable.** These runs were not made on the same footing (exp2 against exp1: image size " \
           "96 vs 32)" in text
    assert "| exp1 | exp2 | – | – | not compared: image size 32 vs 96 |" in text
    assert "The final epoch's (epoch 2) raw iterate and averages, on test, in % — not the best epoch's" in text
    # The same runs made alike: no notice, and McNemar runs.
    (runs[1] / "config.json").write_text(json.dumps({**config, "epochs": 10, "exp": 2}))
    text = report(runs, tmp_path / "report2", resamples=50).read_text()
    assert "Not comparable" not in text and re.search(r"\| exp1 \| exp2 \| 0 \| 6 \| 0\.0\d+ \|", text)


def test_a_smoke_run_reported_by_hand_says_so(tmp_path: Path):
    labels = np.arange(40) % 4
    run = fake_run(tmp_path, "exp1-resnet50", 1, np.arange(40) < 30, labels)  # two epochs
    text = report([run], tmp_path / "report", resamples=50).read_text()
    assert "> **Smoke test.** This report includes smoke-test runs (exp1" in text
    assert text.startswith("# Dog-breed classification on Stanford Dogs: one training regime compared")


def test_an_offline_study_names_the_study_command_to_run(tmp_path: Path, monkeypatch):
    import dogkit.data.prepare as prepare_module
    from dogkit.data.download import SOURCE_HINT
    from dogkit.errors import DogkitError
    from dogkit.study import _prepare

    def offline(cfg):
        raise DogkitError(f"could not download images.tar: no network. If the network stays unavailable, run "
                          f"{SOURCE_HINT} with an extracted folder or archive of the dataset.")

    monkeypatch.setattr(prepare_module, "prepare", offline)
    with pytest.raises(DogkitError, match=r"run `dogkit study --budget quick --source PATH` with an extracted"):
        _prepare(tmp_path / "data", None, "quick")


def test_the_time_estimate_counts_every_pass_and_follows_the_measured_speed():
    from dogkit.study import Estimate, run_units
    from dogkit.training.config import resolve_config

    sizes = {"train": 672, "val": 144, "test": 144}
    plain = resolve_config(1, None, {"epochs": 2})
    averaged = resolve_config(2, None, {"epochs": 2, "avg_bn_images": 256})
    assert run_units(plain, sizes) == 2 * (672 + 144 / 2) + 144 / 2  # train, validate, test
    # Four variants validated, three averages' BatchNorm passes, five networks tested.
    assert run_units(averaged, sizes) == 2 * (672 + (4 * 144 + 3 * 256) / 2) + 5 * 144 / 2
    # Epochs that train only the head and a few top stages cost a third of a step (no backward pass below them).
    gradual = resolve_config(1, None, {"epochs": 5, "freeze": "gradual"})
    assert run_units(gradual, sizes) == pytest.approx((4 / 3 + 1) * 672 + 5 * 144 / 2 + 144 / 2)
    probe = resolve_config(1, None, {"epochs": 2, "freeze": "linear-probe", "probe_epochs": 2})
    assert run_units(probe, sizes) == pytest.approx(2 / 3 * 672 + 2 * 144 / 2 + 144 / 2)
    estimate = Estimate({"train a": 1000.0, "train b": 3000.0, "after": 500.0}, 0.01, fixed=30.0)
    assert estimate.minutes_left() == pytest.approx((0.01 * 4500 + 30) / 60)
    estimate.done("train a", 40.0)  # the machine is four times slower than the timed steps said
    assert estimate.rate == pytest.approx(0.04)
    assert estimate.minutes_left() == pytest.approx((0.04 * 3500 + 30) / 60)
    estimate.done("train b", 0.5)  # skipped (already finished): the speed stays
    assert estimate.rate == pytest.approx(0.04)


def _explained_copy(tiny_run: Path, root: Path, name: str = "study-quick-exp1") -> Path:
    """A copy of the exported tiny run (the fixture must stay as it is): explain.json is written into it."""
    import shutil

    run = root / name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "bench.json", "explain*", "model.int8.onnx"))
    return run


def test_report_calibration_maps_and_gallery_of_an_exported_run_are_dogkit_calibrations(exported: Path,
                                                                                     tmp_path: Path):
    import cv2

    from dogkit.analysis.explained import TILE, explain_run, stored_logits
    from dogkit.calibration import summary
    from dogkit.deploy.runtime import OnnxClassifier

    run = _explained_copy(exported.parent, tmp_path)
    out = tmp_path / "report"
    text = report([run], out, resamples=20).read_text()
    stored = json.loads((run / "explain.json").read_text())
    logits = stored_logits(run)
    # One ONNX pass per test image, in the split's order: the training's own test logits, within export's parity.
    with np.load(run / "test_predictions.npz") as npz:
        assert logits["paths"].tolist() == npz["paths"].tolist()
        np.testing.assert_allclose(logits["logits"], npz["logits"], atol=1e-3)
    model = OnnxClassifier(run / "model.onnx")
    assert model.explains and 0 < model.temperature != 1.0
    expected = summary(logits["logits"], logits["labels"], model.temperature, model.threshold)
    cal = stored["calibration"]
    for key in ("ece_raw", "ece", "nll_raw", "nll", "temperature", "images"):
        assert cal[key] == pytest.approx(expected[key]), key
    assert cal["ece"] != cal["ece_raw"]
    assert (f"| exp1 | {expected['images']} | {expected['ece_raw']:.3f} → {expected['ece']:.3f} | "
            f"{expected['nll_raw']:.3f} → {expected['nll']:.3f} | {model.temperature:.3f} |") in text
    # Localisation: the table shows what explain.json stores, and its verdict.
    loc = stored["localisation"]
    assert loc["images"] == expected["images"]  # every image of the sample has a box
    assert (f"| exp1 | {loc['images']} | {100 * loc['energy_in_boxes']:.1f}% | {100 * loc['gt_known_loc']:.1f}% | "
            f"{100 * loc['top1_loc']:.1f}% | {100 * loc['baseline']['energy_in_boxes']:.1f}% | "
            f"{100 * loc['baseline']['gt_known_loc']:.1f}% |") in text
    assert f"exp1's maps {'beat' if loc['beats_baseline'] else 'do not beat'} the centred baseline" in text
    # Selective prediction at the stored threshold, against the validation target.
    target = model.calibration["selective"]["target_precision"]
    assert f"at least {100 * target:.0f}% right" in text
    if model.threshold == float("inf"):
        assert f"**The validation target of {100 * target:.0f}% precision was unreachable**" in text
    else:
        assert f"At the stored threshold {model.threshold:.3f}" in text
    # The gallery: the six most confident wrong answers, two tiles (predicted breed's map, true breed's) each.
    rows = [line for line in text.split("## Gallery")[1].splitlines() if line.startswith("| ") and "/" in line]
    wrong = int((logits["logits"].argmax(1) != logits["labels"]).sum())
    assert len(rows) == min(6, wrong) > 0
    grid = cv2.imread(str(out / "gallery.png"))
    assert grid.shape == (len(rows) * TILE, 2 * TILE, 3) and grid.std() > 10
    for image in ("reliability.png", "risk_coverage.png", "gallery.png"):
        assert (out / image).read_bytes().startswith(PNG) and f"]({image})" in text
    # The stored file is reused: a second report does not run the model again.
    before = (run / "explain.json").stat().st_mtime_ns
    report([run], tmp_path / "again", resamples=20)
    assert (run / "explain.json").stat().st_mtime_ns == before
    assert explain_run(run)["calibration"]["ece"] == pytest.approx(cal["ece"])  # and it is reproducible


def _stored_explanation(run: Path, localisation: dict, selective: dict, validation: dict) -> None:
    """explain.json with known numbers beside a stand-in model file, as `dogkit study` leaves them."""
    (run / "model.onnx").write_bytes(b"not a model")  # older than what describes it
    with np.load(run / "test_predictions.npz") as npz:
        np.savez(run / "explain_logits.npz", logits=npz["logits"], labels=npz["labels"], paths=npz["paths"])
    from dogkit.calibration import summary

    with np.load(run / "test_predictions.npz") as npz:
        cal = summary(npz["logits"], npz["labels"], 2.0, None)
    cal["selective"] = selective
    (run / "explain.json").write_text(json.dumps({"calibration": cal, "localisation": localisation,
                                                  "validation": {"temperature": 2.0, "selective": validation}}))


def test_report_shows_the_stored_localisation_and_an_unreachable_target(tmp_path: Path):
    labels = np.arange(40) % 4
    runs = [fake_run(tmp_path, "exp1-resnet50", 1, np.arange(40) < 30, labels),
            fake_run(tmp_path, "exp2-resnet50", 2, np.arange(40) < 36, labels),
            fake_run(tmp_path, "exp3-resnet50", 3, np.arange(40) < 10, labels)]
    base = {"name": "centred Gaussian", "energy_in_boxes": 0.5, "gt_known_loc": 0.25, "mean_iou": 0.3}
    good = {"images": 40, "energy_in_boxes": 0.612, "gt_known_loc": 0.375, "top1_loc": 0.35, "mean_iou": 0.4,
            "baseline": base, "beats_baseline": True}
    poor = {**good, "energy_in_boxes": 0.455, "gt_known_loc": 0.3, "top1_loc": 0.075, "beats_baseline": False}
    unreachable = {"threshold": None, "coverage": 0.0, "precision": None, "answered": 0}
    target = {"target_precision": 0.95, "threshold": None, "met": False, "precision": None, "coverage": 0.0}
    _stored_explanation(runs[0], good, unreachable, target)
    _stored_explanation(runs[1], poor, unreachable, target)
    out = tmp_path / "report"
    text = report(runs, out, resamples=20).read_text()
    assert "| exp1 | 40 | 61.2% | 37.5% | 35.0% | 50.0% | 25.0% |" in text
    assert "| exp2 | 40 | 45.5% | 30.0% | 7.5% | 50.0% | 25.0% |" in text
    assert "exp1's maps beat the centred baseline." in text
    assert "exp2's maps do not beat the centred baseline" in text
    assert "No maps scored for exp3: no model.onnx" in text
    # Calibration rows are the stored numbers (at T = 2), the best model (exp2) drawn before and after.
    stored = json.loads((runs[1] / "explain.json").read_text())["calibration"]
    assert (f"| exp2 | 40 | {stored['ece_raw']:.3f} → {stored['ece']:.3f} | {stored['nll_raw']:.3f} → "
            f"{stored['nll']:.3f} | 2.000 |") in text
    assert "**The validation target of 95% precision was unreachable**" in text
    assert (out / "risk_coverage.png").read_bytes().startswith(PNG)
    # The stand-in model file cannot run: the gallery says so in one line, and nothing crashes.
    line = next(line for line in text.splitlines() if line.startswith("No gallery for exp2:"))
    assert "ONNX Runtime cannot load" in line and not (out / "gallery.png").exists()


def _record(temperature, ece_raw, ece, nll_raw, nll, threshold, precision, coverage, images=1010, fitted_for="fp32"):
    met = threshold is not None
    return {"temperature": temperature, "images": images, "ece_raw": ece_raw, "ece": ece, "nll_raw": nll_raw,
            "nll": nll, "split": "val", "fitted_for": fitted_for,
            "selective": {"target_precision": 0.95, "images": images, "threshold": threshold, "met": met,
                          "precision": precision, "coverage": coverage if met else 0.0}}


def test_the_report_shows_each_exported_files_own_calibration_side_by_side():
    from types import SimpleNamespace

    from dogkit.analysis.report import _files_calibration

    fp32 = _record(1.349, 0.1032, 0.0428, 2.698, 2.612, 0.8123, 0.9512, 0.0406)
    int8 = _record(1.362, 0.1101, 0.0457, 2.731, 2.640, 0.7988, 0.9524, 0.0416, fitted_for="int8")
    gate = {"accuracy_change": -0.003, "top1_agreement_with_fp32": 0.98}
    run = SimpleNamespace(short="exp1", export={"calibration": fp32, "int8": {**gate, "calibration": int8},
                                                "fp16": {"error": "fp16 conversion failed: it broke"}})
    lines = _files_calibration(run)
    assert lines[1] == "### Each exported file's own calibration (exp1, validation)"
    assert lines[3].endswith("export keeps no file whose threshold's answers miss the target there.")
    assert lines[5:] == [
        "| model | file | temperature | ECE raw → calibrated | NLL raw → calibrated | threshold | precision | "
        "coverage |", "|---|---|---:|---|---|---:|---:|---:|",
        "| fp32 | model.onnx | 1.349 | 0.103 → 0.043 | 2.698 → 2.612 | 0.812 | 95.1% | 4.1% |",
        "| INT8 | model.int8.onnx | 1.362 | 0.110 → 0.046 | 2.731 → 2.640 | 0.799 | 95.2% | 4.2% |", "",
        "- fp32's own threshold 0.812 meets the 95% target on validation: 95.1% of its 41 answers (of 1010 images) "
        "are right.",
        "- INT8's own threshold 0.799 meets the 95% target on validation: 95.2% of its 42 answers (of 1010 images) "
        "are right.",
        "- No fp16 model was written: its export failed (\"ONNX export and speed\" says why)."]
    # A target no threshold reaches, and an INT8 file exported before each file had its own calibration.
    run.export["int8"] = {**gate, "calibration": _record(1.1, 0.2, 0.1, 3.0, 2.9, None, None, 0.0,
                                                         fitted_for="int8")}
    run.export["fp16"] = gate
    lines = _files_calibration(run)
    assert lines[8] == "| INT8 | model.int8.onnx | 1.100 | 0.200 → 0.100 | 3.000 → 2.900 | none | – | 0.0% |"
    assert lines[-2:] == [
        "- No threshold reaches the 95% target on INT8's validation answers: it has no \"unsure\" threshold, so it "
        "answers \"unsure\" to every image unless `--min-confidence` is given.",
        "- fp16 was exported before each file had its own calibration: it carried fp32's, never checked on its own "
        "answers (dogkit now ignores it); export it again."]
    assert _files_calibration(SimpleNamespace(short="exp2", export=None)) == []


def test_the_report_reads_each_files_calibration_from_a_real_int8_export(exported_int8: Path):
    from dogkit.analysis.report import _files_calibration, load_run

    run = exported_int8.parent
    stored = json.loads((run / "export.json").read_text())
    lines = _files_calibration(load_run(run))
    for label, file, cal in (("fp32", "model.onnx", stored["calibration"]),
                             ("INT8", "model.int8.onnx", stored["int8"]["calibration"])):
        row = next(line for line in lines if line.startswith(f"| {label} |"))
        assert row.startswith(f"| {label} | {file} | {cal['temperature']:.3f} | {cal['ece_raw']:.3f} → "
                              f"{cal['ece']:.3f} | {cal['nll_raw']:.3f} → {cal['nll']:.3f} | ")
        sel = cal["selective"]
        said = (f"- {label}'s own threshold {sel['threshold']:.3f} meets the 95% target" if sel["met"] else
                f"- No threshold reaches the 95% target on {label}'s validation answers")
        assert any(line.startswith(said) for line in lines)
