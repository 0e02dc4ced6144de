"""Hostile input, round three: the calibration a model carries, NaN answers, overlays that must not land on inputs
or lose results, archives that lie, names in the report, edited run folders and full disks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from imagegen import encode, pattern
from test_hostile import one_error_line, run_cli
from test_serve import COLOURS, client, explainable_onnx, run

from dogkit.deploy.runtime import OnnxClassifier
from dogkit.deploy.serve import ServeConfig, announce, create_app


def strict_json(text: str):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def with_metadata(source: Path, dest: Path, **entries: str | None) -> Path:
    """A copy of an ONNX file whose ``dogkit.<key>`` entries are set to the given raw text (None: removed)."""
    import onnx

    model = onnx.load(str(source))
    kept = [(e.key, e.value) for e in model.metadata_props if e.key[len("dogkit."):] not in entries]
    del model.metadata_props[:]
    for key, value in kept + [("dogkit." + k, v) for k, v in entries.items() if v is not None]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(dest))
    return dest


def nan_head(path: Path) -> Path:
    """The explainable test model with a NaN in its head's bias: every logit NaN."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(explainable_onnx(path)))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "b":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.full(3, np.nan, np.float32), "b"))
    onnx.save(model, str(path))
    return path


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(encode(pattern(80, 80), "PNG"))
    return path


# ----------------------------------------------------------------------------- 1: serve without a threshold


@pytest.mark.parametrize("calibration", [None, "null", '{"temperature": 1.5}', '{"temperature": 1.5, "selective": {}}'])
def test_serve_starts_on_a_model_without_a_stored_threshold(tiny_onnx: Path, tmp_path: Path, capsys,
                                                            calibration: str | None):
    path = with_metadata(tiny_onnx, tmp_path / "m.onnx", calibration=calibration)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        announce(OnnxClassifier(path), sock, ServeConfig())
    err = capsys.readouterr().err
    assert "never unsure (no threshold stored)" in err
    assert f"temperature {1.0 if calibration in (None, 'null') else 1.5:.3f}" in err


# ----------------------------------------------------------------------------- 2: NaN answers are unsure


