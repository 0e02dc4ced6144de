import csv
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from imagegen import encode, pattern


def run_dogkit(*args: str, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dogkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_prepare_prints_a_summary_and_the_next_step(tmp_path: Path):
    for k, name in enumerate(("cats", "dogs")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "src" / name / f"{i}.jpg").write_bytes(encode(pattern(seed=10 * k + i), "JPEG"))
    (tmp_path / "src" / "dogs" / "broken.jpg").write_bytes(b"")
    proc = run_dogkit("prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--cache", "32")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    # 12 good images of 2 classes split 70/15/15 per class (6 → 4/1/1), the empty file rejected with its reason.
    for label, count in (("train", 8), ("val", 2), ("test", 2), ("total", 12), ("classes", 2), ("rejected files", 1)):
        assert re.search(rf"^\W*{label}\W+{count}\W*$", text, re.MULTILINE), (label, count, text)
    assert re.search(r"^\s*1\s+empty file$", text, re.MULTILINE)
    assert f"Image cache {tmp_path / 'out' / 'cache' / '32px-none'}" in text
    assert text.rstrip().endswith(f"Next: dogkit train --exp 1 --data {tmp_path / 'out'}")
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        splits = Counter(row["split"] for row in csv.DictReader(f))
    assert splits == {"train": 8, "val": 2, "test": 2}  # the summary tells what was written
    again = run_dogkit("prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert again.returncode == 0 and "up to date" in again.stdout + again.stderr


def test_errors_are_one_clean_line_not_a_traceback(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    proc = run_dogkit("prepare", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "no class folders" in proc.stderr and "Traceback" not in proc.stderr


def test_offline_download_says_how_to_use_source(tmp_path: Path, closed_port: int):
    proc = run_dogkit("prepare", "--out", str(tmp_path / "out"),
                      env_extra={"DOGKIT_STANFORD_DOGS_URL": f"http://127.0.0.1:{closed_port}/"})
    assert proc.returncode == 2
    assert "--source" in proc.stderr and "Traceback" not in proc.stderr


def test_help_reads_like_a_unix_usage_line():
    proc = run_dogkit("predict", "--help", env_extra={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"Usage: dogkit predict \[OPTIONS\] PATHS\.\.\.", proc.stdout), proc.stdout
    assert "<bool>" not in proc.stdout and "{" not in proc.stdout  # flags take no value; no {name} placeholders
    assert re.search(r"--json\s+Predictions as JSON", proc.stdout)


def test_other_tools_setting_names_and_a_missing_exp_are_explained(tmp_path: Path):
    for typo, meant in (("learnin_rate", "lr"), ("imgsz", "image_size"), ("patiance", "early_stopping")):
        proc = run_dogkit("train", "--exp", "1", "--set", f"{typo}=1")
        assert proc.returncode == 2 and f"unknown setting '{typo}'" in proc.stderr, proc.stderr
        assert f"(did you mean '{meant}'?)" in proc.stderr
    # Without --exp the run is none of the regimes: said before anything else happens (here: no dataset).
    proc = run_dogkit("train", "--data", str(tmp_path / "nothing"), "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode != 0
    assert "no --exp: training dogkit's base settings (resnet50, ImageNet weights, adam 0.0001, cosine, 15 " \
           "epochs), none of the study's three regimes" in " ".join(proc.stderr.split())
