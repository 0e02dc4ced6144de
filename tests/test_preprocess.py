"""The preprocessing contract (dogkit.preprocess): its integer arithmetic, the legacy reading of old specs,
training's resize rules, and the consumers docs/deploy.md writes from the ONNX metadata alone, run as written."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from imagegen import exif_jpeg
from mdcode import run_block

from dogkit.deploy.preprocess import PreprocessSpec, center_square, eval_transform

RECIPES = "docs/deploy.md"  # the preprocessing spec and the consumer recipes this file runs

SPEC = PreprocessSpec.for_size(224)  # resize 256


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_larger_image_is_cropped_in_source_pixels_then_shrunk_with_inter_area():
    image = noise(375, 500)
    # side = 375·224/256 = 328.125 → 328; top = (375 − 328) // 2 = 23, left = (500 − 328) // 2 = 86.
    assert center_square(375, 500, SPEC) == (23, 86, 328)
    expected = cv2.resize(np.ascontiguousarray(image[23:351, 86:414]), (224, 224), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(eval_transform(image, SPEC), expected)
    linear = cv2.resize(np.ascontiguousarray(image[23:351, 86:414]), (224, 224), interpolation=cv2.INTER_LINEAR)
    assert np.abs(linear.astype(int) - expected).max() > 10  # the rule matters on noise


def test_smaller_image_rounds_half_up_and_enlarges_with_inter_linear():
    image = noise(12, 20)
    # 12·224/256 = 10.5 → 11 (half up; Python's round would give 10); top = 0, left = 4.
    assert center_square(12, 20, SPEC) == (0, 4, 11)
    expected = cv2.resize(np.ascontiguousarray(image[0:11, 4:15]), (224, 224), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(eval_transform(image, SPEC), expected)
    # Exactly the output size: no resampling at all.
    square = noise(256, 300)
    np.testing.assert_array_equal(eval_transform(square, SPEC), square[16:240, 38:262])


def test_a_one_pixel_high_panorama_costs_memory_of_the_output_size():
    image = np.full((1, 1_000_000, 3), 7, np.uint8)
    tracemalloc.start()
    out = eval_transform(image, SPEC)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (224, 224, 3) and (out == 7).all()
    assert peak < 4 * 224 * 224 * 3  # resizing first would need 256 × 256,000,000 × 3 bytes


def test_the_spec_names_every_rule_and_refuses_rules_it_does_not_implement():
    saved = json.loads(SPEC.to_json())
    assert {k: saved[k] for k in ("interpolation", "interpolation_up", "order", "side_rounding", "offset_rounding",
                                  "exif_orientation", "channel_order", "layout", "input_dtype")} == {
        "interpolation": "area", "interpolation_up": "linear", "order": "crop-then-resize",
        "side_rounding": "half-up", "offset_rounding": "floor", "exif_orientation": "apply",
        "channel_order": "RGB", "layout": "NHWC", "input_dtype": "uint8"}
    assert "alpha composited over white" in saved["decode"] and "high byte" in saved["decode"]
    assert PreprocessSpec.from_json(SPEC.to_json()) == SPEC
    # A spec saved before the rule existed says "ignore" and keeps it; both are implemented, nothing else is.
    assert not PreprocessSpec.from_dict({**saved, "exif_orientation": "ignore"}).orients and SPEC.orients
    for key, value in (("exif_orientation", "rotate"), ("channel_order", "BGR"), ("order", "pad"),
                       ("decode", "premultiplied alpha")):
        with pytest.raises(ValueError, match=key):
            PreprocessSpec.from_dict({**saved, key: value})


def test_specs_saved_before_the_rules_existed_keep_their_transform():
    old = {"size": 32, "resize": 37, "interpolation": "area", "crop": "center", "box_crop": "none",
           "channel_order": "RGB", "input_dtype": "uint8", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    spec = PreprocessSpec.from_dict(old)
    assert spec.order == "resize-then-crop" and spec.interpolation_up == "linear"
    image = noise(60, 90)
    # The old arithmetic: shorter side to 37 (90·37/60 = 55.5 → 56 by Python's round), INTER_AREA, centre crop.
    resized = cv2.resize(image, (56, 37), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(eval_transform(image, spec), resized[2:34, 12:44])


def test_training_crops_are_resized_by_the_same_rules_as_evaluation():
    from dogkit.training.transforms import train_augment

    spec = PreprocessSpec.for_size(32)
    image = noise(120, 160)
    for strength in ("light", "strong"):
        crop_op = train_augment(spec, strength).transforms[0]
        big = crop_op.apply(image, crop_coords=(10, 20, 90, 100))  # 80×80 → 32×32: shrinking
        np.testing.assert_array_equal(big, cv2.resize(image[20:100, 10:90], (32, 32), interpolation=cv2.INTER_AREA))
        small = crop_op.apply(image, crop_coords=(0, 0, 20, 20))  # 20×20 → 32×32: enlarging
        np.testing.assert_array_equal(small, cv2.resize(image[:20, :20], (32, 32), interpolation=cv2.INTER_LINEAR))
        # The same square crop, resized by the evaluation transform's rules, is the same pixels.
        square = np.ascontiguousarray(image[20:100, 10:90])
        top, left, side = center_square(80, 80, dataclasses.replace(spec, resize=32))
        assert (top, left, side) == (0, 0, 80)
        np.testing.assert_array_equal(big, eval_transform(square, dataclasses.replace(spec, resize=32)))


# ------------------------------------------------------------------------- a consumer from the metadata alone


def opencv_recipe(model_path: Path, photo: Path, workdir: Path) -> dict:
    """docs/deploy.md's OpenCV recipe run as written, in ``workdir`` beside a ``model.onnx`` (``model_path``) and a
    ``dog.jpg`` (a copy of ``photo``): the names it defined (``dogkit_input``, ``session``, ``spec``, ``logits``, …)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "model.onnx").symlink_to(model_path.resolve())
    shutil.copyfile(photo, workdir / "dog.jpg")
    return run_block(RECIPES, "def dogkit_input(", {}, cwd=workdir)


