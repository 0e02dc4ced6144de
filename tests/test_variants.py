"""The export variants table: every consumer reads it, so a variant added as one row and one builder is exported,
benchmarked, served, reported and exported by the study with no other change."""

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from dogkit import variants
from dogkit.variants import Variant, base, by_backend, by_name, derived

DUMMY = Variant("dummy", "model.dummy.onnx", "Dummy", "a copy of the fp32 model", "accuracy", "onnx-dummy",
                precision_key="copy", flag="--dummy", study=True)


def build_dummy(src):
    """The fp32 file under another name: it passes the accuracy gate exactly."""
    return (lambda out: shutil.copy(src.final, out)), {"copy": "the fp32 model, copied"}


def add_dummy(monkeypatch) -> Variant:
    """The dummy row added to the table (the study's only derived one, so that INT8 is not needed here) and its
    builder registered: the two seams a new variant goes through."""
    import dogkit.training.export as export_module

    table = tuple(dataclasses.replace(v, study=False) if v.name == "int8" else v for v in variants.VARIANTS)
    monkeypatch.setattr(variants, "VARIANTS", (*table, DUMMY))
    monkeypatch.setitem(export_module.BUILDERS, DUMMY.name, build_dummy)
    return DUMMY


@pytest.fixture
def dummy(monkeypatch) -> Variant:
    return add_dummy(monkeypatch)


@pytest.fixture(scope="module")
def dummy_export(tiny_run: Path, tmp_path_factory) -> Path:
    """A copy of the tiny run exported once with the dummy variant (the table changed only while it exports)."""
    from dogkit.training.export import export

    run = tmp_path_factory.mktemp("dummy") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model*.onnx", "export.json", "eval", "bench.json"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        result = export(run, parity_images=8, variants=[add_dummy(monkeypatch).name])
    assert set(result.derived) == {"dummy"}
    return run


@pytest.fixture
def dummy_run(dummy: Variant, dummy_export: Path, tmp_path: Path) -> Path:
    """The run exported with the dummy variant, a copy of its own for each test (tests delete its files)."""
    return Path(shutil.copytree(dummy_export, tmp_path / "run"))


def test_the_table_as_it_stands():
    assert [(v.name, v.file, v.backends, v.flag) for v in variants.VARIANTS] == [
        ("fp32", "model.onnx", ("onnx", "opencv"), None),
        ("int8", "model.int8.onnx", ("onnx-int8", "opencv-int8"), "--int8"),
        ("fp16", "model.fp16.onnx", ("onnx-fp16",), "--fp16")]
    assert base().record == "parity" and by_name("int8").record == "int8"
    assert by_backend("opencv-int8") is by_name("int8") and by_backend("torch") is None
    assert variants.backend_files() == {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx",
                                        "onnx-fp16": "model.fp16.onnx", "opencv": "model.onnx",
                                        "opencv-int8": "model.int8.onnx"}
    assert [v.name for v in variants.in_study()] == ["fp32", "int8"]
    with pytest.raises(KeyError, match="the variants are fp32, int8, fp16"):
        by_name("int4")


def test_every_derived_row_has_a_builder_and_every_flag_an_export_option():
    import typer

    from dogkit.cli import app
    from dogkit.training.export import BUILDERS

    assert set(BUILDERS) == {v.name for v in derived()}
    export = typer.main.get_command(app).commands["export"]
    helps = {opt: param.help for param in export.params for opt in param.opts}
    assert {v.flag: helps.get(v.flag) for v in derived()} == {
        "--int8": "Also write a static INT8 model (QDQ, per-channel).",
        "--fp16": "Also write an fp16 model for GPU deployment."}


def test_export_writes_the_dummy_variant_behind_its_gate(dummy_run: Path):
    from dogkit.deploy.runtime import OnnxClassifier

    path = dummy_run / "model.dummy.onnx"
    report = json.loads((dummy_run / "export.json").read_text())
    gate = report["dummy"]
    assert gate["images"] == 120 and gate["top1_agreement_with_fp32"] == 1.0 and gate["accuracy_change"] == 0.0
    assert report["int8"] is None and report["fp16"] is None  # not asked for: recorded as before
    copy, fp32 = OnnxClassifier(path), OnnxClassifier(dummy_run / "model.onnx")
    assert copy.info("copy") == "the fp32 model, copied" and fp32.info("copy") is None
    assert copy.class_names == fp32.class_names and copy.info("run") == fp32.info("run")  # fp32's metadata too
    # Its own calibration, fitted on its own logits (fp32's, here: so fp32's numbers), under its own name.
    assert copy.calibration == gate["calibration"] == {**fp32.calibration, "fitted_for": "dummy"}
    assert fp32.calibration["fitted_for"] == "fp32"
    assert not (dummy_run / "model.int8.onnx").exists() and not (dummy_run / "model.fp16.onnx").exists()


def test_an_unknown_variant_is_refused_before_anything_runs(tiny_run: Path):
    from dogkit.errors import DogkitError
    from dogkit.training.export import export

    with pytest.raises(DogkitError, match=r"^unknown export variant\(s\) dummy; choose from fp32, int8, fp16$"):
        export(tiny_run, variants=["dummy"])


