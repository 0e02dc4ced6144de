"""Activation maps, calibration and selective prediction: the exported maps against PyTorch's, the numpy maths
against independent reimplementations."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dogkit.calibration import calibrate, ece, fit_temperature, nll, probabilities, risk_coverage, threshold_for
from dogkit.data.annotations import Box
from dogkit.data.images import orient
from dogkit.deploy.evaluate import onnx_logits as split_logits
from dogkit.deploy.explain import normalise, on_photo, overlay, seen_region
from dogkit.deploy.localise import Localisation, centre_prior, energy_inside, iou, map_box, oriented_boxes
from dogkit.deploy.preprocess import PreprocessSpec, eval_transform
from dogkit.deploy.runtime import OnnxClassifier
from dogkit.training.cam import maps_problem
from dogkit.training.checkpoint import load_best
from dogkit.training.models import build_model


def test_exported_maps_equal_maps_computed_in_pytorch(explained: Path, prepared_sample: Path):
    """The ONNX file's maps against maps built in PyTorch another way: torchvision's feature extractor for layer4
    and the head's weights, on the same validation images."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from dogkit.data.dataset import load_dataset

    model, _, _ = load_best(explained.parent)
    onnx_model = OnnxClassifier(explained)
    assert onnx_model.explains
    dataset = load_dataset(prepared_sample)
    images = np.stack([onnx_model.preprocess(dataset.load_rgb(r)) for r in dataset.split("val")[:12]])
    logits, maps = onnx_model.run_maps(images)
    extractor = create_feature_extractor(model.net.eval(), {"layer4": "features"})
    with torch.no_grad():
        x = model.normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
        features = extractor(x)["features"]
        want = torch.einsum("nchw,kc->nkhw", features, model.net.fc.weight).numpy()
        want_logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert maps.shape == (12, len(onnx_model.class_names), 2, 2)
    worst = max(float(np.abs(normalise(want[n, k]) - normalise(maps[n, k])).max())
                for n in range(12) for k in range(maps.shape[1]))
    assert worst <= 1e-4
    # the map is exact: each class's logit is its map's mean plus the head's bias
    rebuilt = maps.mean(axis=(2, 3)) + model.net.fc.bias.detach().numpy()
    np.testing.assert_allclose(rebuilt, logits, atol=1e-4)
    np.testing.assert_allclose(want_logits, logits, atol=1e-3)
    # and the plain path returns the same logits without the maps
    np.testing.assert_allclose(onnx_model.run(images), logits, atol=1e-6)


def test_which_networks_have_exact_maps():
    spec = PreprocessSpec.for_size(64)
    assert maps_problem(build_model("resnet18", 5, spec=spec), 64) is None
    assert maps_problem(build_model("efficientnet_b0", 5, spec=spec), 64) is None
    # mobilenet v3 has two layers after its pooling, densenet pools in its forward, with no module to find
    assert "does not feed the head" in maps_problem(build_model("mobilenet_v3_small", 5, spec=spec), 64)
    assert "global average pooling" in maps_problem(build_model("densenet121", 5, spec=spec), 64)


def test_a_network_without_exact_maps_exports_logits_only_and_says_why(tmp_path: Path):
    from dogkit.training.export import add_metadata, explain_metadata, export_onnx

    spec = PreprocessSpec.for_size(64)
    net = build_model("mobilenet_v3_small", 4, spec=spec).eval()
    record = explain_metadata(net, spec, True)
    assert "does not feed the head" in record["unavailable"]
    path = tmp_path / "model.onnx"
    export_onnx(net, spec, path, maps="output" in record)
    add_metadata(path, {"class_names": list("abcd"), "preprocess": spec.to_json(), "explain": record})
    model = OnnxClassifier(path)
    assert not model.explains
    with pytest.raises(Exception, match="has no activation maps: .*does not feed the head"):
        model.run_maps(np.zeros((1, 64, 64, 3), np.uint8))


def test_export_stores_the_validation_temperature_and_a_threshold_that_meets_its_target(explained: Path,
                                                                                       prepared_sample: Path):
    model = OnnxClassifier(explained)
    stored = model.calibration
    logits, labels, _, _ = split_logits(explained, prepared_sample, "val", 32)
    assert stored["images"] == len(labels) and stored["split"] == "val"
    assert model.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-6)
    assert stored["nll"] <= stored["nll_raw"] + 1e-9  # the fit's objective never gets worse
    cal = model.probabilities(logits)
    conf, correct = cal.max(1), cal.argmax(1) == labels
    sel = stored["selective"]
    if sel["met"]:
        answered = conf >= model.threshold
        assert correct[answered].mean() >= sel["target_precision"]
    else:  # no threshold reaches the target: every answer is unsure
        assert model.threshold == float("inf")
        assert max(correct[conf >= t].mean() for t in np.unique(conf)) < sel["target_precision"]
    assert (cal.argmax(1) == logits.argmax(1)).all()


