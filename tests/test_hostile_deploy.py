"""Hostile input to the deploy commands: forged model metadata, names that are not UTF-8, skipped files kept in
the output, folder trees with a bad image, and many large images within the decode budget."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from imagegen import encode, pattern
from test_hostile import GB, one_error_line, run_cli, run_measured

from dogkit.deploy.runtime import OnnxClassifier
from dogkit.errors import DogkitError

NOT_UTF8 = os.fsdecode(b"\xff\xfe.png")


def forged(tiny: Path, folder: Path, **changes) -> Path:
    """A copy of the tiny model with its metadata edited: class_names, or preprocessing fields."""
    import onnx

    model = onnx.load(str(tiny))
    for entry in model.metadata_props:
        if entry.key == "dogkit.class_names" and "class_names" in changes:
            entry.value = json.dumps(changes.pop("class_names"))
        if entry.key == "dogkit.preprocess":
            entry.value = json.dumps({**json.loads(entry.value), **changes})
    path = folder / "forged.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("changes, cause", [
    ({"class_names": ["red", "green"]}, "its graph has 3 outputs but its metadata names 2 classes"),
    ({"size": 64, "resize": 73}, "its graph takes images of [32, 32, 3], but its preprocessing spec says 64×64×3"),
    ({"size": 20000, "resize": 20000}, "size must be a whole number from 1 to 1024, got 20000"),
    ({"size": 0}, "size must be a whole number from 1 to 1024, got 0"),
    ({"size": "32"}, "size must be a whole number from 1 to 1024, got '32'"),
    ({"size": 32.5}, "size must be a whole number from 1 to 1024, got 32.5"),
    ({"std": [0, 1, 1]}, "std must be three finite numbers above 0"),
])
def test_forged_metadata_is_refused_at_load_in_one_line(tiny_onnx: Path, tmp_path: Path, capsys, changes: dict,
                                                         cause: str):
    bad = forged(tiny_onnx, tmp_path, **changes)
    image = tmp_path / "a.png"
    image.write_bytes(encode(pattern(), "PNG"))
    for command in (["predict", str(image), "--model", str(bad)], ["bench", "--model", str(bad)],
                    ["serve", str(bad), "--port", "0"]):
        code, out, err = run_cli(capsys, *command)
        line = one_error_line(err)
        assert code == 2 and out == "" and cause in line, (command, err)
        assert "Traceback" not in err and "unexpected" not in line


def test_a_forged_size_costs_no_memory(tiny_onnx: Path, tmp_path: Path):
    bad = forged(tiny_onnx, tmp_path, size=20000, resize=20000)
    image = tmp_path / "a.png"
    image.write_bytes(encode(pattern(), "PNG"))
    proc, peak = run_measured(tmp_path, "predict", str(image), "--model", str(bad))
    assert proc.returncode == 2 and "size must be a whole number" in proc.stderr
    assert peak < 0.5 * GB, f"peak RSS {peak / GB:.2f} GB"  # was 4.8 GB before ONNX Runtime refused the shape


def test_onnx_runtime_errors_keep_their_cause(tiny_onnx: Path):
    model = OnnxClassifier(tiny_onnx)
    with pytest.raises(DogkitError) as e:
        model.run(np.zeros((1, 16, 16, 3), np.uint8))
    message = str(e.value)
    assert message.startswith("ONNX Runtime failed on tiny.onnx: ") and "Got: 16 Expected: 32" in message
    assert "[ONNXRuntimeError]" not in message and "\n" not in message


def test_predict_keeps_odd_names_and_skipped_files_in_its_output(tiny_onnx: Path, tmp_path: Path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / NOT_UTF8).write_bytes(encode(pattern(seed=1), "PNG"))
    (folder / "plain.png").write_bytes(encode(pattern(seed=2), "PNG"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "esc\x1b[31m.png").write_bytes(encode(pattern(seed=3), "PNG"))
    for out in (tmp_path / "p.csv", tmp_path / "p.json"):
        code, table, err = run_cli(capsys, "predict", str(folder), "--model", str(tiny_onnx), "--out", str(out))
        assert code == 0, err
        assert "3 images predicted, 1 skipped" in err and "\x1b" not in err + table and "\\x1b[31m" in table
        if out.suffix == ".csv":
            rows = list(csv.DictReader(out.open(encoding="utf-8")))
            by_name = {Path(r["path"]).name: r for r in rows}
            assert by_name["\\xff\\xfe.png"]["label1"] and by_name["\\xff\\xfe.png"]["error"] == ""
            assert by_name["broken.jpg"]["label1"] == "" and by_name["broken.jpg"]["error"]
        else:
            rows = json.loads(out.read_text(encoding="utf-8"))
            by_name = {Path(r["path"]).name: r for r in rows}
            assert by_name["\\xff\\xfe.png"]["top"] and "error" in by_name["broken.jpg"]
        assert len(rows) == 4 and "esc\\x1b[31m.png" in by_name


def test_eval_on_a_folder_tree_skips_a_bad_image_and_records_it(tiny_onnx: Path, tmp_path: Path, capsys):
    tree = tmp_path / "tree"
    for k, name in enumerate(("red", "green")):
        (tree / name).mkdir(parents=True)
        for i in range(3):
            (tree / name / f"{i}.png").write_bytes(encode(pattern(seed=10 * k + i), "PNG"))
    (tree / "green" / "cut.png").write_bytes(encode(pattern(), "PNG")[:60])
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, "eval", "--model", str(tiny_onnx), "--data", str(tree), "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6
    assert [s["file"] for s in metrics["skipped"]] == ["green/cut.png"] and metrics["skipped"][0]["reason"]
    assert "skipped green/cut.png" in err and "6 images, 1 unusable files skipped" in err


def zeros_png_file(path: Path, megapixels: float) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from serve_flood import zeros_png

    sys.path.pop(0)
    path.write_bytes(zeros_png(megapixels))
    return path


def test_predict_decodes_large_images_within_the_decode_budget(tiny_onnx: Path, tmp_path: Path):
    """Two accepted 50-megapixel photos (300 MB each while decoding): one at a time within the 512 MB budget,
    whatever the number of decode threads."""
    folder = tmp_path / "big"
    folder.mkdir()
    for k in range(2):
        zeros_png_file(folder / f"{k}.png", 50)
    proc, peak = run_measured(tmp_path, "predict", str(folder), "--model", str(tiny_onnx))
    assert proc.returncode == 0 and "2 images predicted, 0 skipped" in proc.stderr, proc.stderr
    assert peak < 0.55 * GB, f"peak RSS {peak / GB:.2f} GB"  # two at once: above 0.7 GB
