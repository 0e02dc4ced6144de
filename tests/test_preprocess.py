"""The preprocessing contract (dogkit.preprocess): its integer arithmetic, the legacy reading of old specs,
training's resize rules, and a consumer written from the ONNX metadata and the README alone."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from imagegen import exif_jpeg

from dogkit.deploy.preprocess import PreprocessSpec, center_square, eval_transform

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


def consumer_top1(model_path: Path, files: list[Path]) -> tuple[list[str], np.ndarray]:
    """What a C++/JS/mobile author writes from the ONNX metadata and the README's "Preprocessing spec" alone:
    the README's OpenCV recipe, line for line."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    spec, classes = json.loads(meta["dogkit.preprocess"]), json.loads(meta["dogkit.class_names"])
    assert (spec["order"], spec["channel_order"], spec["layout"], spec["input_dtype"], spec["side_rounding"],
            spec["offset_rounding"]) == ("crop-then-resize", "RGB", "NHWC", "uint8", "half-up", "floor")
    batch = []
    for f in files:
        data = np.fromfile(f, np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if img.dtype == np.uint8 and (img.ndim == 2 or img.shape[2] == 3):
            turn = spec["exif_orientation"] == "apply"
            img = cv2.imdecode(data, cv2.IMREAD_COLOR | (0 if turn else cv2.IMREAD_IGNORE_ORIENTATION))
        else:
            if img.dtype == np.uint16:
                img = (img >> 8).astype(np.uint8)
            if img.ndim == 2:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            elif img.shape[2] == 4:
                a = img[:, :, 3:].astype(np.float32) / 255
                img = (img[:, :, :3] * a + 255 * (1 - a) + 0.5).astype(np.uint8)
        rgb = img[:, :, ::-1]
        h, w = rgb.shape[:2]
        size, resize = spec["size"], spec["resize"]
        side = max(1, (2 * min(h, w) * size + resize) // (2 * resize))
        top, left = (h - side) // 2, (w - side) // 2
        crop = np.ascontiguousarray(rgb[top:top + side, left:left + side])
        if side != size:
            up = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}[spec["interpolation_up"]]
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if side > size else up)
        batch.append(crop)
    x = np.stack(batch)
    logits, = session.run(["logits"], {session.get_inputs()[0].name: x})
    return [classes[i] for i in logits.argmax(1)], x


def area_weights(n_in: int, n_out: int) -> np.ndarray:  # the README's numpy area resize
    s = n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        a, b = i * s, (i + 1) * s
        for j in range(int(a), min(n_in, int(np.ceil(b)))):
            w[i, j] = max(0.0, min(b, j + 1) - max(a, j)) / s
    return w


def cubic_weights(n_in: int, n_out: int) -> np.ndarray:  # the README's numpy INTER_CUBIC (enlarging)
    s = n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * s - 0.5  # half-pixel centres
        for j in range(int(np.floor(x)) - 1, int(np.floor(x)) + 3):
            d = abs(x - j)  # Keys' kernel, a = -0.75; taps past the border repeat the edge pixel
            k = 1.25 * d ** 3 - 2.25 * d ** 2 + 1 if d <= 1 else -0.75 * d ** 3 + 3.75 * d ** 2 - 6 * d + 3
            w[i, min(max(j, 0), n_in - 1)] += k
    return w


def pillow_consumer_pixels(spec: dict, path: Path) -> np.ndarray:
    """The README's consumer without OpenCV: Pillow to decode, numpy to crop and shrink."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im) if spec["exif_orientation"] == "apply" else im
        if im.mode == "RGBA":
            arr = np.asarray(im).astype(np.float32)
            a = arr[:, :, 3:] / 255
            rgb = (arr[:, :, :3] * a + 255 * (1 - a) + 0.5).astype(np.uint8)
        else:
            rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    size, resize = spec["size"], spec["resize"]
    side = max(1, (2 * min(h, w) * size + resize) // (2 * resize))
    top, left = (h - side) // 2, (w - side) // 2
    crop = rgb[top:top + side, left:left + side]
    if side > size:
        weights = area_weights(side, size)
        return np.floor(np.einsum("ij,jkc,lk->ilc", weights, crop.astype(np.float64), weights) + 0.5).astype(np.uint8)
    if side < size and spec["interpolation_up"] == "cubic":
        weights = cubic_weights(side, size)
        x = np.einsum("ij,jkc,lk->ilc", weights, crop.astype(np.float64), weights)
        return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)
    if side < size:
        return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
    return crop


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
    # The decode rules the README spells out: alpha over white, 16-bit's high byte, grey replicated.
    rgb = read_rgb(sources[0])
    alpha = np.dstack([rgb[:, :, ::-1], np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (len(rgb), 1))])
    cv2.imwrite(str(tmp_path / "alpha.png"), alpha)
    cv2.imwrite(str(tmp_path / "deep.png"), rgb[:, :, ::-1].astype(np.uint16) * 257 + 100)
    cv2.imwrite(str(tmp_path / "grey.png"), rgb[:, :, 1])
    files += [tmp_path / "alpha.png", tmp_path / "deep.png", tmp_path / "grey.png"]
    # Not vacuous: the tag turns the photo, and the model is given it upright.
    assert model.spec.orients
    stored, upright = read_rgb(tmp_path / "exif0.jpg"), read_rgb(tmp_path / "exif0.jpg", orientation=True)
    assert stored.shape[0] != stored.shape[1] and upright.shape[:2] == stored.shape[1::-1]  # rotated 90°
    np.testing.assert_array_equal(upright, np.rot90(stored, -1))  # orientation 6: 90° clockwise

    labels, pixels = consumer_top1(exported, files)
    predictions, failures = predict(model, files, top_k=1)
    assert not failures and len(predictions) == len(files) == 63
    assert [p.labels[0] for p in predictions] == labels  # 100 % top-1 agreement
    for f, x in zip(files, pixels):  # and the very same input pixels
        np.testing.assert_array_equal(x, model.preprocess(read_rgb(f, check=True, orientation=True)))
    # Without OpenCV: Pillow and the numpy area resize give the same pixels, within one level.
    spec = json.loads(model.metadata["dogkit.preprocess"])
    worst = [int(np.abs(pillow_consumer_pixels(spec, f).astype(int) - x.astype(int)).max()) for f, x in
             zip(files, pixels)]
    assert max(worst) <= 1 and sum(worst) < len(files), worst  # exact on most, one level on some enlarged ones


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
