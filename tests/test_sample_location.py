import os
import subprocess
import sys
from pathlib import Path


def test_missing_sample_fails_under_ci_and_skips_otherwise(tmp_path: Path):
    test = "tests/test_prepare.py::test_real_sample_gives_stratified_disjoint_70_15_15"
    repo = Path(__file__).resolve().parents[1]
    base = dict(os.environ, DOGKIT_SAMPLE=str(tmp_path / "nowhere"))

    def run(ci: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                              cwd=repo, env=dict(base, CI=ci), capture_output=True, text=True, timeout=120)

    under_ci = run("true")
    assert under_ci.returncode == 1 and "sample not found" in under_ci.stdout
    local = run("")
    assert local.returncode == 0 and "1 skipped" in local.stdout