def test_nan_logits_answer_unsure_in_strict_json_everywhere(tmp_path: Path, photo: Path, capsys):
    model = nan_head(tmp_path / "nan.onnx")
    code, out, err = run_cli(capsys, "predict", str(photo), "--model", str(model), "--json", "--min-confidence", "1")
    assert code == 0, err
    (row,) = strict_json(out)
    assert row["unsure"] is True and row["answer"] == "unsure" and all(t["prob"] is None for t in row["top"])
    assert "NaN or infinite for 1 of the images" in err
    # the same with no threshold at all (never unsure otherwise)
    plain = with_metadata(model, tmp_path / "plain.onnx", calibration=None)
    code, out, err = run_cli(capsys, "predict", str(photo), "--model", str(plain), "--json")
    assert code == 0 and strict_json(out)[0]["unsure"] is True
    # a CSV says nothing rather than "nan"
    code, out, err = run_cli(capsys, "predict", str(photo), "--model", str(plain), "--out", "-")
    row = out.splitlines()[1].split(",")
    assert code == 0 and row[1:] == ["red", "", "green", "", "blue [/b]", "", "unsure", ""], row

    async def go():
        async with client(create_app(OnnxClassifier(model))) as c:
            return await c.post("/predict", content=photo.read_bytes(), headers={"content-type": "image/png"})

    answer = run(go())
    assert answer.status_code == 200, answer.text
    (result,) = strict_json(answer.text)["results"]
    assert result["unsure"] is True and result["confidence"] is None

    # eval on a class-folder tree: metrics.json is strict JSON
    for name in COLOURS[:2]:  # the third has a "/" in it
        (tmp_path / "tree" / name).mkdir(parents=True)
        (tmp_path / "tree" / name / "a.png").write_bytes(photo.read_bytes())
    code, out, err = run_cli(capsys, "eval", "--model", str(model), "--data", str(tmp_path / "tree"),
                             "--out", str(tmp_path / "eval"))
    assert code == 0, err
    metrics = strict_json((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["calibration"]["ece"] is None and "NaN or infinite for 2 of the 2" in err


# ----------------------------------------------------------------------------- forged calibration


@pytest.mark.parametrize("calibration, field", [
    ('{"temperature": NaN}', "temperature"),
    ('{"temperature": -2}', "temperature"),
    ('{"temperature": 0}', "temperature"),
    ('{"temperature": Infinity}', "temperature"),
    ('{"temperature": 5e-324}', "temperature"),  # passes 0 < t < inf, then logits / t overflow
    ('{"temperature": "2.0"}', "temperature"),
    ('{"temperature": true}', "temperature"),
    ('{"temperature": 1' + "0" * 400 + "}", "temperature"),
    ('{"temperature": 1.5, "selective": {"threshold": 5}}', "selective.threshold"),
    ('{"temperature": 1.5, "selective": {"threshold": -1}}', "selective.threshold"),
    ('{"temperature": 1.5, "selective": {"threshold": true}}', "selective.threshold"),
    ('{"temperature": 1.5, "selective": {"threshold": -Infinity}}', "selective.threshold"),
    ('{"temperature": 1.5, "selective": {"threshold": NaN}}', "selective.threshold"),
    ('{"temperature": 1.5, "selective": [0.5]}', "selective"),
    ("[" * 100_000, "not JSON"),
    ("[1, 2]", "not an object"),
])
def test_a_forged_calibration_is_refused_at_load_naming_the_field(tiny_onnx: Path, tmp_path: Path, photo: Path,
                                                                  capsys, calibration: str, field: str):
    model = with_metadata(tiny_onnx, tmp_path / "forged.onnx", calibration=calibration)
    for command in (["predict", str(photo), "--model", str(model)], ["serve", str(model), "--port", "0"]):
        code, out, err = run_cli(capsys, *command)
        line = one_error_line(err)
        assert code == 2 and out == "" and "dogkit.calibration" in line and field in line, line
        assert "unexpected" not in line


# ----------------------------------------------------------------------------- 3–5: overlays


def explain_cli(capsys, model: Path, out: Path, *inputs: Path) -> tuple[int, list[dict], str]:
    code, stdout, err = run_cli(capsys, "predict", *map(str, inputs), "--model", str(model), "--explain",
                                str(out / "maps"), "--out", str(out / "rows.json"))
    rows = strict_json((out / "rows.json").read_text()) if (out / "rows.json").is_file() else []
    return code, rows, err


def test_an_overlay_never_lands_on_an_input_through_a_linked_sub_folder(tmp_path: Path, capsys):
    model = explainable_onnx(tmp_path / "colours.onnx")
    for sub, seed in (("a", 1), ("b", 2)):
        (tmp_path / "photos" / sub).mkdir(parents=True)
        (tmp_path / "photos" / sub / "rex.png").write_bytes(encode(pattern(64, 64, seed), "PNG"))
    before = (tmp_path / "photos" / "a" / "rex.png").read_bytes()
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "a").symlink_to(tmp_path / "photos" / "a")
    code, rows, err = explain_cli(capsys, model, tmp_path, tmp_path / "photos")
    assert (tmp_path / "photos" / "a" / "rex.png").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "photos" / "a").iterdir()) == ["rex.png"]
    assert code == 0, err
    linked, plain = rows
    assert "is a link" in linked["error"] and "explain" not in linked and linked["answer"] in COLOURS + ["unsure"]
    assert plain["explain"] == [str(tmp_path / "maps" / "b" / "rex.png")] and "error" not in plain
    assert (tmp_path / "maps" / "b" / "rex.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_overlay_that_cannot_be_written_is_that_rows_error_and_the_rest_go_on(tmp_path: Path, capsys):
    model = explainable_onnx(tmp_path / "colours.onnx")
    photos = tmp_path / "photos"
    (photos / "b").mkdir(parents=True)
    long_name = "x" * 251 + ".png"  # 255 bytes: legal, and so is its overlay's name; a temporary beside it is not
    for i, name in enumerate([long_name, "b/rex.png", "c.png"]):
        (photos / name).write_bytes(encode(pattern(64, 64, i), "PNG"))
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "b").write_text("a file where the overlays' folder would be")
    code, rows, err = explain_cli(capsys, model, tmp_path, photos)
    assert code == 0, err
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {long_name, "rex.png", "c.png"}
    assert by_name[long_name]["explain"] == [str(tmp_path / "maps" / ("x" * 251 + ".png"))]
    assert "not a folder" in by_name["rex.png"]["error"] and by_name["rex.png"]["top"]
    assert by_name["c.png"]["explain"] == [str(tmp_path / "maps" / "c.png")]
    assert "1 overlays could not be written" in err


