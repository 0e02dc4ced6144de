"""``dogkit serve``: every endpoint and error status through httpx against the app, dynamic batching counted,
answers identical to ``dogkit predict``, graceful shutdown (in the app and in a real process on SIGTERM),
no PyTorch, and the page in a real headless Chromium."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from torchless import CLI_WITHOUT_TORCH

from dogkit.data.images import read_rgb
from dogkit.deploy.predict import predict
from dogkit.deploy.runtime import OnnxClassifier
from dogkit.deploy.serve import ServeConfig, create_app, listen, serve
from dogkit.errors import DogkitError
from tests.imagegen import exif_jpeg, png_of_zeros

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "artifacts" / "test-screenshots"  # ignored by git; CI keeps it as an artifact
CHROMIUM = Path(os.environ.get("DOGKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def model(exported: Path) -> OnnxClassifier:
    return OnnxClassifier(exported)


@pytest.fixture(scope="module")
def photos(sample_dir: Path) -> list[Path]:
    """The first photo of each of 12 breeds of the real sample."""
    folders = sorted(p for p in (sample_dir / "Images").iterdir() if p.is_dir())[:12]
    return [sorted(f.iterdir())[0] for f in folders]


@contextlib.asynccontextmanager
async def client(app):
    """The app with its lifespan running (batcher, decode pool), behind an in-process httpx client."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dogkit.test") as c:
            yield c


def run(coro):
    return asyncio.run(coro)


def claims_pixels(width: int, height: int) -> bytes:
    """The start of a PNG whose header claims width × height: refused before any decoding."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))


def files_form(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def slowed(model_path: Path, seconds: float) -> OnnxClassifier:
    """A classifier whose every call takes ``seconds`` longer: time for requests to pile up."""
    slow = OnnxClassifier(model_path)
    real = slow.run

    def run_slowly(batch):
        time.sleep(seconds)
        return real(batch)

    slow.run = run_slowly
    return slow


# ----------------------------------------------------------------------------- answers


def test_answers_are_identical_to_dogkit_predict(model: OnnxClassifier, photos: list[Path]):
    expected, failures = predict(model, photos, top_k=5)
    unscaled, _ = predict(model, photos, top_k=5, raw=True)
    assert not failures

    async def go():
        async with client(create_app(model)) as c:
            first = await c.post("/predict", files=files_form(photos[:8]))
            second = await c.post("/predict?top_k=5", files=files_form(photos[8:]))
            raw = await c.post("/predict", content=photos[0].read_bytes(), headers={"content-type": "image/jpeg"})
            plain = await c.post("/predict?raw=1", files=files_form(photos))
            return first, second, raw, plain

    first, second, raw, plain = run(go())
    assert first.status_code == second.status_code == raw.status_code == plain.status_code == 200
    results = first.json()["results"] + second.json()["results"]
    assert [r["file"] for r in results] == [p.name for p in photos]
    assert model.temperature != 1.0  # calibrated and raw differ, so each comparison below can fail
    for want, got in zip(expected, results):  # calibrated, with predict's verdict
        assert [t["label"] for t in got["top"]] == want.labels
        assert [t["prob"] for t in got["top"]] == pytest.approx(want.probs, abs=1e-6)
        assert (got["answer"], got["unsure"]) == (want.answer, want.unsure)
    for want, got in zip(unscaled, plain.json()["results"]):  # raw=1 is predict --raw
        assert [t["label"] for t in got["top"]] == want.labels
        assert [t["prob"] for t in got["top"]] == pytest.approx(want.probs, abs=1e-6)
        assert (got["answer"], got["unsure"]) == (want.answer, want.unsure)
    assert expected[0].probs[0] != pytest.approx(unscaled[0].probs[0], abs=1e-6)
    assert raw.json()["results"] == [{**results[0], "file": None}]


def test_top_k_and_per_image_reasons(model: OnnxClassifier, photos: list[Path]):
    truncated = photos[1].read_bytes()[:3000]
    huge = png_of_zeros(9000, 9000)  # a real 81 Mpx PNG, above the 50 Mpx default: refused from its header

    async def go():
        async with client(create_app(model)) as c:
            form = [*files_form(photos[:1]), ("files", ("notes.txt", b"hello", "text/plain")),
                    ("files", ("cut.jpg", truncated, "image/jpeg")), ("files", ("huge.png", huge, "image/png")),
                    ("files", ("empty.jpg", b"", "image/jpeg")), ("comment", (None, b"ignored"))]
            return await c.post("/predict?top_k=3", files=form)

    response = run(go())
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["file"] for r in results] == [photos[0].name, "notes.txt", "cut.jpg", "huge.png", "empty.jpg"]
    assert len(results[0]["top"]) == 3 and results[0]["top"][0]["prob"] >= results[0]["top"][2]["prob"]
    assert results[1]["error"] == "not an image (unrecognised file format)"
    assert results[2]["error"] == "truncated JPEG (no end-of-image marker)"
    assert results[3]["error"].startswith("too many pixels: 9000×9000")
    assert results[4]["error"] == "empty file"


def test_model_health_and_page(model: OnnxClassifier, exported: Path, tmp_path: Path):
    from dogkit.training.export import copy_metadata

    async def go(m: OnnxClassifier):
        async with client(create_app(m)) as c:
            return await c.get("/model"), await c.get("/health"), await c.get("/")

    card, health, page = run(go(model))
    assert card.status_code == 200
    body = card.json()
    assert body["classes"] == model.class_names and body["num_classes"] == len(model.class_names)
    assert body["precision"] == "fp32" and body["arch"] == "resnet18"
    assert body["preprocess"]["size"] == model.spec.size == 32
    assert body["val_metrics"]["accuracy"] == model.info("val_metrics")["accuracy"]
    assert body["dogkit_version"] == model.info("dogkit_version")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model_calls"] == 0
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="files"' in page.text and 'type="file"' in page.text
    # Served whole by dogkit: no external scripts, styles or fonts.
    assert "http://" not in page.text and "https://" not in page.text and " src=" not in page.text

    quantized = tmp_path / "model.int8.onnx"
    shutil.copy(exported, quantized)
    copy_metadata(exported, quantized, {"quantization": "static int8 QDQ"})
    card, _, _ = run(go(OnnxClassifier(quantized)))
    assert card.json()["precision"] == "int8" and card.json()["precision_detail"] == "static int8 QDQ"


# ----------------------------------------------------------------------------- calibrated answers and maps

MAP_SIDE = 8  # the explainable test model's maps: 64 px in, 8 × 8 cells out
COLOURS = ["red", "green", "blue [/b]"]


def explainable_onnx(path: Path, *, temperature: float | None = 2.0, threshold: float | None | str = 0.5,
                     maps: bool = True) -> Path:
    """A 3-class ONNX model shaped like an explainable dogkit export, made with onnx.helper: F is the photo's mean
    colour over 8 × 8 px cells (N × 3 × 8 × 8), ``cams[k] = Σ_c W[k, c] F[c]`` (W: a colour's excess over the
    others), ``logits = mean(cams) + b``. Its maps have structure (where the colour is), unlike a 32 px resnet18's
    1 × 1 ones. ``threshold``: a number, None (none reached the target) or "absent" (no selective entry)."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper

    from dogkit.deploy.preprocess import PreprocessSpec

    w = ((np.eye(3) - 1 / 3) / 8).astype(np.float32)
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2]),
             helper.make_node("AveragePool", ["x"], ["F"], kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Einsum", ["F", "w"], ["cams"], equation="nchw,kc->nkhw"),
             helper.make_node("ReduceMean", ["cams", "axes"], ["m"], keepdims=0),
             helper.make_node("Add", ["m", "b"], ["logits"])]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [3, 3], w.ravel().tolist()),
             helper.make_tensor("b", TensorProto.FLOAT, [3], [0.2, 0.0, -0.1]),
             helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])]
    if maps:
        outputs.append(helper.make_tensor_value_info("cams", TensorProto.FLOAT, ["n", 3, MAP_SIDE, MAP_SIDE]))
    graph = helper.make_graph(nodes, "colours", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                                              ["n", 64, 64, 3])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = {"class_names": json.dumps(COLOURS), "preprocess": PreprocessSpec.for_size(64).to_json(),
            "explain": json.dumps({"output": "cams"} if maps else {"unavailable": "exported with --no-explain"})}
    if temperature is not None:
        calibration: dict = {"temperature": temperature}
        if threshold != "absent":
            calibration["selective"] = {"threshold": threshold, "met": threshold is not None}
        meta["calibration"] = json.dumps(calibration)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = "dogkit." + key, value
    onnx.save(model, str(path))
    return path


