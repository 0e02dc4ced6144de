"""predict's calibrated answers, "unsure" and overlays; eval's calibration and localisation."""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from torchless import CLI_WITHOUT_TORCH

from dogkit.analysis.evaluate import evaluate
from dogkit.data.dataset import load_dataset
from dogkit.data.images import read_rgb
from dogkit.deploy.explain import caption_text, overlay
from dogkit.deploy.predict import format_predictions, overlay_names, predict, predict_inputs, safe_part
from dogkit.deploy.runtime import OnnxClassifier
from dogkit.errors import DogkitError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def softmax_ref(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ece_ref(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s ECE written out: equal-width bins (lo, hi], the first [0, hi]."""
    conf, right = probs.max(1), probs.argmax(1) == labels
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf <= hi) & ((conf > lo) if b else True)
        if inside.any():
            total += inside.sum() * abs(right[inside].mean() - conf[inside].mean())
    return total / len(labels)


def with_calibration(source: Path, dest: Path, calibration: dict) -> Path:
    """A copy of an exported model whose dogkit.calibration entry is ``calibration``."""
    import onnx

    model = onnx.load(str(source))
    entry = next(e for e in model.metadata_props if e.key == "dogkit.calibration")
    entry.value = json.dumps(calibration)
    onnx.save(model, str(dest))
    return dest


@pytest.fixture(scope="module")
def photos(sample_dir: Path) -> list[Path]:
    """The first two photos of each of 8 breeds of the real sample."""
    folders = sorted(p for p in (sample_dir / "Images").iterdir() if p.is_dir())[:8]
    return [f for folder in folders for f in sorted(folder.iterdir())[:2]]


@pytest.fixture(scope="module")
def logits_of(exported: Path, photos: list[Path]) -> np.ndarray:
    """The logits, computed here from the preprocessed pixels, not through predict."""
    runner = OnnxClassifier(exported)
    return runner.run(np.stack([runner.preprocess(read_rgb(p, orientation=runner.spec.orients)) for p in photos]))


@pytest.fixture(scope="module")
def calibrated(exported: Path, logits_of: np.ndarray, tmp_path_factory) -> tuple[Path, float, float]:
    """The tiny model with a temperature of 2.5 and a threshold at the median calibrated confidence of the photos
    (an untrained model's own threshold is unreachable: every answer would be unsure)."""
    temperature = 2.5
    threshold = float(np.median(softmax_ref(logits_of, temperature).max(1)))
    path = with_calibration(exported, tmp_path_factory.mktemp("cal") / "model.onnx",
                            {"temperature": temperature, "ece_raw": 0.1, "ece": 0.05, "split": "val",
                             "selective": {"target_precision": 0.95, "threshold": threshold, "met": True}})
    return path, temperature, threshold


@pytest.fixture(scope="module")
def explaining_96(prepared_sample: Path, tmp_path_factory) -> tuple[Path, float, float]:
    """A random resnet18 exported at 96 px with maps (3×3: at 32 px they are 1×1, flat, and score nothing), the
    sample's classes, a temperature of 2 and a threshold of 0.025."""
    import torch

    from dogkit.deploy.preprocess import PreprocessSpec
    from dogkit.training.export import add_metadata, export_onnx
    from dogkit.training.models import build_model

    spec = PreprocessSpec.for_size(96)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export96") / "model.onnx"
    export_onnx(build_model("resnet18", 120, spec=spec).eval(), spec, path, maps=True)
    add_metadata(path, {"class_names": load_dataset(prepared_sample).class_names, "preprocess": spec.to_json(),
                        "calibration": {"temperature": 2.0, "selective": {"threshold": 0.025}}})
    return path, 2.0, 0.025


def energy_ref(cam: np.ndarray, record, size: int, resize: int) -> float:
    """The share of the normalised map's mass inside the boxes, written out for an upright photo: the map
    stretched bilinearly over the centre square the model saw, the photo at most 512 pixels on a side."""
    w, h, boxes = record.width, record.height, [(b.xmin, b.ymin, b.xmax, b.ymax) for b in record.boxes]
    scale = 512 / max(w, h)
    if scale < 1:
        w, h = round(w * scale), round(h * scale)
        boxes = [tuple(round(v * scale) for v in b) for b in boxes]
    side = max(1, (2 * min(h, w) * size + resize) // (2 * resize))
    top, left = (h - side) // 2, (w - side) // 2
    m = (cam - cam.min()) / (cam.max() - cam.min())
    full = np.zeros((h, w), np.float64)
    full[top: top + side, left: left + side] = cv2.resize(m.astype(np.float32), (side, side),
                                                          interpolation=cv2.INTER_LINEAR)
    inside = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
    return float(full[inside].sum() / full.sum())


def test_unsure_exactly_below_the_stored_threshold_on_calibrated_probabilities(calibrated, photos, logits_of):
    path, temperature, threshold = calibrated
    model = OnnxClassifier(path)
    assert (model.temperature, model.threshold) == (temperature, threshold)
    predictions, failures = predict(model, photos, top_k=3, batch_size=5)
    assert not failures
    cal = softmax_ref(logits_of, temperature)
    expected = cal.max(1) < threshold
    assert 0 < expected.sum() < len(photos)  # both kinds, or the test proves nothing
    assert [p.unsure for p in predictions] == expected.tolist()
    assert [p.answer for p in predictions] == ["unsure" if u else model.class_names[int(i)]
                                               for u, i in zip(expected, cal.argmax(1))]
    for p, row in zip(predictions, cal):
        assert p.probs == pytest.approx(np.sort(row)[::-1][:3].tolist(), abs=1e-6)
    header, *rows = list(csv.reader(io.StringIO(format_predictions(predictions, "csv"))))
    assert header == ["path", "label1", "prob1", "label2", "prob2", "label3", "prob3", "answer", "error"]
    assert [r[7] for r in rows] == [p.answer for p in predictions]
    rows = json.loads(format_predictions(predictions, "json"))
    assert [r["unsure"] for r in rows] == expected.tolist() and [r["answer"] for r in rows][0] == predictions[0].answer

    # --raw: the plain softmax shown, the unsure rule unchanged (it reads calibrated confidence)
    raw, _ = predict(model, photos, top_k=3, batch_size=5, raw=True)
    plain = softmax_ref(logits_of)
    for p, row in zip(raw, plain):
        assert p.probs == pytest.approx(np.sort(row)[::-1][:3].tolist(), abs=1e-6)
    assert [p.unsure for p in raw] == expected.tolist()
    assert not np.allclose(plain.max(1), cal.max(1), atol=1e-4)  # the two differ: T really applies
    # --min-confidence: 0 never unsure; another value replaces the stored threshold
    assert not any(p.unsure for p in predict(model, photos, min_confidence=0.0)[0])
    lower = float(np.quantile(cal.max(1), 0.25))
    assert [p.unsure for p in predict(model, photos, min_confidence=lower)[0]] == (cal.max(1) < lower).tolist()


def test_an_unreachable_target_makes_every_answer_unsure(exported: Path, photos, tmp_path: Path):
    path = with_calibration(exported, tmp_path / "m.onnx", {"temperature": 1.0, "selective": {"threshold": None,
                                                                                                "met": False}})
    predictions, _ = predict(OnnxClassifier(path), photos[:4])
    assert all(p.unsure and p.answer == "unsure" for p in predictions)


def test_an_old_model_warns_once_and_is_never_unsure(tiny_onnx: Path, photos, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "dogkit", "predict", *map(str, photos[:4]), "--model",
                           str(tiny_onnx), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("predates calibration") == 1
    rows = json.loads(proc.stdout)
    model = OnnxClassifier(tiny_onnx)
    logits = model.run(np.stack([model.preprocess(read_rgb(p, orientation=True)) for p in photos[:4]]))
    assert [r["unsure"] for r in rows] == [False] * 4
    assert [r["top"][0]["prob"] for r in rows] == pytest.approx(softmax_ref(logits).max(1).tolist(), abs=1e-6)


def test_a_model_without_maps_refuses_explain_in_one_line(tiny_onnx: Path, photos, tmp_path: Path):
    with pytest.raises(DogkitError, match="has no activation maps"):
        predict_inputs([str(photos[0])], tiny_onnx, explain=tmp_path / "x")
    proc = subprocess.run([sys.executable, "-m", "dogkit", "predict", str(photos[0]), "--model", str(tiny_onnx),
                           "--explain", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tiny.onnx has no activation maps" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_overlay_names_keep_folders_apart_and_extensions_where_stems_clash():
    names = overlay_names([Path("/p/a/rex.jpg"), Path("/p/b/rex.jpg"), Path("/p/a/rex.png"), Path("/p/a/fido.jpg"),
                           Path("/p/b/Rex.JPG")])
    assert names == ["a/rex.jpg", "b/rex.jpg-1", "a/rex.png", "a/fido", "b/Rex.JPG-2"]
    assert len({n.casefold() for n in names}) == len(names)
    assert overlay_names([Path("/x/one.jpg")]) == ["one"]
    assert overlay_names([Path("/x/a/one.jpg"), Path("/x/b/two.jpg")]) == ["a/one", "b/two"]
    assert safe_part("blue [/b]") == "blue_b"


def test_explain_writes_the_top_breeds_map_on_each_photo(exported: Path, sample_dir: Path, tmp_path: Path):
    breed = sorted(p for p in (sample_dir / "Images").iterdir() if p.is_dir())[0]
    first, second = sorted(breed.iterdir())[:2]
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b").mkdir()
    shutil.copy(first, tmp_path / "in" / "a" / "rex.jpg")
    shutil.copy(second, tmp_path / "in" / "b" / "rex.jpg")  # the same stem in another folder
    cv2.imwrite(str(tmp_path / "in" / "a" / "rex.png"), cv2.imread(str(second)))  # and beside it
    out = tmp_path / "overlays"
    model = OnnxClassifier(exported)
    _, predictions, _ = predict_inputs([str(tmp_path / "in")], exported, top_k=3, explain=out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert files == ["a/rex.jpg.png", "a/rex.png.png", "b/rex.png"]
    by_input = {Path(p.path).relative_to(tmp_path / "in").as_posix(): p for p in predictions}
    assert by_input["b/rex.jpg"].explain == [str(out / "b" / "rex.png")]
    for rel, p in by_input.items():
        picture_file = Path(p.explain[0])
        assert picture_file.read_bytes()[:8] == PNG_MAGIC
        picture = cv2.cvtColor(cv2.imread(str(picture_file)), cv2.COLOR_BGR2RGB)
        photo = read_rgb(tmp_path / "in" / rel, orientation=model.spec.orients)
        assert picture.shape == photo.shape  # the sample's photos are under the 640-pixel limit: drawn as they are
        # The top breed's map, computed here from the model's cams output, drawn with the breed and probability
        _, cams = model.run_maps(model.preprocess(photo)[None])
        top = model.class_names.index(p.labels[0])
        want = overlay(photo, cams[0, top], model.spec, caption=caption_text(
            ("unsure: " if p.unsure else "") + p.labels[0], p.probs[0]))
        np.testing.assert_array_equal(picture, want)
        other = overlay(photo, cams[0, (top + 1) % len(model.class_names)], model.spec)
        assert np.abs(picture.astype(int) - other).mean() > 0.5
    # --explain-top-k 2: one overlay per breed, named by rank and breed; a rerun writes the same files
    _, again, _ = predict_inputs([str(tmp_path / "in")], exported, top_k=3, explain=out, explain_top_k=2)
    p = next(q for q in again if q.path.endswith("b/rex.jpg"))
    assert p.explain == [str(out / "b" / f"rex.{r + 1}-{safe_part(p.labels[r])}.png") for r in range(2)]
    assert all(Path(f).read_bytes()[:8] == PNG_MAGIC for f in p.explain)
    header = next(csv.reader(io.StringIO(format_predictions(again, "csv"))))
    assert header[-4:] == ["answer", "explain", "explain2", "error"]
    # An --explain folder that holds an input is refused before anything is written
    with pytest.raises(DogkitError, match="holds an input"):
        predict_inputs([str(tmp_path / "in")], exported, explain=tmp_path / "in" / "a" / "..")


def test_eval_reports_calibration_and_localisation(explaining_96, prepared_sample: Path, tmp_path: Path):
    path, temperature, threshold = explaining_96
    result = evaluate("onnx", model=path, data=prepared_sample, out=tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    cal, loc = metrics["calibration"], metrics["localisation"]
    labels, logits = result.labels, result.logits
    model = OnnxClassifier(path)
    dataset = load_dataset(prepared_sample)
    records = dataset.split("test")
    pixels = np.stack([model.preprocess(dataset.load_rgb(r, "none", model.spec.orients)) for r in records])
    direct, cams = model.run_maps(pixels)
    np.testing.assert_allclose(logits, direct, atol=1e-5)
    np.testing.assert_allclose(logits, model.run(pixels), atol=1e-5)  # the maps' pass gives run's logits
    assert cal["temperature"] == temperature
    assert cal["ece_raw"] == pytest.approx(ece_ref(softmax_ref(logits), labels), abs=1e-6)
    assert cal["ece"] == pytest.approx(ece_ref(softmax_ref(logits, temperature), labels), abs=1e-6)
    assert cal["ece"] != pytest.approx(cal["ece_raw"], abs=1e-6)
    conf = softmax_ref(logits, temperature).max(1)
    assert 0 < (conf >= threshold).sum() < len(conf)
    assert cal["selective"]["threshold"] == threshold
    assert cal["selective"]["coverage"] == pytest.approx(float((conf >= threshold).mean()))
    assert cal["selective"]["answered"] == int((conf >= threshold).sum())
    # Localisation: every test photo has a box; energy in boxes of the true class's map, computed here
    assert all(r.boxes and r.orientation in (0, 1) for r in records)
    energies = [energy_ref(cams[i, r.label], r, model.spec.size, model.spec.resize) for i, r in enumerate(records)]
    assert loc["images"] == len(records) == 120
    assert loc["energy_in_boxes"] == pytest.approx(float(np.mean(energies)), abs=2e-3)
    assert 0.05 < loc["energy_in_boxes"] < 0.999 and 0 < loc["baseline"]["energy_in_boxes"] < 1
    assert loc["beats_baseline"] == (loc["energy_in_boxes"] > loc["baseline"]["energy_in_boxes"]
                                     and loc["gt_known_loc"] > loc["baseline"]["gt_known_loc"])
    assert loc["top1_loc"] <= loc["gt_known_loc"]
    skipped = evaluate("onnx", model=path, data=prepared_sample, out=tmp_path / "e2", localise=False)
    assert json.loads((skipped.out_dir / "metrics.json").read_text())["localisation"] == {
        "unavailable": "skipped (--no-localise)"}


def test_eval_on_class_folders_says_why_there_is_no_localisation(exported: Path, sample_dir: Path, tmp_path: Path):
    folder = tmp_path / "photos"
    shutil.copytree(sample_dir / "Images" / "n02085620-Chihuahua", folder / "Chihuahua")
    shutil.copytree(sample_dir / "Images" / "n02110958-pug", folder / "pug")
    result = evaluate("onnx", model=exported, data=folder, out=tmp_path / "eval")
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert "carry no boxes" in metrics["localisation"]["unavailable"]
    assert metrics["calibration"]["images"] == 16
    assert metrics["calibration"]["temperature"] == pytest.approx(OnnxClassifier(exported).temperature)


def test_torch_eval_reads_the_exported_calibration(exported: Path, tiny_run: Path, tmp_path: Path):
    result = evaluate("torch", run=tiny_run, out=tmp_path / "t")
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    model = OnnxClassifier(exported)
    assert metrics["calibration"]["temperature"] == pytest.approx(model.temperature)
    assert metrics["calibration"]["source"] == f"stored in {exported}"
    assert metrics["calibration"]["ece"] == pytest.approx(
        ece_ref(softmax_ref(result.logits, model.temperature), result.labels), abs=1e-6)
    assert metrics["localisation"] == {"unavailable": "measured by the onnx backend"}


def test_explain_and_localisation_never_import_torch(exported: Path, sample_dir: Path, prepared_sample: Path,
                                                     tmp_path: Path):
    def run(*args):
        return subprocess.run([sys.executable, "-c", CLI_WITHOUT_TORCH, *args], capture_output=True, text=True,
                              timeout=300)

    images = sample_dir / "Images" / "n02085620-Chihuahua"
    proc = run("predict", str(images), "--model", str(exported), "--explain", str(tmp_path / "x"), "--out",
               str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    assert len(rows) == 8 and all(Path(r["explain"]).read_bytes()[:8] == PNG_MAGIC for r in rows)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(f.stem + ".png" for f in images.iterdir())
    assert {r["answer"] for r in rows} <= {"unsure", *OnnxClassifier(exported).class_names}
    proc = run("eval", "--backend", "onnx", "--model", str(exported), "--data", str(prepared_sample), "--out",
               str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["localisation"]["images"] == 120 and "ece" in metrics["calibration"]
    assert "localisation (120 images with boxes): energy in boxes" in proc.stderr
    assert "calibration: ECE" in proc.stderr
