"""Shared fixtures. The real Stanford Dogs sample is read from $DOGKIT_SAMPLE (default
../shared/data/stanford-dogs-sample beside the repository); under CI=true it must exist."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("DOGKIT_SAMPLE", REPO.parent / "shared" / "data" / "stanford-dogs-sample"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "Images").is_dir():
        message = f"Stanford Dogs sample not found at {SAMPLE} (set DOGKIT_SAMPLE)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SAMPLE


@pytest.fixture(scope="session")
def prepared_sample(sample_dir: Path, tmp_path_factory) -> Path:
    """The sample prepared once per session with default options; tests must not modify it."""
    from dogkit.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "stanford-dogs"
    prepare(PrepareConfig(sources=[sample_dir], out=out))
    return out


@pytest.fixture
def sample_copy(sample_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the sample's images and annotations (about 22 MB)."""
    dest = tmp_path / "sample"
    shutil.copytree(sample_dir / "Images", dest / "Images")
    shutil.copytree(sample_dir / "Annotation", dest / "Annotation")
    return dest


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: connecting to it fails like a machine offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