# ----------------------------------------------------------------------------- calibration, against the definitions


def reference_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s definition, spelled out: bins (lo, hi] of the top-1 probability (the first closed at 0)."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(c > lo or (b == 0 and c >= lo)) and c <= hi for c in conf]
        inside = np.array(inside)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return float(total)


def overconfident(n: int = 600, classes: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) * 4.0
    logits[np.arange(n), labels] += 3.0
    return logits, labels


def test_temperature_is_the_nll_minimum_and_lowers_ece_on_overconfident_logits():
    logits, labels = overconfident()
    t = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    brute = grid[np.argmin([nll(logits, labels, g) for g in grid])]
    assert t == pytest.approx(brute, rel=2e-3)
    assert t > 1.5  # these logits are too sharp
    raw, cal = probabilities(logits), probabilities(logits, t)
    assert ece(raw, labels) == pytest.approx(reference_ece(raw, labels), abs=1e-9)
    assert ece(cal, labels) == pytest.approx(reference_ece(cal, labels), abs=1e-9)
    assert ece(cal, labels) < ece(raw, labels) / 2
    record = calibrate(logits, labels)
    assert record["ece"] < record["ece_raw"] and record["temperature"] == pytest.approx(t)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(1, 50), st.floats(0.05, 20.0), st.integers(0, 2**31))
def test_a_temperature_never_changes_a_top1(classes: int, n: int, t: float, seed: int):
    logits = (np.random.default_rng(seed).normal(size=(n, classes)) * 5).astype(np.float32)
    assert (probabilities(logits, t).argmax(1) == logits.argmax(1)).all()


def test_the_threshold_is_the_lowest_that_reaches_the_target():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, 2000)
    correct = rng.uniform(0, 1, 2000) < conf  # right more often when more confident
    sel = threshold_for(conf, correct, 0.9)
    assert sel["met"]
    answered = conf >= sel["threshold"]
    assert correct[answered].mean() >= 0.9
    assert sel["coverage"] == pytest.approx(answered.mean())
    for lower in conf[conf < sel["threshold"]]:  # every threshold below it misses the target
        assert correct[conf >= lower].mean() < 0.9
    thresholds, coverage, precision = risk_coverage(conf, correct)
    assert (np.diff(coverage) > 0).all() and coverage[-1] == 1.0 and precision[-1] == pytest.approx(correct.mean())
    # a model right on nothing it is most sure of reaches no target
    assert threshold_for(np.array([0.9, 0.8]), np.array([False, True]), 0.95) == {
        "target_precision": 0.95, "images": 2, "threshold": None, "met": False, "precision": None, "coverage": 0.0}


# ----------------------------------------------------------------------------- maps on photos, localisation


@pytest.mark.parametrize("order", ["crop-then-resize", "resize-then-crop"])
@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (257, 256)])
def test_the_seen_region_is_what_eval_transform_feeds_the_model(order: str, shape: tuple[int, int]):
    spec = PreprocessSpec.for_size(64) if order == "crop-then-resize" else PreprocessSpec.from_dict(
        {"size": 64, "resize": 73})
    rng = np.random.default_rng(0)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), (0, 0), 6)
    top, left, rows, cols = seen_region(*shape, spec)
    again = cv2.resize(photo[top: top + rows, left: left + cols], (64, 64), interpolation=cv2.INTER_AREA)
    error = np.abs(again.astype(int) - eval_transform(photo, spec).astype(int)).mean()
    # crop-then-resize: the very pixels; the legacy order resizes first, so the region is its rounded image
    assert error == 0 if order == "crop-then-resize" else error < 0.3


def test_a_map_on_the_photo_covers_the_seen_region_only():
    spec = PreprocessSpec.for_size(64)
    cam = np.array([[0.0, 1.0], [2.0, 4.0]])
    photo_map = on_photo(cam, 300, 500, spec)
    top, left, rows, cols = seen_region(300, 500, spec)
    inside = photo_map[top: top + rows, left: left + cols]
    assert np.isfinite(inside).all() and np.isnan(photo_map).sum() == 300 * 500 - rows * cols
    assert inside.min() == 0.0 and inside.max() == pytest.approx(1.0)
    assert inside[-1, -1] > inside[0, 0]  # the hot corner stays where it was
    picture = overlay(np.full((300, 500, 3), 128, np.uint8), cam, spec, "Basenji 41.0%", max_side=250)
    assert picture.shape == (150, 250, 3) and picture.dtype == np.uint8
    assert (picture[0, :5] == 0).all()  # the caption's black box in the corner