def test_overlay_names_never_collide(tmp_path: Path, capsys):
    from dogkit.deploy.predict import overlay_names

    names = overlay_names([Path("p/rex.jpg"), Path("p/REX.jpg"), Path("p/rex.jpg-1.png")])
    assert len({n.casefold() for n in names}) == 3, names
    names = overlay_names([Path("p/A/rex.jpg"), Path("p/a/rex.jpg"), Path("p/a/rex.jpg-1.png"),
                           Path("p/A/rex.jpg-2.png")])
    assert len({n.casefold() for n in names}) == 4, names

    model = explainable_onnx(tmp_path / "colours.onnx")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(["rex.jpg", "REX.jpg", "rex.jpg-1.png"]):
        (photos / name).write_bytes(encode(pattern(64, 64, i), "PNG"))
    code, rows, err = explain_cli(capsys, model, tmp_path, photos)
    assert code == 0, err
    overlays = [r["explain"][0] for r in rows]
    assert len({o.casefold() for o in overlays}) == 3 and all(Path(o).is_file() for o in overlays), overlays


# ----------------------------------------------------------------------------- 6: a lying zip end record


def test_a_zip_whose_end_record_understates_its_members_is_refused_while_counting(tmp_path: Path):
    import zipfile

    from test_hostile import _many_member_zip, run_measured

    from dogkit.data.archives import _count_directory, _zip_directory, check_archive
    from dogkit.data.limits import Limits
    from dogkit.errors import DogkitError

    many = tmp_path / "many.zip"
    _many_member_zip(many, 1_000_000, stated=99_999)  # 47 MB of directory: 470 bytes a member, plausible
    with pytest.raises(DogkitError, match="more than 100000 members .*: its directory holds more, though its end "
                                          "record says 99999"):
        check_archive(many, Limits(max_archive_members=100_000))
    # The count stops one past the limit, a tenth of the way through the directory.
    stated, directory, start = _zip_directory(many)
    assert stated == 99_999 and _count_directory(many, start, directory, 100_000) == 100_001
    proc, peak = run_measured(tmp_path, "prepare", "--source", str(many), "--out", str(tmp_path / "out"),
                              env_extra={"DOGKIT_MAX_ARCHIVE_MEMBERS": "100000"})
    assert proc.returncode == 2 and "more than 100000 members" in one_error_line(proc.stderr)
    assert peak < 200 * 2**20, f"peak RSS {peak / 2**20:.0f} MB"  # zipfile's listing of it costs ~300 MB

    # an honest zip, with data before it (as zipfile allows), is still read
    honest = tmp_path / "honest.zip"
    with zipfile.ZipFile(honest, "w") as zf:
        for i in range(50):
            zf.writestr(f"d/{i}.txt", "x" * i, zipfile.ZIP_DEFLATED)
    prefixed = tmp_path / "prefixed.zip"
    prefixed.write_bytes(b"#!/bin/sh\n" * 100 + honest.read_bytes())
    assert len(check_archive(honest, Limits(max_archive_members=50))) == 50
    assert len(check_archive(prefixed, Limits(max_archive_members=50))) == 50
    with pytest.raises(DogkitError, match="more than 49 members"):
        check_archive(prefixed, Limits(max_archive_members=49))


# ----------------------------------------------------------------------------- 7: names in the report