def consumer_top1(model_path: Path, files: list[Path], workdir: Path) -> tuple[list[str], np.ndarray]:
    """What a C++/JS/mobile author writes from the ONNX metadata and docs/deploy.md alone: its OpenCV recipe, as
    written there, on every file."""
    recipe = opencv_recipe(model_path, files[0], workdir)
    spec, session, classes = recipe["spec"], recipe["session"], recipe["classes"]
    assert (spec["order"], spec["channel_order"], spec["layout"], spec["input_dtype"], spec["side_rounding"],
            spec["offset_rounding"]) == ("crop-then-resize", "RGB", "NHWC", "uint8", "half-up", "floor")
    x = np.stack([recipe["dogkit_input"](f, spec)[0] for f in files])
    logits, = session.run(["logits"], {session.get_inputs()[0].name: x})
    np.testing.assert_array_equal(recipe["logits"][0], logits[0])  # the recipe's own run on dog.jpg
    return [classes[i] for i in logits.argmax(1)], x


def pillow_recipe() -> dict:
    """docs/deploy.md's consumer without OpenCV (Pillow to decode, numpy to crop and shrink), as written there."""
    return run_block(RECIPES, "def dogkit_input_pillow(", {})


@pytest.mark.parametrize("model_fixture", ["exported", "exported_lite0"])  # enlarging: INTER_LINEAR, INTER_CUBIC
def test_a_consumer_written_from_the_metadata_agrees_with_dogkit_predict(model_fixture: str, sample_dir: Path,
                                                                         tmp_path: Path, request):
    from dogkit.data.images import read_rgb
    from dogkit.deploy.predict import predict
    from dogkit.deploy.runtime import OnnxClassifier

    exported = request.getfixturevalue(model_fixture)
    model = OnnxClassifier(exported)
    assert model.spec.order == "crop-then-resize"
    size = model.spec.size
    sources = sorted((sample_dir / "Images").rglob("*.jpg"))[::24][:20]
    files = []
    for i, src in enumerate(sources):
        rgb = read_rgb(src)
        files.append(src)  # larger than the resize target
        small = cv2.resize(rgb, (size * 2 // 3 + i % 5, size // 2 + i % 7), interpolation=cv2.INTER_AREA)
        path = tmp_path / f"small{i}.png"
        cv2.imwrite(str(path), small[:, :, ::-1])
        files.append(path)  # smaller than it: enlarged
        path = tmp_path / f"exif{i}.jpg"
        path.write_bytes(exif_jpeg(rgb, (6, 8, 3)[i % 3]))
        files.append(path)  # with an EXIF rotation that the spec says to apply
    # The decode rules docs/deploy.md spells out: alpha over white, 16-bit's high byte, grey replicated.
    rgb = read_rgb(sources[0])
    alpha = np.dstack([rgb[:, :, ::-1], np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (len(rgb), 1))])
    cv2.imwrite(str(tmp_path / "alpha.png"), alpha)
    cv2.imwrite(str(tmp_path / "deep.png"), rgb[:, :, ::-1].astype(np.uint16) * 257 + 100)
    cv2.imwrite(str(tmp_path / "grey.png"), rgb[:, :, 1])
    grey16 = rgb[:, :, 1].astype(np.uint16) * 256 + 128  # a 16-bit grey PNG: high byte = the 8-bit grey
    cv2.imwrite(str(tmp_path / "grey16.png"), grey16)
    files += [tmp_path / "alpha.png", tmp_path / "deep.png", tmp_path / "grey.png", tmp_path / "grey16.png"]
    # Not vacuous: the tag turns the photo, and the model is given it upright.
    assert model.spec.orients
    stored, upright = read_rgb(tmp_path / "exif0.jpg"), read_rgb(tmp_path / "exif0.jpg", orientation=True)
    assert stored.shape[0] != stored.shape[1] and upright.shape[:2] == stored.shape[1::-1]  # rotated 90°
    np.testing.assert_array_equal(upright, np.rot90(stored, -1))  # orientation 6: 90° clockwise

    labels, pixels = consumer_top1(exported, files, tmp_path / "consumer")
    predictions, failures = predict(model, files, top_k=1)
    assert not failures and len(predictions) == len(files) == 64
    assert [p.labels[0] for p in predictions] == labels  # 100 % top-1 agreement
    for f, x in zip(files, pixels):  # and the very same input pixels
        np.testing.assert_array_equal(x, model.preprocess(read_rgb(f, check=True, orientation=True)))
    # Without OpenCV: Pillow and the numpy area resize give the same pixels, within one level.
    spec = json.loads(model.metadata["dogkit.preprocess"])
    pillow = pillow_recipe()
    worst = [int(np.abs(pillow["dogkit_input_pillow"](f, spec).astype(int) - x.astype(int)).max()) for f, x in
             zip(files, pixels)]
    assert max(worst) <= 1 and sum(worst) < len(files), worst  # exact on most, one level on some enlarged ones
    # The 16-bit grey PNG is the high byte replicated (Pillow's own convert("RGB") would clip it to white).
    np.testing.assert_array_equal(pillow["decode_rgb_pillow"](tmp_path / "grey16.png", spec),
                                  np.dstack([rgb[:, :, 1]] * 3))


def test_the_pillow_recipe_shrinks_as_inter_area_does(tmp_path: Path):
    """docs/deploy.md's Pillow recipe on a photo-sized PNG and a large one, against dogkit's transform (INTER_AREA).
    (Its speed is a benchmark's business: the numpy resize it had before took 73–95 s on a photo.)"""
    pillow = pillow_recipe()
    spec = json.loads(SPEC.to_json())
    for h, w in ((375, 500), (1500, 2000)):
        image = noise(h, w, seed=h)
        cv2.imwrite(str(tmp_path / "photo.png"), image[:, :, ::-1])
        ours = pillow["dogkit_input_pillow"](tmp_path / "photo.png", spec)
        diff = np.abs(ours.astype(int) - eval_transform(image, SPEC))
        assert ours.shape == (224, 224, 3) and diff.max() <= 1 and (diff > 0).mean() < 0.002, (h, diff.max())


def test_predict_warns_when_a_box_crop_model_gets_whole_photos(exported: Path, sample_dir: Path, capsys):
    from dogkit.deploy.predict import predict
    from dogkit.deploy.runtime import OnnxClassifier

    model = OnnxClassifier(exported)
    files = sorted((sample_dir / "Images").rglob("*.jpg"))[:2]
    predict(model, files, top_k=1)
    assert "box crops" not in capsys.readouterr().err
    model.spec = dataclasses.replace(model.spec, box_crop="boxes")
    predict(model, files, top_k=1)
    assert capsys.readouterr().err.count("trained on the dogs' box crops") == 1



def test_folder_eval_warns_when_a_box_crop_model_gets_whole_photos(sample_dir: Path, tmp_path: Path, capsys):
    import shutil

    from dogkit.deploy.evaluate import load_eval_data

    folder = tmp_path / "photos"
    shutil.copytree(sample_dir / "Images" / "n02085620-Chihuahua", folder / "Chihuahua")
    shutil.copytree(sample_dir / "Images" / "n02110958-pug", folder / "pug")
    names = ["Chihuahua", "pug"]
    _, records, _ = load_eval_data(folder, "test", names, "none")
    assert len(records) == 16 and "box crops" not in capsys.readouterr().err
    load_eval_data(folder, "test", names, "boxes")
    assert capsys.readouterr().err.count("trained on the dogs' box crops") == 1