def test_bench_plans_lists_and_runs_the_dummy_backend(dummy_run: Path):
    from dogkit.deploy.bench import all_backends, plan, unvalidated, worker

    assert all_backends() == ("torch", "torch-bf16", "torch-compile", "onnx", "onnx-int8", "onnx-fp16",
                              "onnx-dummy", "opencv", "opencv-int8", "onnx-explain", "onnx-no-maps")
    p = plan(None, dummy_run, ["onnx-dummy", "onnx-int8"], dummy_run.parent)
    assert p.backends == ["onnx-dummy"] and p.onnx["onnx-dummy"] == dummy_run / "model.dummy.onnx"
    assert p.skipped == {"onnx-int8": "no model.int8.onnx (dogkit export --int8)"}
    assert unvalidated(p.onnx["onnx-dummy"], "onnx-dummy", "cpu") is None
    row = worker({"backend": "onnx-dummy", "model": str(p.onnx["onnx-dummy"]), "batch": 2, "threads": 1,
                  "device": "cpu", "warmup": 0, "min_runs": 2, "min_time": 0.0})
    assert row.backend == "onnx-dummy" and row.variant == "model.dummy.onnx, CPU" and row.runs >= 2
    (dummy_run / "model.dummy.onnx").unlink()
    p = plan(None, dummy_run, ["onnx", "onnx-dummy"], dummy_run.parent)
    assert p.backends == ["onnx"] and p.skipped == {"onnx-dummy": "no model.dummy.onnx (dogkit export --dummy)"}


def test_runs_and_serve_see_the_dummy_variant(dummy_run: Path):
    from dogkit.deploy.runtime import OnnxClassifier
    from dogkit.deploy.serve import model_card
    from dogkit.runs import export_current

    card = model_card(OnnxClassifier(dummy_run / "model.dummy.onnx"))
    assert card["precision"] == "dummy" and card["precision_detail"] == "the fp32 model, copied"
    assert card["file"] == "model.dummy.onnx"
    assert model_card(OnnxClassifier(dummy_run / "model.onnx"))["precision"] == "fp32"
    assert export_current(dummy_run)  # the study's variants, the dummy among them, are on record
    report = json.loads((dummy_run / "export.json").read_text())
    (dummy_run / "export.json").write_text(json.dumps({**report, "dummy": {
        k: v for k, v in report["dummy"].items() if k != "calibration"}}))
    assert not export_current(dummy_run)  # exported before each file had its own calibration: export again
    (dummy_run / "export.json").write_text(json.dumps(report))
    (dummy_run / "model.dummy.onnx").unlink()
    assert not export_current(dummy_run)  # recorded as written, but gone: export again


def test_the_report_and_the_study_read_the_dummy_variant(dummy: Variant, monkeypatch):
    import dogkit.deploy.bench as bench_module
    from dogkit import study
    from dogkit.analysis.report import _deployment

    parity = {"max_abs_logit_diff": 1e-5, "top1_agreement": 1.0}
    runs = [SimpleNamespace(short="exp1", bench=None, export={
                "parity": parity, "dummy": {"accuracy_change": -0.004, "top1_agreement_with_fp32": 0.99}}),
            SimpleNamespace(short="exp2", bench=None, export={"parity": parity, "dummy": {"error": "it broke"}})]
    lines = _deployment(runs)
    assert lines[3:6] == [
        "| run | parity: max abs logit diff | parity top-1 agreement | Dummy accuracy change | "
        "Dummy top-1 agreement with fp32 |", "|---|---:|---:|---:|---:|",
        "| exp1 | 1.00e-05 | 100.0% | -0.4 pt | 99.0% |"]
    assert lines[6:8] == ["| exp2 | 1.00e-05 | 100.0% | not written | – |",
                          "\nNo Dummy model for exp2, so only its fp32 model runs: it broke"]

    asked = []
    study._export(lambda best, **kwargs: asked.append(kwargs["variants"]), Path("/nonexistent"),
                  SimpleNamespace(smoke=True))
    assert asked == [["dummy"]]
    benched = []
    monkeypatch.setattr(bench_module, "bench", lambda **kwargs: benched.append(kwargs["backends"]) or {})
    monkeypatch.setattr(bench_module, "save", lambda *args: None)
    study._bench(Path("/nonexistent"), "quick", True)
    assert benched == [["torch", "torch-bf16", "onnx", "onnx-dummy"]]


def test_the_report_reads_as_before_with_the_real_table():
    from dogkit.analysis.report import _deployment

    run = SimpleNamespace(short="exp1", bench=None, export={
        "parity": {"max_abs_logit_diff": 2e-6, "top1_agreement": 1.0},
        "int8": {"accuracy_change": 0.013, "top1_agreement_with_fp32": 0.975}, "fp16": None})
    assert _deployment([run])[3:6] == [
        "| run | parity: max abs logit diff | parity top-1 agreement | INT8 accuracy change | "
        "INT8 top-1 agreement with fp32 |", "|---|---:|---:|---:|---:|",
        "| exp1 | 2.00e-06 | 100.0% | +1.3 pt | 97.5% |"]