def test_report_escapes_class_and_run_names_for_markdown_and_html(tmp_path: Path, monkeypatch):
    import re
    from types import SimpleNamespace

    from markdown_it import MarkdownIt
    from test_report import fake_run

    import dogkit.analysis.report as report_module

    names = ["a|b|c", "<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "[x](javascript:alert(3))"]
    monkeypatch.setattr(report_module, "load_dataset", lambda data: SimpleNamespace(class_names=names, records=[]))
    labels = np.arange(40) % 4
    runs = [fake_run(tmp_path, "exp1-resnet50", 1, np.arange(40) < 30, labels),
            fake_run(tmp_path, "odd|<b>run", 0, np.arange(40) < 20, labels)]
    text = report_module.report(runs, tmp_path / "report", resamples=50).read_text()
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert "<img src=x" not in html and "<script>" not in html and 'href="javascript' not in html
    assert "<b>run" not in html
    for table in re.findall(r"<table>.*?</table>", html, re.S):
        header = len(re.findall(r"<th[ >]", table))
        for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]:
            assert len(re.findall(r"<td[ >]", row)) == header, row
    # the worst breeds' table names each breed whole, in one cell
    assert "<td>a|b|c</td>" in html and "<td>&lt;script&gt;alert(2)&lt;/script&gt;</td>" in html


# ----------------------------------------------------------------------------- edited run folders


@pytest.mark.parametrize("file, edit, named", [
    ("config.json", {"lr": True}, "bad value for lr: not a number: True"),
    ("config.json", {"batch_size": 10**12}, "batch_size must be at most 65,536"),
    ("config.json", {"epochs": 10**18}, "epochs must be at most 100,000"),
    ("config.json", {"workers": 100_000}, "workers must be at most 256"),
    ("config.json", {"arch": 5}, "bad value for arch: not text: 5"),
    ("config.json", {"image_size": 64}, "image_size 64 (the checkpoint: 32)"),
    ("last.pt", {"epoch": "1"}, "epoch must be a whole number of 0 or more, got '1'"),
    ("last.pt", {"global_step": None}, "global_step must be a whole number of 0 or more, got None"),
    ("last.pt", {"config": [1]}, "config is not an object"),
    ("last.pt", {"preprocess": None}, "preprocess is not an object"),
    ("last.pt", {"preprocess": {"size": "x"}}, "preprocess is not a preprocessing spec"),
    ("last.pt", {"history": 5}, "history is not a list"),
    ("last.pt", {"history": ["x"]}, "history holds a row that is not an object"),
    ("last.pt", {"best": []}, "best is not an object"),
    ("last.pt", {"rng": -1}, "rng is not a list"),
    ("last.pt", {"rng": ["x"]}, "rng is not the random generators' state"),
    ("last.pt", {"bad_epochs": 2.5}, "bad_epochs must be a whole number of 0 or more, got 2.5"),
    ("last.pt", {"tested": "no"}, "tested is not true or false"),
    ("last.pt", {"averages": [1]}, "averages is not an object"),
    ("last.pt", {"run_format": None}, "was saved by an older dogkit, before the run-state record: it cannot be "
                                      "resumed; start a new run"),
    ("last.pt", "moments", "the optimizer's exp_avg of a (24, 3, 3, 3) weight is (3,)"),
])
def test_an_edited_run_folder_is_one_line_naming_the_file_and_field(small_run: Path, tmp_path: Path, capsys,
                                                                    file: str, edit: dict | str, named: str):
    import shutil

    import torch

    run = tmp_path / small_run.name
    shutil.copytree(small_run, run)
    if file == "config.json":
        config = json.loads((run / file).read_text())
        (run / file).write_text(json.dumps({**config, "epochs": 2, **edit}))
    else:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "epochs": 2}))
        ckpt = torch.load(run / file, weights_only=False)
        if edit == "moments":  # the first weight's Adam moments cut to another shape
            state = ckpt["optimizer"]["state"]
            cut = {**state[0], "exp_avg": state[0]["exp_avg"].flatten()[:3]}
            edit = {"optimizer": {**ckpt["optimizer"], "state": {**state, 0: cut}}}
        torch.save({**ckpt, **edit}, run / file)
    before = (run / "last.pt").read_bytes()
    code, out, err = run_cli(capsys, "train", "--resume", str(run))
    line = one_error_line(err)
    assert code == 2 and file in line and named in line, line
    assert "unexpected" not in line and (run / "last.pt").read_bytes() == before


