import json
import subprocess
import sys
from pathlib import Path

import pytest

from dogkit.deploy.bench import all_backends, markdown


def test_bench_runs_each_backend_in_its_own_process_and_writes_json(exported: Path, sample_dir: Path,
                                                                    tmp_path: Path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    images = sample_dir / "Images" / "n02085620-Chihuahua"
    proc = subprocess.run(
        [sys.executable, "-m", "dogkit", "bench", "--run", str(exported.parent), "--backends",
         "torch,onnx,onnx-int8", "--batch-sizes", "1,2", "--threads", "1", "--min-time", "0.05", "--min-runs", "3",
         "--warmup", "1", "--images", str(images), "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["device"] == "cpu"
    assert result["skipped"] == {"onnx-int8": "no model.int8.onnx (dogkit export --int8)"}
    rows = result["rows"]
    assert [(r["backend"], r["batch"], r["end_to_end"]) for r in rows] == [
        ("torch", 1, False), ("torch", 2, False), ("onnx", 1, False), ("onnx", 2, False), ("onnx", 2, True)]
    for r in rows:
        assert r["backend"] in all_backends() and r["threads"] == 1
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["runs"] >= 3 if not r["end_to_end"] else r["runs"] == 4  # 8 files in batches of 2
    assert rows[0]["variant"].startswith("channels_last, fp32")
    assert rows[-1]["variant"].startswith("model.onnx: decode + preprocess + inference, 8 files")
    text = md.read_text()
    assert text.count("\n| ") == 1 + len(rows) and "| onnx (end to end) |" in text
    assert markdown(result) == text


def test_unknown_backend_is_refused(exported: Path):
    from dogkit.deploy.bench import plan
    from dogkit.errors import DogkitError

    with pytest.raises(DogkitError, match="unknown backend"):
        plan(exported, None, ["onnxx"], exported.parent)


def test_bench_times_opencv_dnn_on_the_same_files_and_reports_what_it_cannot_run(exported_int8: Path, tmp_path):
    import cv2

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dogkit", "bench", "--run", str(exported_int8.parent), "--backends",
         "onnx,opencv,opencv-int8", "--batch-sizes", "1,3", "--threads", "1", "--min-time", "0.05", "--min-runs",
         "3", "--warmup", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = {(r["backend"], r["batch"]): r for r in result["rows"]}
    assert result["machine"]["opencv"] == cv2.__version__
    for batch in (1, 3):
        assert rows[("opencv", batch)]["variant"] == f"model.onnx, OpenCV {cv2.__version__} DNN"
        assert rows[("opencv", batch)]["images_per_s"] > 0 and rows[("opencv", batch)]["runs"] >= 3
    # The INT8 file says where its gate ran (ONNX Runtime's CPU provider): OpenCV 4.x would time wrong logits,
    # 5.0 refuses the file. The benchmark skips it, says why, and measures the rest.
    assert ("opencv-int8", 1) not in rows
    reason = result["skipped"]["opencv-int8"]
    assert reason.startswith("model.int8.onnx was validated on onnxruntime (CPUExecutionProvider) only") and \
        "opencv runs its quantized operators differently" in reason and "\n" not in reason
    assert f"Skipped opencv-int8: {reason}." in markdown(result)
    assert "opencv-int8: model.int8.onnx was validated" in " ".join(proc.stderr.split())  # said on the console too


def test_opencv_failure_becomes_the_reason_not_an_error(exported: Path, monkeypatch):
    import cv2

    from dogkit.deploy.bench import Unsupported, bench_opencv

    def refuse(path):
        raise cv2.error("OpenCV(5.0.0) net_impl2.cpp:449: error: (-215:Assertion failed) bufidx >= 0 in function "
                        "'argTensor'\n")

    monkeypatch.setattr(cv2.dnn, "readNetFromONNX", refuse)
    with pytest.raises(Unsupported, match=r"^OpenCV \S+ DNN cannot run model.onnx: \(-215:Assertion failed\) "
                                          r"bufidx >= 0 in function 'argTensor'$"):
        bench_opencv(exported, "opencv", 1, 1, 0, 1, 0.0)