def test_boxes_turn_with_the_photo():
    box = Box(10, 20, 60, 45)
    mask = np.zeros((100, 80), np.uint8)
    mask[20:45, 10:60] = 1
    for tag in range(1, 9):
        turned = orient(mask, tag)
        ys, xs = np.nonzero(turned)
        expected = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert oriented_boxes([box], 80, 100, tag) == [expected]
    rotated = np.rot90(mask, -1)  # orientation 6: turn 90° clockwise
    ys, xs = np.nonzero(rotated)
    assert oriented_boxes([box], 80, 100, 6) == [(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]
    # by hand, in a photo 80 wide and 100 high: 3 turns it 180°, 5 transposes it, 8 turns it 90° anticlockwise
    assert oriented_boxes([box], 80, 100, 3) == [(80 - 60, 100 - 45, 80 - 10, 100 - 20)]
    assert oriented_boxes([box], 80, 100, 5) == [(20, 10, 45, 60)]
    assert oriented_boxes([box], 80, 100, 8) == [(20, 80 - 60, 45, 80 - 10)]


def test_localisation_scores_against_hand_computed_values():
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    heat = np.zeros((100, 100), np.float32)
    heat[30:60, 40:90] = 1.0
    heat[5:8, 5:8] = 0.9  # a smaller second blob: the largest region wins
    assert map_box(heat) == (40, 30, 90, 60)
    assert energy_inside(heat, [(40, 30, 90, 60)]) == pytest.approx(1500 / (1500 + 9 * 0.9))
    spec = PreprocessSpec.for_size(64)
    loc = Localisation()
    # a map that is the dog's box, against the centred prior: the dog sits in the corner
    cam = np.zeros((8, 8), np.float32)
    cam[:3, :3] = 1.0
    photo = on_photo(cam, 256, 256, spec)
    top, left, rows, _ = seen_region(256, 256, spec)
    side = round(rows * 3 / 8)
    loc.add(photo, [(left, top, left + side, top + side)], True, centre_prior(256, 256, spec))
    summary = loc.summary()
    assert summary["gt_known_loc"] == 1.0 and summary["baseline"]["gt_known_loc"] == 0.0
    assert summary["energy_in_boxes"] > 0.8 > summary["baseline"]["energy_in_boxes"]
    assert summary["beats_baseline"] is True


@pytest.mark.parametrize("model_fixture, data_fixture", [("explained", "prepared_sample"),
                                                         ("exported_lite0", "lite0_data")])
def test_the_recipe_consumer_gets_dogkits_probabilities_answer_and_map(model_fixture: str, data_fixture: str,
                                                                       tmp_path: Path, request):
    """docs/deploy.md's recipes (the OpenCV one, then calibrated probabilities, "unsure" and the top-1 map), run as
    written there, against dogkit's runtime and ``on_photo``: on a resnet18 and on a timm EfficientNet-Lite0 (its
    own mean, std and bicubic enlarging)."""
    from mdcode import run_block
    from test_preprocess import RECIPES, opencv_recipe

    from dogkit.data.dataset import load_dataset

    explained = request.getfixturevalue(model_fixture)
    dataset = load_dataset(request.getfixturevalue(data_fixture))
    dogkit_model = OnnxClassifier(explained)
    for i, record in enumerate(dataset.split("val")[:4]):
        recipe = opencv_recipe(explained, dataset.image_path(record), tmp_path / str(i))
        run_block(RECIPES, "cal = json.loads(", recipe)
        h, w, k = recipe["h"], recipe["w"], recipe["k"]
        assert (h, w) == (record.height, record.width) and "heat" in recipe  # the model has maps: the map was made

        pixels = dogkit_model.preprocess(dataset.load_rgb(record))[None]
        assert (pixels == recipe["x"][None]).all()
        ours = dogkit_model.probabilities(dogkit_model.run(pixels))[0]
        np.testing.assert_allclose(recipe["p"], ours, atol=1e-6)
        unsure = ours.max() < dogkit_model.threshold
        assert recipe["answer"] == ("unsure" if unsure else dogkit_model.class_names[int(ours.argmax())])
        _, maps = dogkit_model.run_maps(pixels)
        np.testing.assert_allclose(recipe["heat"], on_photo(maps[0, k], h, w, dogkit_model.spec), atol=1e-5)