@pytest.mark.parametrize("classes", ['{"a": 1}', '[1, 2]', '[{"index": 0}]'])
def test_a_hand_made_classes_json_is_one_line(tmp_path: Path, classes: str):
    from dogkit.data.dataset import load_dataset
    from dogkit.errors import DogkitError

    (tmp_path / "dataset.json").write_text('{"images_root": "Images"}')
    (tmp_path / "classes.json").write_text(classes)
    with pytest.raises(DogkitError, match="holds an unreadable dataset"):
        load_dataset(tmp_path)


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 1 MB tmpfs, full (a test truncates its filler to make room); needs the right to mount (root, as in the
    project's container)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\1" * 4096)
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def make_room(disk: Path, size: int) -> None:
    import os

    os.truncate(disk / "filler", (disk / "filler").stat().st_size - size)


def test_a_full_disk_loses_no_prediction_and_no_metrics(tiny_onnx: Path, tmp_path: Path, full_disk: Path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(60):
        (photos / f"{i:02d}.png").write_bytes(encode(pattern(32, 32, i), "PNG"))
    make_room(full_disk, 4096)  # for the write test's empty file, not for 60 rows
    for out in ("rows.csv", "rows.json"):
        code, stdout, err = run_cli(capsys, "predict", str(photos), "--model", str(tiny_onnx), "--out",
                                    str(full_disk / out))
        line = one_error_line(err[err.index("error:"):])
        assert code == 2 and "no space left on the disk of" in line and "MB free" in line, line
        assert "the 60 predictions are on stdout instead" in line and not (full_disk / out).exists()
        rows = strict_json(stdout) if out.endswith(".json") else stdout.splitlines()[1:]
        assert len(rows) == 60
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no temporaries left behind
    (photos / "red").mkdir()
    (photos / "green").mkdir()
    for i, p in enumerate(sorted(photos.glob("*.png"))):
        p.rename(photos / ("red", "green")[i % 2] / p.name)
    code, stdout, err = run_cli(capsys, "eval", "--model", str(tiny_onnx), "--data", str(photos), "--out",
                                str(full_disk / "eval"))
    line = one_error_line(err[err.index("error:"):])
    assert code == 2 and "no space left on the disk of" in line and "the metrics are on stdout instead" in line
    shown = strict_json(stdout)
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_onnx), "--data", str(photos), "--out",
                           str(tmp_path / "eval"))
    written = strict_json((tmp_path / "eval" / "metrics.json").read_text())
    assert code == 0 and shown["images"] == written["images"] == 60 and shown["metrics"] == written["metrics"]
    assert not (full_disk / "eval" / "metrics.json").exists()


def test_a_checkpoint_that_does_not_fit_is_one_line_and_keeps_the_last(tmp_path: Path, full_disk: Path):
    import torch

    from dogkit.errors import DogkitError
    from dogkit.training.checkpoint import save_checkpoint

    make_room(full_disk, 64 * 1024)
    save_checkpoint({"w": torch.zeros(10)}, full_disk / "last.pt")
    kept = (full_disk / "last.pt").read_bytes()
    with pytest.raises(DogkitError, match=r"cannot write .*last\.pt \(.*; 0\.\d MB free on its disk\); the previous "
                                          "checkpoint is kept"):
        save_checkpoint({"w": torch.zeros(100_000)}, full_disk / "last.pt")
    assert (full_disk / "last.pt").read_bytes() == kept


# ----------------------------------------------------------------------------- the decode budget


@pytest.mark.parametrize("channels, dtype", [(4, np.uint16), (4, np.uint8), (3, np.uint16), (3, np.uint8),
                                             (1, np.uint16)])