def direct(model_path: Path, photo_bytes: bytes, temperature: float):
    """What the file says about one photo, recomputed without dogkit's runtime or server: ONNX Runtime on
    eval_transform's input; (calibrated probabilities, cams, the oriented photo's (height, width))."""
    import numpy as np
    import onnxruntime as ort

    from dogkit.data.images import rgb_from_bytes
    from dogkit.deploy.preprocess import PreprocessSpec, eval_transform

    spec = PreprocessSpec.for_size(64)
    rgb = rgb_from_bytes(photo_bytes, orientation=True)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits, cams = session.run(["logits", "cams"], {"images": eval_transform(rgb, spec)[None]})
    z = logits[0].astype(np.float64) / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    return probs, cams[0], rgb.shape[:2]


def test_explain_returns_the_top1_map_onnxruntime_computes(photos: list[Path], tmp_path: Path):
    import cv2
    import numpy as np

    from dogkit.deploy.explain import normalise, seen_region
    from dogkit.deploy.preprocess import PreprocessSpec

    path = explainable_onnx(tmp_path / "colours.onnx")
    upright = exif_jpeg(read_rgb(photos[3]), 6)  # stored landscape, shown (and seen) portrait
    uploads = [photos[0].read_bytes(), photos[5].read_bytes(), upright]
    form = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(uploads)]

    async def go():
        async with client(create_app(OnnxClassifier(path))) as c:
            return await c.post("/predict?explain=1&top_k=3", files=form), await c.post("/predict", files=form[:1])

    answer, plain = run(go())
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert "map" not in plain.json()["results"][0]  # maps only when asked
    assert {(r["map"]["photo"]["width"], r["map"]["photo"]["height"]) for r in results[2:]} == {
        (read_rgb(photos[3]).shape[0], read_rgb(photos[3]).shape[1])}  # the upright photo's size, not the stored
    for data, result in zip(uploads, results):
        probs, cams, (height, width) = direct(path, data, 2.0)
        top1 = int(np.argmax(probs))
        m = result["map"]
        assert m["breed"] == result["top"][0]["label"] == COLOURS[top1]
        want = normalise(cams[top1])
        grid = np.array(m["grid"])
        assert grid.shape == (MAP_SIDE, MAP_SIDE) and want.max() == 1.0 and want.min() == 0.0
        assert np.abs(grid - want).max() <= 5e-4 + 1e-6  # rounded to 3 decimals
        assert not np.allclose(grid, normalise(cams[(top1 + 1) % 3]), atol=0.05)  # it is this class's map
        top, left, rows, cols = seen_region(height, width, PreprocessSpec.for_size(64))
        assert m["region"] == {"top": top, "left": left, "height": rows, "width": cols}
        assert m["photo"] == {"width": width, "height": height}
        assert 0 < rows <= height and 0 < cols <= width and (top > 0 or left > 0)
        png = cv2.imdecode(np.frombuffer(base64.b64decode(m["png"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert png.shape == (MAP_SIDE, MAP_SIDE) and png.dtype == np.uint8
        assert np.abs(png.astype(int) - np.round(want * 255)).max() <= 1


def test_explain_on_a_real_export_gives_its_own_map(explained: Path, photos: list[Path]):
    """A real resnet18 export with maps (64 px: 2 × 2 cells): the grid is its top-1 map as ONNX Runtime computes it
    straight from the file, over the region its spec gives."""
    import numpy as np
    import onnxruntime as ort

    from dogkit.deploy.explain import normalise, seen_region

    model = OnnxClassifier(explained)
    session = ort.InferenceSession(str(explained), providers=["CPUExecutionProvider"])

    async def go():
        async with client(create_app(model)) as c:
            return await c.post("/predict?explain=1", files=files_form(photos[:4]))

    results = run(go()).json()["results"]
    for photo, result in zip(photos, results):
        image = read_rgb(photo, orientation=True)
        logits, cams = session.run(["logits", "cams"], {session.get_inputs()[0].name: model.preprocess(image)[None]})
        top1 = int(np.argmax(logits[0]))
        m = result["map"]
        assert m["breed"] == result["top"][0]["label"] == model.class_names[top1]
        want = normalise(cams[0, top1])
        assert want.shape == (2, 2) and want.max() == 1.0
        assert np.abs(np.array(m["grid"]) - want).max() <= 5e-4 + 1e-6
        top, left, rows, cols = seen_region(*image.shape[:2], model.spec)
        assert m["region"] == {"top": top, "left": left, "height": rows, "width": cols}


def test_unsure_exactly_below_the_threshold(photos: list[Path], tmp_path: Path):
    import numpy as np

    uploads = [p.read_bytes() for p in photos]
    measured = [direct(explainable_onnx(tmp_path / "probe.onnx"), data, 2.0)[0] for data in uploads]
    confidence = np.array([p.max() for p in measured])
    threshold = float(np.median(confidence))
    assert confidence.min() < threshold < confidence.max()  # some sure, some not: the test can tell
    path = explainable_onnx(tmp_path / "colours.onnx", threshold=threshold)
    form = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(uploads)]

    async def go(model_path: Path, *queries: str):
        async with client(create_app(OnnxClassifier(model_path))) as c:
            out = [(await c.post("/predict" + q, files=form)).json() for q in queries]
            return out, (await c.get("/health")).json(), (await c.get("/model")).json()

    override = float(np.quantile(confidence, 0.25))
    (default, raw, low, none, every), health, card = run(go(
        path, "", "?raw=1", f"?min_confidence={override:.4f}", "?min_confidence=0", "?min_confidence=1"))
    assert default["calibrated"] is True and raw["calibrated"] is False
    assert default["threshold"] == pytest.approx(threshold) and default["threshold_source"] == "model"
    assert default["temperature"] == 2.0
    for probs, result in zip(measured, default["results"]):
        assert result["unsure"] == (float(probs.max()) < threshold)
        assert result["answer"] == ("unsure" if result["unsure"] else COLOURS[int(np.argmax(probs))])
        assert result["confidence"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert [t["prob"] for t in result["top"]] == pytest.approx(sorted(probs, reverse=True), abs=1e-6)
    assert 0 < sum(r["unsure"] for r in default["results"]) < len(photos)
    # raw=1: the softmax at temperature 1 in "top"; unsure still judged on calibrated confidence
    for data, result, calibrated in zip(uploads, raw["results"], default["results"]):
        unscaled = direct(path, data, 1.0)[0]
        assert [t["prob"] for t in result["top"]] == pytest.approx(sorted(unscaled, reverse=True), abs=1e-6)
        assert result["top"][0]["prob"] > calibrated["top"][0]["prob"]  # T = 2 softens
        assert (result["unsure"], result["confidence"]) == (calibrated["unsure"], calibrated["confidence"])
    assert low["threshold_source"] == "min_confidence" and low["threshold"] == pytest.approx(override, abs=1e-4)
    assert [r["unsure"] for r in low["results"]] == [bool(c < float(f"{override:.4f}")) for c in confidence]
    assert 0 < sum(r["unsure"] for r in low["results"]) < sum(r["unsure"] for r in default["results"])
    assert not any(r["unsure"] for r in none["results"])
    assert all(r["unsure"] and r["answer"] == "unsure" for r in every["results"])
    assert all(r["top"] for r in every["results"])  # the breeds are still listed when unsure
    for info in (health, card):
        assert (info["temperature"], info["threshold"], info["threshold_source"], info["maps"]) == (
            2.0, pytest.approx(threshold), "model", True)

    # No target precision reached at export: every answer is unsure; no selective entry (older export): none is.
    (unreachable,), health, _ = run(go(explainable_onnx(tmp_path / "u.onnx", threshold=None), ""))
    assert unreachable["threshold"] is None and unreachable["threshold_source"] == "unreachable"
    assert all(r["unsure"] for r in unreachable["results"]) and health["threshold_source"] == "unreachable"
    (old,), health, _ = run(go(explainable_onnx(tmp_path / "o.onnx", temperature=None), ""))
    assert old["threshold"] is None and old["threshold_source"] == "none" and old["temperature"] == 1.0
    assert not any(r["unsure"] for r in old["results"])
    assert [r["answer"] for r in old["results"]] == [r["top"][0]["label"] for r in old["results"]]


def test_bad_explain_parameters_and_models_without_maps(photos: list[Path], tiny_onnx: Path, tmp_path: Path):
    jpeg = photos[0].read_bytes()
    no_maps = explainable_onnx(tmp_path / "no-maps.onnx", maps=False)

    async def go(model_path: Path, queries: list[str]):
        async with client(create_app(OnnxClassifier(model_path))) as c:
            return {q: await c.post("/predict" + q, content=jpeg, headers={"content-type": "image/jpeg"})
                    for q in queries}

    bad = ["?min_confidence=1.5", "?min_confidence=-0.1", "?min_confidence=nan", "?min_confidence=inf",
           "?min_confidence=abc", "?min_confidence=1e-3", "?min_confidence=" + "0" * 40, "?min_confidence=%D9%A1",
           "?min_confidence=", "?raw=maybe", "?explain=2"]
    good = ["?explain", "?raw=true&explain=0", "?min_confidence=.25", "?min_confidence=1.0", "?explain=1&raw=1"]
    r = run(go(explainable_onnx(tmp_path / "colours.onnx"), bad + good))
    assert {q: v.status_code for q, v in r.items()} == {**{q: 400 for q in bad}, **{q: 200 for q in good}}
    assert r["?min_confidence=1.5"].json() == {"error": "min_confidence must be a number from 0 to 1, got '1.5'"}
    assert r["?explain=2"].json() == {"error": "explain must be 1 or 0 (or true, false), got '2'"}
    assert len(r["?min_confidence=" + "0" * 40].json()["error"]) < 90  # not echoed whole
    assert "map" in r["?explain"].json()["results"][0] and "map" not in r["?raw=true&explain=0"].json()["results"][0]

    for model_path, why in ((tiny_onnx, "tiny.onnx has no activation maps (exported before dogkit had them); "
                                        "export it again"),
                            (no_maps, "no-maps.onnx has no activation maps: exported with --no-explain")):
        r = run(go(model_path, ["?explain=1", ""]))
        assert r["?explain=1"].status_code == 422 and r["?explain=1"].json() == {"error": f"explain=1: {why}"}
        assert r[""].status_code == 200 and "\n" not in why


def test_maps_are_computed_only_for_batches_that_ask(photos: list[Path], tmp_path: Path):
    """Requests without explain=1 run logits only, even in the same batch as those with it; a batch with one
    explain request runs the maps once for all its images and hands them only to the requests that asked."""
    path = explainable_onnx(tmp_path / "colours.onnx")
    app = create_app(OnnxClassifier(path), ServeConfig(max_batch=16, max_wait_ms=500))

    async def go():
        async with client(app) as c:
            plain = await asyncio.gather(*(c.post("/predict", files=files_form([p])) for p in photos[:6]))
            after_plain = (await c.get("/health")).json()
            mixed = await asyncio.gather(*(c.post("/predict" + ("?explain=1" if i % 2 else ""),
                                                  files=files_form([p])) for i, p in enumerate(photos[:6])))
            return plain, after_plain, mixed, (await c.get("/health")).json()

    plain, after_plain, mixed, health = run(go())
    assert after_plain["map_calls"] == 0 and after_plain["model_calls"] >= 1 and after_plain["images_run"] == 6
    assert health["images_run"] == 12 and 1 <= health["map_calls"] <= health["model_calls"] - after_plain["model_calls"]
    assert health["largest_batch"] >= 3  # requests did share calls, so some batch held both kinds
    for i, (p, m) in enumerate(zip(plain, mixed)):
        got, want = m.json()["results"][0], p.json()["results"][0]
        assert ("map" in got) == bool(i % 2)
        assert {k: v for k, v in got.items() if k != "map"} == want


# ----------------------------------------------------------------------------- errors


def test_every_error_is_json_with_its_status(model: OnnxClassifier, photos: list[Path]):
    jpeg = photos[0].read_bytes()
    big = jpeg * (1 + 40_000 // len(jpeg))
    config = ServeConfig(max_images=2, max_body_mb=40_000 / 2**20)

    async def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for i in range(0, len(big), 4096):
            yield big[i: i + 4096]

    async def go():
        async with client(create_app(model, config)) as c:
            jpg = {"content-type": "image/jpeg"}
            return {
                "top_k zero": await c.post("/predict?top_k=0", content=jpeg, headers=jpg),
                "top_k word": await c.post("/predict?top_k=five", content=jpeg, headers=jpg),
                "top_k superscript": await c.post("/predict?top_k=%C2%B2", content=jpeg, headers=jpg),
                "top_k 5000 digits": await c.post("/predict?top_k=" + "9" * 5000, content=jpeg, headers=jpg),
                "top_k huge but short": await c.post("/predict?top_k=999999999", content=jpeg, headers=jpg),
                "empty body": await c.post("/predict", content=b"", headers=jpg),
                "no files": await c.post("/predict", files=[("comment", (None, b"x"))]),
                "no boundary": await c.post("/predict", content=b"--x\r\n", headers={"content-type":
                                                                                      "multipart/form-data"}),
                "too large": await c.post("/predict", content=big, headers=jpg),
                "too large, streamed": await c.post("/predict", content=chunks(), headers=jpg),
                "too many images": await c.post("/predict", files=[("files", (f"{i}.jpg", b"x", "image/jpeg"))
                                                                    for i in range(3)]),
                "text": await c.post("/predict", content=b"hello", headers={"content-type": "text/plain"}),
                "no type": await c.post("/predict", content=jpeg),
                "raw non-image": await c.post("/predict", content=b"GIF87a?", headers=jpg),
                "raw too many pixels": await c.post("/predict", content=claims_pixels(9000, 9000),
                                                    headers={"content-type": "image/png"}),
                "unknown path": await c.get("/nowhere"),
                "wrong method": await c.get("/predict"),
                "fine": await c.post("/predict", files=files_form(photos[:2])),
            }

    r = run(go())
    expected = {"top_k zero": 400, "top_k word": 400, "top_k superscript": 400, "top_k 5000 digits": 400,
                "top_k huge but short": 200, "empty body": 400, "no files": 400, "no boundary": 400,
                "too large": 413, "too large, streamed": 413, "too many images": 413, "text": 415, "no type": 415,
                "raw non-image": 422, "raw too many pixels": 422, "unknown path": 404, "wrong method": 405,
                "fine": 200}
    assert {k: v.status_code for k, v in r.items()} == expected
    for name, response in r.items():
        if response.status_code != 200:
            assert response.headers["content-type"] == "application/json", name
            assert response.json()["error"], name
    assert "top_k must be a whole number" in r["top_k zero"].json()["error"]
    assert len(r["top_k 5000 digits"].json()["error"]) < 100  # the value is not echoed whole
    huge = r["top_k huge but short"].json()  # every class, ranked
    assert huge["top_k"] == len(huge["results"][0]["top"]) == len(model.class_names)
    assert "exceeds the" in r["too large"].json()["error"] and "MB limit" in r["too large, streamed"].json()["error"]
    assert r["too many images"].json()["error"] == "3 images in one request; the limit is 2"
    assert r["raw non-image"].json()["error"].startswith("undecodable GIF data") or \
        r["raw non-image"].json()["error"].startswith("truncated GIF")
    assert r["raw too many pixels"].json()["error"].startswith("too many pixels: 9000×9000")


def test_full_queue_and_timeout_are_503(exported: Path, photos: list[Path]):
    # One image in the model (0.5 s), one waiting: the queue of two is full for a request of two.
    config = ServeConfig(max_batch=1, max_queue=2, max_images=2)
    slow = slowed(exported, 0.5)

    async def go():
        async with client(create_app(slow, config)) as c:
            first = asyncio.create_task(c.post("/predict", files=files_form(photos[:2])))
            await asyncio.sleep(0.2)
            refused = await c.post("/predict", files=files_form(photos[2:4]))
            return await first, refused

    first, refused = run(go())
    assert first.status_code == 200 and len(first.json()["results"]) == 2
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "the queue is full (2 images waiting); try again shortly"

    async def late():
        async with client(create_app(slowed(exported, 0.6), ServeConfig(timeout_s=0.2))) as c:
            response = await c.post("/predict", files=files_form(photos[:1]))
            await asyncio.sleep(0.6)  # the batch it timed out of finishes; the app must still answer
            return response, await c.post("/predict", files=files_form(photos[:1])), await c.get("/health")

    timed_out, _, health = run(late())
    assert timed_out.status_code == 503 and "0.2 s request timeout" in timed_out.json()["error"]
    assert health.json()["queued_images"] == 0  # the timed-out image released its place


def test_a_failing_model_is_a_json_500_and_the_server_goes_on(exported: Path, photos: list[Path]):
    broken = OnnxClassifier(exported)
    real, calls = broken.run, []

    def fail_once(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("ONNX Runtime ran out of memory")
        return real(batch)

    broken.run = fail_once
    app = create_app(broken)

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://dogkit.test") as c:
                return [await c.post("/predict", files=files_form(photos[:1])) for _ in range(2)]

    failed, fine = run(go())
    assert failed.status_code == 500
    assert failed.json() == {"error": "internal error: RuntimeError: ONNX Runtime ran out of memory"}
    assert fine.status_code == 200 and len(fine.json()["results"][0]["top"]) == 5


def test_bad_options_and_busy_port(exported: Path):
    with pytest.raises(DogkitError, match="max_images: cannot exceed max_queue"):
        create_app(OnnxClassifier(exported), ServeConfig(max_images=10, max_queue=4))
    with pytest.raises(DogkitError, match="cannot listen on 127.0.0.1:70000"):
        listen("127.0.0.1", 70000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(DogkitError, match=rf"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
            serve(exported, port=taken.getsockname()[1])


@pytest.mark.parametrize("option", [["--max-batch", "0"], ["--max-wait-ms", "-1"], ["--timeout", "0"],
                                    ["--max-body-mb", "nan"], ["--port", "-1"]])
def test_cli_refuses_bad_options_before_loading_anything(option: list[str], capsys):
    from dogkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "no-such-model.onnx", *option])
    assert exit_info.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_accepted_connections_have_nagle_off():
    """A listening socket made without proto=IPPROTO_TCP made asyncio leave Nagle's algorithm on: every
    answer (head and body written apart) then waited ~40 ms for the client's delayed ACK."""

    async def go() -> int:
        sock = listen("127.0.0.1", 0)
        accepted = asyncio.get_running_loop().create_future()

        async def on_connect(reader, writer):
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        nodelay = await accepted
        writer.close()
        server.close()
        return nodelay

    assert run(go()) != 0


# ----------------------------------------------------------------------------- batching and shutdown


def test_concurrent_requests_share_model_calls(model: OnnxClassifier, photos: list[Path]):
    """Twelve one-photo requests at once: fewer model calls than requests, every answer still exact."""
    expected, _ = predict(model, photos, top_k=5)
    app = create_app(model, ServeConfig(max_batch=16, max_wait_ms=500))

    async def go():
        async with client(app) as c:
            responses = await asyncio.gather(*(c.post("/predict", files=files_form([p])) for p in photos))
            return responses, (await c.get("/health")).json()

    responses, health = run(go())
    assert all(r.status_code == 200 for r in responses)
    batcher = app.state.service.batcher
    assert batcher.images_run == 12 and health["images_run"] == 12 and health["requests_answered"] == 12
    assert health["model_calls"] == batcher.model_calls <= 3, health
    assert health["largest_batch"] >= 6
    for want, r in zip(expected, responses):
        got = r.json()["results"][0]["top"]
        assert [t["label"] for t in got] == want.labels
        assert [t["prob"] for t in got] == pytest.approx(want.probs, abs=1e-6)


def test_shutdown_finishes_accepted_requests_and_refuses_new_ones(exported: Path, photos: list[Path]):
    app = create_app(slowed(exported, 0.4), ServeConfig(max_batch=2))

    async def go():
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dogkit.test") as c:
            accepted = [asyncio.create_task(c.post("/predict", files=files_form(photos[i: i + 2]))) for i in (0, 2, 4)]
            while app.state.service.requests_in_flight < 3:
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
            await asyncio.sleep(0.05)
            refused, health = await c.post("/predict", files=files_form(photos[:1])), await c.get("/health")
            answers = await asyncio.gather(*accepted)
            await stopping
            return answers, refused, health

    answers, refused, health = run(go())
    assert [len(a.json()["results"]) for a in answers] == [2, 2, 2] and all(a.status_code == 200 for a in answers)
    assert refused.status_code == 503 and refused.json()["error"] == "the server is shutting down"
    assert health.status_code == 503 and health.json()["status"] == "shutting down"
    assert app.state.service.batcher.images_run == 6




@contextlib.contextmanager
def server_process(model_path: Path, *args: str, block_torch: bool = False):
    """``dogkit serve`` in a process of its own on a free port; yields (process, base URL, stderr lines)."""
    code = CLI_WITHOUT_TORCH if block_torch else "from dogkit.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(model_path), "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("dogkit serve: http://"):
                break
        else:
            pytest.fail("dogkit serve did not start:\n" + "".join(lines))
        url = line.split()[2]
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        for _ in range(200):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        yield proc, url, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_process_is_torch_free_and_drains_on_sigterm(exported: Path, photos: list[Path], model: OnnxClassifier):
    """The real server with PyTorch made unimportable; SIGTERM while requests are in flight: they all finish."""
    expected, _ = predict(model, photos[:1], top_k=5)
    with server_process(exported, "--workers", "1", block_torch=True) as (proc, url, lines):
        answer = httpx.post(url + "/predict", files=files_form(photos[:1]), timeout=30)
        assert answer.status_code == 200
        assert [t["label"] for t in answer.json()["results"][0]["top"]] == expected[0].labels
        sixteen = files_form((photos * 2)[:16])
        answers: list = []
        senders: list[threading.Thread] = []

        def send() -> None:
            try:
                answers.append(httpx.post(url + "/predict", files=sixteen, timeout=60))
            except httpx.ConnectError as e:  # connecting after the server stopped listening: never in flight
                answers.append(e)

        deadline = time.monotonic() + 60
        # SIGTERM once a request is accepted (its images reserved in the queue), not merely arriving: a request whose
        # body is still being read is refused, and on a busy machine that can be all of them. Three more are sent
        # whenever the three before were all answered unseen.
        while httpx.get(url + "/health", timeout=5).json()["queued_images"] < 1:
            assert time.monotonic() < deadline, "no request was ever seen accepted"
            if not any(t.is_alive() for t in senders):
                more = [threading.Thread(target=send) for _ in range(3)]
                for t in more:
                    t.start()
                senders += more
        proc.send_signal(signal.SIGTERM)
        for t in senders:
            t.join(timeout=60)
        assert proc.wait(timeout=60) == 0, "".join(lines)
        assert len(answers) == len(senders), "a request in flight got no answer"
        # Each request either was accepted and answered in full, or was sent too late and refused.
        done = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
        assert done and all(len(a.json()["results"]) == 16 for a in done)
        assert all(isinstance(a, httpx.ConnectError) or a.status_code == 503 for a in answers if a not in done)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    text = "".join(lines)
    assert "torch is blocked" not in text and "Traceback" not in text
    assert f"{len(model.class_names)} classes" in text
    assert f"accuracy {model.info('val_metrics')['accuracy']:.4f}" in text.split("validation:")[1].splitlines()[0]
    assert "dogkit serve stopped:" in text
    assert f"answers: calibrated at temperature {model.temperature:.3f}" in text and "maps: yes" in text


# ----------------------------------------------------------------------------- the page in a browser


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.is_file():
        why = (f"no headless browser: needs the playwright package and Chromium at {CHROMIUM} "
               "(apt-get install chromium; .ci/run installs it)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    return sync_playwright


@contextlib.contextmanager
def served_page(model_path: Path, height: int):
    """The page of ``dogkit serve`` on ``model_path``, in headless Chromium, once its model card has loaded."""
    sync_playwright = browser_or_skip()
    with server_process(model_path) as (_, url, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": height})
            page.goto(url + "/")
            page.wait_for_selector("#model-card dl")
            yield page
        finally:
            browser.close()


def test_page_in_a_real_browser(exported: Path, photos: list[Path], model: OnnxClassifier, tmp_path: Path):
    photo = photos[3]
    expected, _ = predict(model, [photo], top_k=5)
    stored = read_rgb(photo)
    tagged = tmp_path / "upright.jpg"
    tagged.write_bytes(exif_jpeg(stored, 6))
    with served_page(exported, 640) as page:
        page.set_input_files("#files", str(photo))
        page.wait_for_selector(".card.done", timeout=30_000)
        top = page.inner_text(".card .bar .label")
        bars = page.locator(".card .bar").count()
        card_text = page.inner_text("#model-card")
        # A landscape photo stored with EXIF orientation 6 (a phone held upright) is shown upright.
        page.set_input_files("#files", str(tagged))
        page.wait_for_function("document.querySelectorAll('.card.done').length === 2", timeout=30_000)
        shown = page.evaluate("""() => { const img = document.querySelector('.card img[alt="upright.jpg"]');
            const box = document.createElement('img');  // the same file at its own size, styled as the cards
            box.src = img.src; box.style.imageOrientation = getComputedStyle(img).imageOrientation;
            document.body.append(box);
            return new Promise(done => box.decode().then(() => done(
                [box.width, box.height, getComputedStyle(img).imageOrientation]))); }""")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
    shutil.copy(tmp_path / "serve-page.png", SCREENSHOTS / "serve-page.png")
    assert top == expected[0].labels[0]
    assert bars == 5
    assert shown[2] == "from-image" and (shown[0], shown[1]) == (stored.shape[0], stored.shape[1])
    assert "resnet18" in card_text and str(len(model.class_names)) in card_text


def test_page_shows_where_the_model_looked(photos: list[Path], tmp_path: Path):
    """The switch lays each photo's map over the square the model saw, as a coloured, half-transparent canvas,
    and takes it off again; an answer below the model's threshold reads "Unsure"."""
    import cv2
    import numpy as np

    from dogkit.deploy.explain import seen_region
    from dogkit.deploy.preprocess import PreprocessSpec

    probe = explainable_onnx(tmp_path / "probe.onnx")
    confidence = {p: float(direct(probe, p.read_bytes(), 2.0)[0].max()) for p in photos}
    sure, unsure = max(photos, key=confidence.get), min(photos, key=confidence.get)
    path = explainable_onnx(tmp_path / "colours.onnx", threshold=(confidence[sure] + confidence[unsure]) / 2)
    card = 'document.querySelector(`.card:has(img[alt="${name}"])`)'
    with served_page(path, 700) as page:
        switch_shown = page.is_visible("#maps-switch")
        page.set_input_files("#files", [str(unsure), str(sure)])
        page.wait_for_function("document.querySelectorAll('.card.done').length === 2", timeout=30_000)
        photo = page.locator(f'.card:has(img[alt="{sure.name}"]) .photo')
        heat = photo.locator("canvas.heat")
        shown_before = heat.is_visible()
        plain = photo.screenshot()
        page.check("#show-maps")
        shown_on, box, frame = heat.is_visible(), heat.bounding_box(), photo.bounding_box()
        mapped = photo.screenshot()
        answers = {p.name: page.evaluate(f"(name) => [{card}.dataset.answer, {card}.querySelector('.answer')"
                                         f".className, {card}.querySelector('.answer').textContent]", p.name)
                   for p in (sure, unsure)}
        top = page.evaluate(f"(name) => {card}.dataset.top", sure.name)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(tmp_path / "serve-explain.png"), full_page=True)
        page.uncheck("#show-maps")
        shown_after = heat.is_visible()
    shutil.copy(tmp_path / "serve-explain.png", SCREENSHOTS / "serve-explain.png")
    assert switch_shown and not shown_before and shown_on and not shown_after
    # Over the seen square: the centre 64/73 of the photo's shorter side, which fills the 160 px box.
    height, width = read_rgb(sure, orientation=True).shape[:2]
    _, _, rows, cols = seen_region(height, width, PreprocessSpec.for_size(64))
    side = frame["width"] * rows / min(height, width)
    assert box["width"] > 100 and box["height"] > 100
    assert box["width"] == pytest.approx(side, abs=1.5) and box["height"] == pytest.approx(side, abs=1.5)
    assert box["x"] + box["width"] / 2 == pytest.approx(frame["x"] + frame["width"] / 2, abs=1.5)
    assert box["y"] + box["height"] / 2 == pytest.approx(frame["y"] + frame["height"] / 2, abs=1.5)
    before, after = (cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR).astype(int) for b in (plain, mapped))
    assert np.abs(after - before).mean() > 10  # visibly coloured, not a faint film
    assert answers[sure.name] == [top, "answer", f"Answer: {top}"] and top in COLOURS
    assert answers[unsure.name][:2] == ["unsure", "answer unsure"]
    assert answers[unsure.name][2].startswith("Unsure: confidence ")


# ----------------------------------------------------------------------------- hostile clients


def test_budget_lets_what_fits_go_ahead_and_gives_back_on_cancel():
    from dogkit.data.budget import AsyncBudget

    async def go():
        budget = AsyncBudget(100)
        order: list[str] = []

        async def job(name: str, n: int, hold: float) -> None:
            await budget.take(n)
            order.append(name)
            await asyncio.sleep(hold)
            budget.give(n)

        first = asyncio.create_task(job("first 70", 70, 0.05))
        await asyncio.sleep(0)
        big = asyncio.create_task(job("big 60", 60, 0))  # waits for room
        await asyncio.sleep(0)
        small = asyncio.create_task(job("small 20", 20, 0))  # fits beside the first: goes ahead of the big one
        await asyncio.wait_for(asyncio.gather(first, big, small), 5)
        assert order == ["first 70", "small 20", "big 60"]
        assert budget.used == 0 and budget.peak == 90
        huge = asyncio.create_task(job("alone 500", 500, 0))  # larger than the budget: runs when nothing else does
        await asyncio.wait_for(huge, 5)
        assert budget.peak == 500
        assert budget.try_take(80)
        stuck = asyncio.create_task(budget.take(50))
        await asyncio.sleep(0.01)
        stuck.cancel()  # a request that timed out while waiting: no room is lost
        with contextlib.suppress(asyncio.CancelledError):
            await stuck
        budget.give(80)
        assert budget.used == 0 and budget.waiting == 0

    run(go())


def test_host_header_must_name_this_server(model: OnnxClassifier):
    from dogkit.deploy.serve import default_hosts

    local = default_hosts("127.0.0.1")
    assert set(local) == {"127.0.0.1", "localhost", "::1"}
    everywhere = default_hosts("0.0.0.0")
    assert "<ip>" in everywhere and socket.gethostname().lower() in everywhere

    async def go(hosts):
        async with client(create_app(model, ServeConfig(allowed_hosts=hosts))) as c:
            out = {}
            for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST", "10.1.2.3:8000", "evil.example",
                         "localhost.evil.example:8000", "\x1b[31m"):
                out[host] = await c.get("/health", headers={"host": host})
            return out

    answers = run(go(local))
    assert {h: r.status_code for h, r in answers.items()} == {
        "localhost:8000": 200, "127.0.0.1": 200, "[::1]:8000": 200, "LOCALHOST": 200, "10.1.2.3:8000": 421,
        "evil.example": 421, "localhost.evil.example:8000": 421, "\x1b[31m": 421}
    error = answers["\x1b[31m"].json()["error"]
    assert "--allowed-host" in error and "\x1b" not in error
    wide = run(go(everywhere))
    assert wide["10.1.2.3:8000"].status_code == 200 and wide["evil.example"].status_code == 421
    assert all(r.status_code == 200 for r in run(go(("*",))).values())


def test_body_budget_refuses_before_reading_and_while_streaming(model: OnnxClassifier, photos: list[Path]):
    jpeg = photos[0].read_bytes()
    config = ServeConfig(body_budget_mb=1.0, max_body_mb=1.0)

    async def chunks():
        for i in range(0, len(jpeg), 1024):
            yield jpeg[i: i + 1024]

    async def go():
        app = create_app(model, config)
        async with client(app) as c:
            service = app.state.service
            assert service.bodies.try_take(2**20 - len(jpeg) // 2)  # others' bodies hold nearly all of it
            declared = await c.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"})
            streamed = await c.post("/predict", content=chunks(), headers={"content-type": "image/jpeg"})
            health = (await c.get("/health")).json()
            service.bodies.give(2**20 - len(jpeg) // 2)
            fine = await c.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"})
            return declared, streamed, health, fine, service.bodies.used

    declared, streamed, health, fine, left = run(go())
    for refused in (declared, streamed):
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "of request bodies (its budget: 1 MB)" in refused.json()["error"]
    assert health["body_budget"]["limit_mb"] == 1.0 and health["decode_budget"]["used_mb"] == 0
    assert fine.status_code == 200 and left == 0  # every request gives back what it held


def _closed_within(sock: socket.socket, start: float, seconds: float) -> float | None:
    """Seconds from ``start`` until the server closes ``sock`` (reading and discarding), or None if it stays open."""
    sock.settimeout(0.05)
    while time.monotonic() - start < seconds:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return None


def test_stalled_connections_are_closed_by_their_timeouts(exported: Path, photos: list[Path]):
    with server_process(exported, "--header-timeout", "0.6", "--body-timeout", "0.6", "--keep-alive", "0.6") as (
            proc, url, lines):
        host, port = url.removeprefix("http://").rsplit(":", 1)

        def connect() -> socket.socket:
            return socket.create_connection((host, int(port)), timeout=5)

        idle = connect()  # never sends a byte
        slow_headers = connect()
        slow_headers.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow_body = connect()
        slow_body.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                          b"Content-Length: 100000\r\n\r\n")
        kept_alive = connect()
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

        def trickle() -> None:  # one byte at a time resets uvicorn's own keep-alive timer, not these deadlines
            for _ in range(80):
                for s, data in ((slow_headers, b"X"), (slow_body, b"\0")):
                    with contextlib.suppress(OSError):
                        s.sendall(data)
                time.sleep(0.1)

        start = time.monotonic()
        threading.Thread(target=trickle, daemon=True).start()
        times = {name: _closed_within(s, start, 6) for name, s in (("idle", idle), ("slow headers", slow_headers),
                                                           ("slow body", slow_body), ("kept alive", kept_alive))}
        # Closed after their 0.6 s and while the trickle still sends (8 s): by the deadlines, with room for a busy
        # machine's delays.
        assert all(t is not None and 0.4 < t < 6 for t in times.values()), times
        answer = httpx.post(url + "/predict", content=photos[0].read_bytes(), headers={"content-type": "image/jpeg"})
        assert answer.status_code == 200  # the server goes on
        refused = httpx.get(url + "/health", headers={"host": "rebound.example"})
        assert refused.status_code == 421
    assert "Traceback" not in "".join(lines)


def test_a_flood_of_bombs_and_stalled_clients_leaves_memory_bounded_and_small_images_flowing(exported: Path):
    """scripts/serve_flood.py at small scale: 4-megapixel bombs from two clients (16 per request), slow bodies,
    slow headers and idle sockets, with 16 decode threads; a client sending one small JPEG at a time beside them."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import serve_flood
    finally:
        sys.path.remove(str(REPO / "scripts"))
    args = argparse.Namespace(
        serve="--workers 16 --decode-budget-mb 48 --body-budget-mb 16 --max-body-mb 8 --header-timeout 1 "
              "--body-timeout 1", megapixels=4.0, bomb_clients=2, slow=10, slow_mb=4.0, idle=30, seconds=3.0,
        settle=1.5)
    result = serve_flood.flood(exported, args)
    assert result["failures"] == [] and result["tracebacks"] == 0, result
    # 16 threads × 4 Mpx × 6 bytes would be ~380 MB of decoding at once; the budget keeps it to 48 MB.
    assert result["budgets"]["decode_budget"]["peak_mb"] <= 48, result
    assert result["server_peak_rss_mb"] < 400, result
    assert all(v.split("/")[0] == v.split("/")[1] for v in result["closed_by_server"].values()), result
    # Throughput is the benchmark's to judge (BENCHMARKS.md; a ratio of two rates measured apart moves with the
    # machine's other work): this only says the small client was answered during the flood, not starved.
    assert result["requests_per_s_flooded"] * args.seconds >= 3, result
