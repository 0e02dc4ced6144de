import os
import subprocess
import sys
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
    for expected in ("train", "8", "classes", "empty file", "Image cache", "dogkit train --exp 1"):
        assert expected in text
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