def test_the_decode_budget_costs_a_png_at_least_its_real_peak(channels: int, dtype):
    import tracemalloc

    import cv2

    from dogkit.data.budget import decode_cost
    from dogkit.data.images import decode_rgb

    image = np.zeros((1500, 2000, channels), dtype)
    image[::7, ::3] = 200
    data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
    tracemalloc.start()  # numpy's allocations, OpenCV's decoded array among them, are traced
    try:
        base = tracemalloc.get_traced_memory()[0]
        rgb = decode_rgb(data, orientation=True)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert rgb.shape == (1500, 2000, 3)
    cost = decode_cost(data[:4096])
    assert peak <= cost <= 1.6 * peak + 16 * 2**20, (peak / 1e6, cost / 1e6)  # was 24 MB for a 91 MB peak


# ----------------------------------------------------------------------------- divergence


def test_diverging_epochs_are_named():
    from dogkit.training.trainer import diverging

    calm = [{"train_loss": 4.8, "val_loss": 4.7}, {"train_loss": 3.9, "val_loss": 4.0}]
    assert diverging(calm, 120) is None
    assert diverging(calm + [{"train_loss": 6.8e6, "val_loss": 5.0}], 120) == \
        "training loss 6.8e+06 at epoch 3, from 3.9"
    assert diverging([{"train_loss": 6.8e6, "val_loss": 9.0}], 120) == \
        "training loss 6.8e+06 at epoch 1; a uniform guess scores 4.79"
    assert diverging(calm + [{"train_loss": 3.0, "val_loss": float("inf")}], 120) == "validation loss inf at epoch 3"


def test_a_diverging_training_warns_once_and_names_the_tested_epoch(prepared_sample: Path, tmp_path: Path, capsys):
    code, out, err = run_cli(capsys, "train", "--data", str(prepared_sample), "--runs-dir", str(tmp_path),
                             "--arch", "resnet18", "--set", "pretrained=false", "--image-size", "32",
                             "--batch-size", "16", "--epochs", "2", "--lr", "10", "--optimizer", "sgd",
                             "--set", "max_steps_per_epoch=3", "--amp", "off", "--workers", "0")
    warnings = [line for line in err.splitlines() if "the training diverged" in line]
    assert code == 0 and len(warnings) == 1, err
    import re

    epoch = int(re.search(r"the test uses the model of epoch (\d+)", warnings[0]).group(1))
    best = json.loads((next(tmp_path.iterdir()) / "test_metrics.json").read_text())["best"]["epoch"]
    assert epoch == best, (warnings[0], best)


# ----------------------------------------------------------------------------- serve: one client's sockets


def _http(source: str, port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_one_clients_idle_sockets_do_not_starve_another_and_errors_are_json(tiny_onnx: Path, tmp_path: Path):
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dogkit", "serve", str(tiny_onnx), "--port", str(port),
                             "--max-connections", "20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    idle: list[socket.socket] = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        for _ in range(40):  # one client's idle connections, twice the server's limit
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.1", 0)))
        time.sleep(0.5)
        answer = _http("127.0.0.2", port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer[:300]
        assert json.loads(body)["status"] == "ok"
        bad = _http("127.0.0.2", port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n")
        head, _, body = bad.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, bad[:300]
        assert "malformed HTTP request" in json.loads(body)["error"]
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)


def _answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response on a connection that may stay open: (head, body), by its content-length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
        b"content-length:")), b"0"))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head, body


def test_past_the_connection_limit_the_answer_is_a_json_503(tiny_onnx: Path):
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dogkit", "serve", str(tiny_onnx), "--port", str(port),
                             "--max-connections", "4", "--keep-alive", "600"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    held: list[socket.socket] = []
    try:
        while not proc.stdout.readline().startswith("dogkit serve: http"):  # listening from that line on
            assert proc.poll() is None
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.3", "127.0.0.3"):  # two clients at their share each
            held.append(socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)))
            held[-1].sendall(health)
            assert _answer(held[-1])[0].startswith(b"HTTP/1.1 200")  # answered, and kept open
        with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.0.2", 0)) as extra:
            extra.sendall(health)
            head, body = _answer(extra)
        assert head.startswith(b"HTTP/1.1 503") and b"application/json" in head, head
        assert "4 connections open, its limit" in json.loads(body)["error"]
        held.pop().close()
        for _ in range(100):  # room again once the server has seen that close
            head = _http("127.0.0.2", port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                         ).partition(b"\r\n\r\n")[0]
            if head.startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.1)
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------- files that are not files


