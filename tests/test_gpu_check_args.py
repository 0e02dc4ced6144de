"""scripts/gpu_check.py refuses what it cannot run in one line, before any step: a budget that is not a number of
seconds, no step at all, an OUTDIR that cannot be a folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.parametrize("args, message", [
    (["--budget", "nan"], "--budget must be a positive number of seconds, got nan"),
    (["--budget", "inf"], "--budget must be a positive number of seconds, got inf"),
    (["--budget", "0"], "--budget must be a positive number of seconds, got 0.0"),
    (["--overrun", "nan"], "--overrun must be a number of seconds, 0 or more, got nan"),
    (["--steps", ""], "--steps names no step"),
    (["--steps", " , "], "--steps names no step"),
    (["OUTDIR=file"], "exists and is not a folder"),
    (["OUTDIR=below-a-file"], "cannot create"),
])
def test_gpu_check_refuses_bad_arguments_in_one_line(tmp_path: Path, args: list[str], message: str):
    for name in ("sample", "dogs51"):
        (tmp_path / name / "Images").mkdir(parents=True)
    (tmp_path / "file").write_text("")
    outdir = {"OUTDIR=file": tmp_path / "file", "OUTDIR=below-a-file": tmp_path / "file" / "out"}.get(
        args[0], tmp_path / "out")
    args = [a for a in args if not a.startswith("OUTDIR=")]
    proc = subprocess.run([sys.executable, str(SCRIPT), str(outdir), "--sample", str(tmp_path / "sample"),
                           "--dogs51", str(tmp_path / "dogs51"), "--dry", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"gpu_check.py: error: {proc.stderr.split('error: ')[-1].strip()}"
    assert message in proc.stderr.splitlines()[-1], proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started