def test_fifos_and_devices_as_config_or_weights_are_refused_from_stat(prepared_sample: Path, tmp_path: Path,
                                                                     capsys):
    import os

    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    weights = tmp_path / "weights.pt"
    os.mkfifo(weights)
    for args, why in ((["--config", str(fifo)], "it is a FIFO, not a file"),
                      (["--config", "/dev/zero"], "it is a device, not a file"),
                      (["--exp", "1", "--weights", str(weights)], "it is a FIFO, not a file")):
        code, out, err = run_cli(capsys, "train", *args, "--data", str(prepared_sample), "--runs-dir",
                                 str(tmp_path / "runs"), "--epochs", "1")
        line = one_error_line(err)
        assert code == 2 and why in line, line


def test_a_checkpoint_whose_head_does_not_match_its_metadata_is_one_line(tiny_run: Path, tmp_path: Path, capsys):
    import shutil

    import torch

    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.onnx", "export.json"))
    ckpt = torch.load(run / "best.pt", weights_only=False)
    head = next(k for k in ckpt["model"] if k.endswith("fc.weight"))
    ckpt["model"][head] = ckpt["model"][head][:3]
    torch.save(ckpt, run / "best.pt")
    code, out, err = run_cli(capsys, "export", str(run))
    line = one_error_line(err)
    assert code == 2 and "best.pt: its weights do not fit the resnet18 with 120 classes its metadata describes" in line
    assert "size mismatch" in line and "unexpected" not in line


def test_bench_end_to_end_over_a_folder_with_a_bad_image_first(tiny_onnx: Path, tmp_path: Path):
    import subprocess
    import sys

    from dogkit.deploy.bench import bench_end_to_end
    from dogkit.errors import DogkitError

    images = tmp_path / "images"
    images.mkdir()
    (images / "0-bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for i in range(3):
        (images / f"{i + 1}.png").write_bytes(encode(pattern(32, 32, i), "PNG"))
    row = bench_end_to_end(tiny_onnx, "onnx", images, 2, 1, "cpu")
    assert row.images_per_s > 0 and row.end_to_end and "4 files" in row.variant
    for p in images.glob("[0-9].png"):
        p.write_bytes(b"broken")
    with pytest.raises(DogkitError, match="none of the 4 files in .* is a usable image"):
        bench_end_to_end(tiny_onnx, "onnx", images, 2, 1, "cpu")
    proc = subprocess.run([sys.executable, "-m", "dogkit", "bench", "--model", str(tiny_onnx), "--backends", "onnx",
                           "--batch-sizes", "1", "--threads", "1", "--min-time", "0.01", "--min-runs", "1",
                           "--warmup", "0", "--images", str(images), "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr and "File \"" not in proc.stderr, proc.stderr
    assert "is a usable image" in proc.stderr, proc.stderr


def test_a_disk_that_fills_anywhere_in_a_command_is_one_line(tmp_path: Path, capsys, monkeypatch):
    """Wherever a write fails for room (a metrics row, a log line, a plot), the command ends in one line naming
    the file and the room left, not an 'unexpected OSError'."""
    import errno
    import sys
    import types

    def train(cfg=None, *, resume=None, overrides=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "metrics.csv"))

    monkeypatch.setitem(sys.modules, "dogkit.training.trainer", types.SimpleNamespace(train=train))
    (tmp_path / "runs").mkdir()
    code, _, err = run_cli(capsys, "train", "--exp", "3", "--runs-dir", str(tmp_path / "runs"))
    line = one_error_line(err)
    assert code == 2 and "no space left on the disk of" in line and "metrics.csv" in line and "MB free" in line
    assert "unexpected" not in err


def test_a_dataset_path_the_system_cannot_look_up_is_one_line():
    """An edited config.json's `data` of 400 characters: is_file raises ENAMETOOLONG rather than answering."""
    from dogkit.data.dataset import load_dataset
    from dogkit.errors import DogkitError

    with pytest.raises(DogkitError, match="cannot look in 1010.* for a prepared dataset: File name too long"):
        load_dataset("10" * 200)
