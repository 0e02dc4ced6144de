"""Hostile and careless input: every command answers in one line, loses nothing and stays bounded.

Pixel and archive bombs, huge files, special files, names that look like Rich markup, nonsense
option values, damaged run folders, leftovers of killed processes, two trainers on one run.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagegen import encode, pattern, png_of_zeros

from dogkit.atomic import atomic_write_text, remove_stale
from dogkit.cli import main
from dogkit.data.archives import check_archive, safe_extract
from dogkit.data.images import ImageError, decode_rgb, read_file, read_rgb
from dogkit.data.limits import Limits, header_size, limits
from dogkit.data.split import parse_ratios
from dogkit.deploy.predict import collect_inputs
from dogkit.errors import DogkitError
from dogkit.text import shown

GB = 2**30
# A subprocess that runs the CLI and, however it ends, reports its own peak resident memory: VmHWM,
# which starts afresh with the new program (ru_maxrss would carry over the parent's peak across exec).
MEASURED = """
import re, sys
from dogkit.cli import main
try:
    main(sys.argv[2:])
finally:
    status = open("/proc/self/status").read()
    open(sys.argv[1], "w").write(str(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024))
"""


def run_measured(tmp_path: Path, *args: str, env_extra: dict | None = None) -> tuple[subprocess.CompletedProcess, int]:
    peak = tmp_path / "peak.txt"
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", MEASURED, str(peak), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    return proc, int(peak.read_text())


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The real entry point in this process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error:"), err
    return lines[0]


@pytest.fixture(scope="session")
def bomb_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png_of_zeros(40000, 40000))  # 1.5 MB on disk, 1.6 Gpx decoded
    assert path.stat().st_size < 2_000_000
    return path


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpeg"), ("GIF", "gif"), ("BMP", "bmp"),
                                        ("WEBP", "webp"), ("TIFF", "tiff")])
@pytest.mark.parametrize("size", [(64, 48), (1, 1), (300, 7)])
def test_header_size_matches_the_image_without_decoding(fmt: str, suffix: str, size: tuple[int, int]):
    width, height = size
    data = encode(pattern(height, width), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert header_size(data, suffix) == (width, height)
    progressive = encode(pattern(height, width), "JPEG", progressive=True)
    assert header_size(progressive, "jpeg") == (width, height)


def test_pixel_bomb_and_extreme_aspect_ratio_are_refused_before_decoding(bomb_png: Path, monkeypatch):
    with pytest.raises(ImageError, match=r"too many pixels: 40000×40000"):
        decode_rgb(bomb_png.read_bytes())
    with pytest.raises(ImageError, match="extreme aspect ratio: 1×1000000"):
        decode_rgb(png_of_zeros(1, 1_000_000))
    # The limits are the user's to raise.
    monkeypatch.setenv("DOGKIT_MAX_ASPECT", "2000000")
    assert decode_rgb(png_of_zeros(1, 10_000)).shape == (10_000, 1, 3)
    monkeypatch.setenv("DOGKIT_MAX_PIXELS", "100")
    with pytest.raises(ImageError, match="too many pixels"):
        decode_rgb(encode(pattern(48, 64), "JPEG"))


def test_huge_file_is_refused_from_its_size_without_being_read(tmp_path: Path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:  # sparse: 6 GB to stat, nothing on disk
        f.truncate(6 * GB)
    with pytest.raises(ImageError, match="file too large: 6144 MB"):
        read_file(huge)


def test_special_files_are_refused_with_their_kind(tmp_path: Path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(ImageError, match="not a regular file \\(a FIFO\\)"):  # and it does not hang
        read_file(fifo)
    with pytest.raises(ImageError, match="broken symbolic link"):
        read_file(tmp_path / "broken.jpg")
    with pytest.raises(ImageError, match="Too many levels of symbolic links"):
        read_file(tmp_path / "loop.jpg")
    with pytest.raises(ImageError, match="a folder"):
        read_file(tmp_path)


def test_an_image_emptied_after_prepare_is_named_by_the_data_loader(tmp_path: Path):
    from dogkit.data.dataset import load_dataset
    from dogkit.data.prepare import PrepareConfig, prepare
    from dogkit.deploy.preprocess import PreprocessSpec
    from dogkit.training.loaders import ManifestImages, make_loader
    from dogkit.training.transforms import EvalFn

    for k, name in enumerate(("cats", "dogs")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "src" / name / f"{i}.jpg").write_bytes(encode(pattern(seed=10 * k + i), "JPEG"))
    prepare(PrepareConfig(sources=[tmp_path / "src"], out=tmp_path / "out"))
    dataset = load_dataset(tmp_path / "out")
    victim = dataset.image_path(dataset.records[0])
    victim.write_bytes(b"")
    images = ManifestImages(dataset, dataset.records, EvalFn(PreprocessSpec.for_size(32)), "none")
    with pytest.raises(ImageError) as info:
        list(make_loader(images, 4, shuffle=False, workers=1))
    assert str(victim) in str(info.value) and "empty file" in str(info.value)


# ----------------------------------------------------------------------------- predict


def test_predict_collects_everything_and_skips_with_reasons(tmp_path: Path, monkeypatch):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(encode(pattern(), "JPEG"))
    os.mkfifo(folder / "pipe.jpg")
    (folder / "broken.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "linked").symlink_to(folder / "sub")
    files, skipped = collect_inputs([str(folder), str(tmp_path / "missing.jpg"), str(folder / "broken.jpg")])
    assert sorted(p.name for p in files) == ["broken.jpg", "loop.jpg", "ok.jpg", "pipe.jpg"]
    assert {p.name: why for p, why in skipped} == {"linked": "symbolic link to a folder (not followed)",
                                                   "missing.jpg": "does not exist"}

    # An unreadable folder is reported as such (simulated: tests may run as root, who reads anything).
    def walk(top, onerror=None, **kwargs):
        onerror(PermissionError(13, "Permission denied", str(top)))
        return iter(())

    monkeypatch.setattr("dogkit.deploy.predict.os.walk", walk)
    files, skipped = collect_inputs([str(folder)])
    assert files == [] and skipped == [(folder, "unreadable folder (Permission denied)")]


def test_predict_survives_bombs_markup_names_and_special_files(tiny_onnx: Path, bomb_png: Path, tmp_path: Path):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["photo[dog].jpg", "a[/b]b.jpg", "plain.png"]  # a path with "[/b]": folder "a[", file "b]b.jpg"
    (folder / "a[").mkdir()
    for k, name in enumerate(names):
        (folder / name).write_bytes(encode(pattern(seed=k), "PNG"))
    (folder / "bomb.png").symlink_to(bomb_png)
    (folder / "thin.png").write_bytes(png_of_zeros(1, 1_000_000))
    os.mkfifo(folder / "pipe.jpg")
    (folder / "broken.jpg").symlink_to(folder / "gone.jpg")
    proc, peak = run_measured(tmp_path, "predict", str(folder), "--model", str(tiny_onnx), "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    assert peak < 1.5 * GB, f"peak RSS {peak / GB:.2f} GB"
    # Results on stdout, names shown as they are; logs and skips on stderr.
    for name in names:
        assert name in proc.stdout, proc.stdout
    assert "blue [/b]" in proc.stdout and "skipped" not in proc.stdout
    assert "3 images predicted, 4 skipped" in proc.stderr
    for name, why in (("bomb.png", "too many pixels"), ("thin.png", "extreme aspect ratio"),
                      ("pipe.jpg", "not a regular file (a FIFO)"), ("broken.jpg", "broken symbolic link")):
        assert any(name in line and why in line for line in proc.stderr.splitlines()), (name, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_predict_with_cuda_unavailable_is_one_error_line(tiny_onnx: Path, tmp_path: Path, capsys):
    import onnxruntime as ort

    if Path("/dev/nvidia0").exists():
        pytest.skip("a GPU is present: --device cuda may work here")
    image = tmp_path / "a.png"
    image.write_bytes(encode(pattern(), "PNG"))
    code, out, err = run_cli(capsys, "predict", str(image), "--model", str(tiny_onnx), "--device", "cuda")
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "cuda" in line.lower() and "--device cpu" in line, (line, ort.get_available_providers())


def test_malformed_onnx_metadata_is_one_error_line(tiny_onnx: Path, tmp_path: Path, capsys):
    import onnx

    model = onnx.load(str(tiny_onnx))
    for entry in model.metadata_props:
        if entry.key == "dogkit.preprocess":
            entry.value = '{"size": "big", "colour": 1'
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    image = tmp_path / "a.png"
    image.write_bytes(encode(pattern(), "PNG"))
    code, _, err = run_cli(capsys, "predict", str(image), "--model", str(bad))
    assert code == 2 and "malformed dogkit metadata" in one_error_line(err)


# ----------------------------------------------------------------------------- prepare


def test_prepare_rejects_a_pixel_bomb_with_a_reason_in_bounded_memory(bomb_png: Path, tmp_path: Path):
    for k, name in enumerate(("cats", "dogs")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "src" / name / f"{i}.jpg").write_bytes(encode(pattern(seed=10 * k + i), "JPEG"))
    (tmp_path / "src" / "dogs" / "bomb.png").write_bytes(bomb_png.read_bytes())
    (tmp_path / "src" / "cats" / "thin.png").write_bytes(png_of_zeros(1, 1_000_000))
    os.mkfifo(tmp_path / "src" / "cats" / "pipe.jpg")
    (tmp_path / "src" / "cats" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    proc, peak = run_measured(tmp_path, "prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert peak < 1.5 * GB, f"peak RSS {peak / GB:.2f} GB"
    rejects = (tmp_path / "out" / "rejects.csv").read_text()
    assert "dogs/bomb.png,dogs,too many pixels: 40000×40000" in rejects
    assert "extreme aspect ratio: 1×1000000" in rejects
    assert "cats/pipe.jpg,cats,not a regular file (a FIFO)" in rejects
    assert "cats/broken.jpg,cats,broken symbolic link" in rejects
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["counts"]["total"] == 12


# ----------------------------------------------------------------------------- archives


def _zeros_zip(path: Path, size: int) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("Images/a/zeros.jpg", "w",
                                                                          force_zip64=True) as f:
        block = b"\x00" * (16 << 20)
        for _ in range(size // len(block)):
            f.write(block)


def test_zip_bomb_is_refused_before_extraction_and_not_reused(tmp_path: Path):
    bomb = tmp_path / "bomb.zip"
    _zeros_zip(bomb, 256 << 20)  # 256 MiB of zeros in ~250 kB
    assert bomb.stat().st_size < 1 << 20
    dest = tmp_path / "raw"
    with pytest.raises(DogkitError, match="compression ratio above 200.*decompression bomb") as info:
        safe_extract(bomb, dest)
    assert "\n" not in str(info.value)
    assert not dest.exists() and [p.name for p in tmp_path.iterdir()] == ["bomb.zip"]
    # An extraction stamped by an older dogkit (no record of today's checks) is checked again, not reused.
    dest.mkdir()
    (dest / "Images").mkdir()
    st = bomb.stat()
    (dest / ".bomb.zip.extracted").write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                          "entries": ["Images"]}))
    with pytest.raises(DogkitError, match="decompression bomb"):
        safe_extract(bomb, dest)


def test_tar_gz_bomb_and_too_many_members_are_refused(tmp_path: Path, monkeypatch):
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tf:
        info = tarfile.TarInfo("Images/a/zeros.jpg")
        info.size = 128 << 20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(DogkitError, match="decompression bomb"):
        check_archive(bomb)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(5):
            zf.writestr(f"Images/a/{i}.jpg", b"x")
    monkeypatch.setenv("DOGKIT_MAX_ARCHIVE_MEMBERS", "3")
    with pytest.raises(DogkitError, match="more than 3 members"):
        check_archive(many)
    monkeypatch.setenv("DOGKIT_MAX_ARCHIVE_MEMBERS", "abc")
    with pytest.raises(DogkitError, match="DOGKIT_MAX_ARCHIVE_MEMBERS must be a whole number from 1 to 4294967296"):
        check_archive(many)


def _many_member_zip(path: Path, members: int, stated: int | None = None) -> None:
    """A zip64 archive whose central directory really lists ``members`` entries (all one empty file), built
    in a fraction of a second; its end records state ``stated`` members (default: the truth)."""
    import struct

    stated = members if stated is None else stated
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, 1, 0) + b"x"
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"x"
    directory = entry * members
    zip64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, stated, stated, len(directory), len(local))
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(local) + len(directory), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(local + directory + zip64 + locator + end)


def test_a_zip_with_too_many_members_is_refused_from_its_end_record(tmp_path: Path, monkeypatch):
    import dogkit.data.archives as archives

    many = tmp_path / "many.zip"
    _many_member_zip(many, 1_000_000)  # 47 MB; zipfile takes seconds and ~300 MB just to list it
    assert len(zipfile.ZipFile(many).infolist()) == 1_000_000  # a zip that zipfile itself reads
    with monkeypatch.context() as m:  # from the end record alone: the directory is never walked
        m.setattr(archives, "_count_directory", lambda *a: pytest.fail("the central directory was walked"))
        with pytest.raises(DogkitError, match="more than 100000 members .*: its directory lists 1000000"):
            check_archive(many, Limits(max_archive_members=100_000))
    proc, peak = run_measured(tmp_path, "prepare", "--source", str(many), "--out", str(tmp_path / "out"),
                              env_extra={"DOGKIT_MAX_ARCHIVE_MEMBERS": "100000"})
    assert proc.returncode == 2 and "more than 100000 members" in one_error_line(proc.stderr)
    assert peak < 200 * 2**20, f"peak RSS {peak / 2**20:.0f} MB"
    # A count forged low over that directory is refused too, before zipfile reads it.
    _many_member_zip(many, 1_000_000, stated=10)
    with pytest.raises(DogkitError, match="central directory of 45 MB is far larger than its 10 members need, so "
                                          "the archive is damaged or forged"):
        check_archive(many)


def test_zip_end_records_are_read_as_zipfile_writes_them(tmp_path: Path, monkeypatch):
    plain, wide = tmp_path / "plain.zip", tmp_path / "wide.zip"
    for path in (plain, wide):
        if path is wide:  # zip64 end records, as zipfile writes them for more than 65535 members
            monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
        with zipfile.ZipFile(path, "w") as zf:
            zf.comment = b"a comment before which the end record must still be found"
            for i in range(5):
                zf.writestr(f"Images/a/{i}.jpg", b"x")
    monkeypatch.undo()
    assert b"PK\x06\x06" in wide.read_bytes() and b"PK\x06\x06" not in plain.read_bytes()
    for path in (plain, wide):
        assert len(check_archive(path)) == 5
        with pytest.raises(DogkitError, match="more than 4 members .*: its directory lists 5"):
            check_archive(path, Limits(max_archive_members=4))


def test_a_garbage_tar_is_one_line_naming_the_archive(tmp_path: Path, capsys):
    archive = tmp_path / "x\x1b[2J.tar"  # random bytes, and a name that would clear the terminal
    archive.write_bytes(np.random.default_rng(0).bytes(20_000))
    code, _, err = run_cli(capsys, "prepare", "--source", str(archive), "--out", str(tmp_path / "out"))
    line = one_error_line(err)
    assert code == 2 and f"cannot read archive {tmp_path}/x\\x1b[2J.tar (ReadError: " in line, line
    assert "method tar: ReadError('invalid header')" in line and "\x1b" not in err


# ----------------------------------------------------------------------------- limits


@pytest.mark.parametrize(("env", "value", "allowed"), [
    ("DOGKIT_MAX_PIXELS", "2e19", "a whole number from 1 to 1099511627776"),
    ("DOGKIT_MAX_PIXELS", "1.5", "a whole number from 1 to 1099511627776"),
    ("DOGKIT_MAX_FILE_MB", "inf", "a number from 0.001 to 1048576"),
    ("DOGKIT_MAX_ASPECT", "0.5", "a number from 1 to 1099511627776"),
    ("DOGKIT_MAX_ARCHIVE_GB", "-1", "a number from 0.001 to 1048576"),
    ("DOGKIT_MAX_ARCHIVE_MEMBERS", "1e10", "a whole number from 1 to 4294967296"),
    ("DOGKIT_MAX_ARCHIVE_RATIO", "nan", "a number from 1 to 1000000"),
])
def test_limit_variables_out_of_range_are_one_line_naming_the_range(env: str, value: str, allowed: str, monkeypatch):
    monkeypatch.setenv(env, value)
    with pytest.raises(DogkitError, match=re.escape(f"{env} must be {allowed}, got {value!r}")):
        limits()


def test_limit_variables_in_range_are_taken(monkeypatch):
    monkeypatch.setenv("DOGKIT_MAX_PIXELS", "1e8")
    monkeypatch.setenv("DOGKIT_MAX_FILE_MB", "0.5")
    monkeypatch.setenv("DOGKIT_MAX_ARCHIVE_MEMBERS", "4294967296")
    policy = limits()
    assert (policy.max_pixels, policy.max_file_bytes, policy.max_archive_members) == (10**8, 2**19, 2**32)


@pytest.mark.parametrize("env", [{"DOGKIT_MAX_PIXELS": "2e19"}, {"DOGKIT_MAX_PIXELS": "-3"},
                                 {"OPENCV_IO_MAX_IMAGE_PIXELS": "2e19"},
                                 {"OPENCV_IO_MAX_IMAGE_PIXELS": "99999999999999999999999"}])
def test_a_limit_opencv_cannot_parse_never_kills_the_process(env: dict, tiny_onnx: Path, tmp_path: Path):
    image = tmp_path / "a.png"
    image.write_bytes(encode(pattern(), "PNG"))
    for args in (["prepare", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                 ["predict", str(image), "--model", str(tiny_onnx)]):
        proc = subprocess.run([sys.executable, "-m", "dogkit", *args], capture_output=True, text=True,
                              env=dict(os.environ, **env), timeout=120)
        assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr}"  # SIGABRT before
        if "DOGKIT_MAX_PIXELS" in env:
            assert proc.returncode == 2 and "DOGKIT_MAX_PIXELS must be a whole number from 1 to" in \
                one_error_line(proc.stderr)
        else:
            assert proc.returncode == (2 if args[0] == "prepare" else 0), proc.stderr


# ----------------------------------------------------------------------------- leftovers and races


def test_stale_temporaries_of_killed_processes_are_removed(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f".last.pt.p{dead}.x1y2.tmp", tmp_path / ".last.pt.abcd1234.tmp"]
    live = tmp_path / f".last.pt.p{os.getppid()}.x1y2.tmp"  # a process that is running
    for p in (*stale, live):
        p.write_bytes(b"half")
    atomic_write_text(tmp_path / "last.pt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "last.pt"])
    export_dir = tmp_path / f".export-p{dead}-abc"
    export_dir.mkdir()
    (export_dir / "model.onnx").write_bytes(b"half")
    assert remove_stale(tmp_path, ".export-*") == [export_dir]
    # Extraction leftovers go when the next extraction starts.
    src = tmp_path / "a.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("Images/a/1.jpg", b"x")
    leftover = tmp_path / f".raw.extracting-p{dead}-q"
    (leftover / "content").mkdir(parents=True)
    safe_extract(src, tmp_path / "raw")
    assert not leftover.exists() and (tmp_path / "raw" / "Images" / "a" / "1.jpg").is_file()


def test_a_killed_trainer_leaves_its_run_unlocked_while_its_forked_workers_wind_down(tmp_path: Path):
    """A data loader's workers are forked with the lock's file open; an flock was theirs too, so a resume right
    after a SIGKILL found the run "being trained" until they noticed and exited."""
    from dogkit.runs import run_lock

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; from pathlib import Path; "
                               "from dogkit.runs import run_lock\nwith run_lock(Path(sys.argv[1])):\n"
                               "    worker = os.fork()\n    if worker == 0:\n        time.sleep(60)\n"
                               "    print(worker, flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, RANK="0"))
    worker = int(holder.stdout.readline())
    holder.kill()
    holder.wait()
    try:
        os.kill(worker, 0)  # the worker still runs, the file still open in it
        with run_lock(run):
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_run_being_trained_cannot_be_resumed_by_a_second_process(tmp_path: Path):
    from dogkit.training.config import TrainConfig
    from dogkit.training.trainer import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig(data=str(tmp_path / "nowhere")).to_dict()))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from dogkit.runs import run_lock\nwith run_lock(Path(sys.argv[1])):\n"
                               "    print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, RANK="0"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DogkitError, match=f"is being trained by process {holder.pid} right now"):
            train(resume=run)
    finally:
        holder.kill()
        holder.wait()
    # The lock goes with its process: now the resume gets past it (and stops at the missing dataset).
    with pytest.raises(DogkitError, match="no prepared dataset"):
        train(resume=run)


# ----------------------------------------------------------------------------- the command line


BAD_OPTIONS = [
    (["train", "--lr", "nan"], "lr must be a finite number"),
    (["train", "--device", "tpu"], "device must be auto, cpu, cuda"),
    (["train", "--image-size", "100000"], "image_size must be between 32 and 2048"),
    (["train", "--image-size", "7"], "image_size must be between 32 and 2048"),
    (["train", "--batch-size", "0"], "batch_size must be at least 1"),
    (["train", "--devices", "0"], "Invalid value for '--devices'"),  # the wording is Typer's own
    (["train", "--set", "dropout=1.5"], "dropout must be a finite number"),
    (["prepare", "--ratios", "nan/15/15"], "--ratios: must be three numbers"),
    (["prepare", "--ratios", "70/15/20"], "add up to 100"),
    (["prepare", "--ratios", "100/0/0"], "every share must be above 0"),
    (["prepare", "--cache", "-5"], "'--cache': must be a whole number of at least 16, got -5"),
    (["prepare", "--workers", "0"], "'--workers': must be a whole number of at least 1, got 0"),
    (["bench", "--batch-sizes", "abc"], "'--batch-sizes'"),
    (["bench", "--batch-sizes", "0"], "'--batch-sizes'"),
    (["export", "--parity-images", "0"], "'--parity-images': must be a whole number of at least 1"),
    (["export", "--max-drop", "2"], "'--max-drop': must be a number in [0, 1], got 2.0"),
    (["export", "--target-precision", "0"], "'--target-precision': must be a number in (0, 1]"),
    (["export", "--atol", "nan"], "'--atol': must be a positive finite number"),
    (["predict", "x.jpg", "--explain-top-k", "2"], "'--explain-top-k': needs explain"),
    (["predict", "x.jpg", "--min-confidence", "1.5"], "'--min-confidence': must be a number in [0, 1]"),
    (["bench", "--min-runs", "0"], "'--min-runs': must be a whole number of at least 1"),
    (["bench", "--min-time", "inf"], "'--min-time': must be a number in [0, 3600]"),
    (["serve", "--timeout", "0"], "'--timeout': must be a positive finite number"),
    (["serve", "--max-images", "300"], "'--max-images': cannot exceed max_queue (256), got 300"),
    (["serve", "--keep-alive", "-1"], "'--keep-alive': must be a positive finite number"),
    (["report", "--resamples", "0"], "'--resamples': must be a whole number of at least 1"),
    (["predict", "x.jpg", "--top-k", "-1"], "'--top-k': must be a whole number of at least 1"),
    (["predict", "x.jpg", "--top-k", "0"], "'--top-k': must be a whole number of at least 1"),
    (["predict", "x.jpg", "--batch-size", "0"], "'--batch-size': must be a whole number of at least 1"),
    (["predict", "x.jpg", "--device", "tpu"], "'--device': must be one of cpu, cuda"),
    (["eval", "--split", "dev"], "'--split': must be one of train, val, test"),
    (["eval", "--device", "tpu"], "'--device': must be cpu or cuda with the onnx backend"),
    (["eval", "--backend", "torch", "--device", "tpu"], "'--device': must be cpu, cuda, cuda:N or auto"),
    (["train", "--runs-dir", "/dev/null"], "/dev/null exists and is not a folder"),
    (["study", "--budget", "huge"], "'--budget': must be one of full, quick"),
    (["study", "--seeds", "0,one"], "'--seeds': takes comma-separated whole numbers, got '0,one'"),
    (["study", "--seeds=-1"], "'--seeds': takes whole numbers from 0 to 2147483647"),
    (["study", "--seeds", ","], "'--seeds': takes whole numbers from 0 to 2147483647"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_values_are_one_line_and_exit_2(args: list[str], message: str, capsys, tmp_path: Path,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and message in one_error_line(err)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_each_setting_the_other_commands_check_is_named_as_their_option():
    """The CLI checks no value itself: each command's settings dataclass does, and a refusal names the field. Every
    such field is an option of that command under the name the CLI gives it (`dogkit.cli._option`), except the
    few that only a library caller sets."""
    import dataclasses

    import typer.main

    from dogkit.analysis.evaluate import EvalSettings
    from dogkit.analysis.report import ReportSettings
    from dogkit.cli import _option, app
    from dogkit.data.prepare import PrepareConfig
    from dogkit.deploy.bench import BenchSettings
    from dogkit.deploy.predict import PredictSettings
    from dogkit.deploy.serve import Address, ServeConfig
    from dogkit.study import StudySettings
    from dogkit.training.export import ExportSettings

    library_only = {"top_k", "max_client_connections"}  # serve's: a query parameter's default, half the connections
    commands = typer.main.get_command(app).commands
    for name, dataclass in (("prepare", PrepareConfig), ("export", ExportSettings), ("predict", PredictSettings),
                            ("eval", EvalSettings), ("bench", BenchSettings), ("serve", ServeConfig),
                            ("serve", Address), ("report", ReportSettings), ("study", StudySettings)):
        options = {flag for p in commands[name].params for flag in p.opts}
        fields = {f.name for f in dataclasses.fields(dataclass)} - (library_only if name == "serve" else set())
        assert {f: _option(f) for f in fields if _option(f) not in options} == {}, name


def test_a_library_caller_gets_the_refusal_the_command_line_gives(tmp_path: Path):
    """The checks live in the settings dataclasses, so a notebook is refused as the CLI is: before any model or
    image is looked for, naming the field."""
    import pytest

    from dogkit.deploy.bench import BenchSettings
    from dogkit.deploy.predict import PredictSettings, predict_inputs
    from dogkit.deploy.serve import ServeConfig
    from dogkit.settings import SettingError

    with pytest.raises(SettingError, match=r"^top_k: must be a whole number of at least 1, got 0$") as info:
        predict_inputs(["no-such.jpg"], tmp_path / "no-such.onnx", top_k=0)
    assert info.value.setting == "top_k"
    for bad in ({"top_k": 2.5}, {"batch_size": True}, {"min_confidence": float("nan")}, {"out": tmp_path / "p.txt"}):
        with pytest.raises(SettingError, match=f"^{next(iter(bad))}: "):
            PredictSettings(**bad)
    with pytest.raises(SettingError, match=r"^max_client_connections: must be a whole number of at least 1"):
        ServeConfig(max_client_connections=0)
    with pytest.raises(SettingError, match=r"^batch_sizes: must be whole numbers of at least 1, got 2\.5$"):
        BenchSettings(batch_sizes=(1, 2.5))
    assert PredictSettings(out=tmp_path / "p.CSV").out == tmp_path / "p.CSV"


def test_out_that_is_a_file_or_read_only_is_refused_before_any_work(tmp_path: Path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "prepare", "--out", str(tmp_path / "file"))
    assert code == 2 and "exists and is not a folder" in one_error_line(err)
    code, _, err = run_cli(capsys, "predict", "x.jpg", "--out", str(tmp_path))
    assert code == 2 and "must end in .csv or .json" in one_error_line(err)
    # A read-only folder (simulated: root writes anywhere) is found by trying to create a file in it.
    real_mkstemp = __import__("tempfile").mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path / "ro":
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr("dogkit.atomic.tempfile.mkstemp", read_only)
    code, _, err = run_cli(capsys, "prepare", "--out", str(tmp_path / "ro" / "data"))
    assert code == 2 and "cannot write in" in one_error_line(err) and "Permission denied" in err
    code, _, err = run_cli(capsys, "report", "--out", str(tmp_path / "ro"))
    assert code == 2 and "cannot write in" in one_error_line(err)


def test_damaged_run_folders_and_foreign_checkpoints_are_one_line(tmp_path: Path, capsys):
    torch = pytest.importorskip("torch")
    from torchvision.models import resnet18

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"exp": 1, "lr": ')
    code, _, err = run_cli(capsys, "train", "--resume", str(run))
    assert code == 2 and "cannot read" in one_error_line(err) and "config.json" in err
    torch.save(resnet18().state_dict(), run / "best.pt")
    code, _, err = run_cli(capsys, "export", str(run))
    line = one_error_line(err)
    assert code == 2 and "is not a dogkit checkpoint" in line and "plain state dict" in line


BLOCK_TRAIN_EXTRA = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "albumentations", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
from dogkit.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("args", [["eval", "--backend", "torch", "--run", "RUN", "--data", "RUN"],
                                  ["study", "--budget", "quick", "--data", "RUN"]])
def test_commands_without_the_train_extra_say_which_install_brings_it(args: list[str], tmp_path: Path):
    args = [str(tmp_path) if a == "RUN" else a for a in args]
    proc = subprocess.run([sys.executable, "-c", BLOCK_TRAIN_EXTRA, *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "[train] extra" in line and "pip install -e '.[train]'" in line  # brackets survive Rich


def test_ctrl_c_and_unexpected_errors_are_one_line(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("dogkit.data.prepare.prepare", interrupted)
    code, _, err = run_cli(capsys, "prepare", "--source", str(tmp_path))
    assert code == 130 and "interrupted" in err and "Aborted" not in err

    def bug(cfg):
        raise RuntimeError("a bug\nspanning lines")

    monkeypatch.setattr("dogkit.data.prepare.prepare", bug)
    code, _, err = run_cli(capsys, "prepare", "--source", str(tmp_path))
    line = one_error_line(err)
    assert code == 1 and "unexpected RuntimeError: spanning lines" in line and "full traceback in" in line
    log = Path(line.split("full traceback in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "a bug" in log.read_text()
    with pytest.raises(RuntimeError, match="a bug"):  # --debug: the traceback itself
        main(["--debug", "prepare", "--source", str(tmp_path)])

    # How a DataLoader worker's error reaches the main process:
    worker_failure = ImageError("Caught ImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                                "call last):\n  File \"x.py\", line 1\ndogkit.data.images.ImageError: /data/a[b].jpg: "
                                "empty file\n")
    assert prepare_failing(worker_failure, tmp_path, capsys, monkeypatch) == (2, "error: /data/a[b].jpg: empty file")


def prepare_failing(error: Exception, tmp_path: Path, capsys, monkeypatch) -> tuple[int, str]:
    """The exit code and error line of `dogkit prepare` when it raises ``error``."""
    def fails(cfg):
        raise error

    monkeypatch.setattr("dogkit.data.prepare.prepare", fails)
    code, _, err = run_cli(capsys, "prepare", "--source", str(tmp_path))
    return code, one_error_line(err)


def test_our_multi_line_messages_are_kept_whole_on_one_line(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    ours = DogkitError("class 'toy\npoodle' has 2 images\nit needs at least 5: add images or drop the class")
    assert prepare_failing(ours, tmp_path, capsys, monkeypatch) == (
        2, "error: class 'toy · poodle' has 2 images · it needs at least 5: add images or drop the class")
    # A DogkitError re-raised from a DataLoader worker: the original error, not the traceback.
    worker = DogkitError("Caught DogkitError in DataLoader worker process 1.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1\ndogkit.errors.DogkitError: cannot read manifest m.csv\n")
    assert prepare_failing(worker, tmp_path, capsys, monkeypatch) == (
        2, "error: dogkit.errors.DogkitError: cannot read manifest m.csv")


def test_a_malformed_config_names_the_file_line_and_column(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\navg_ema: [0.9, 0.99\nepochs: 3\n")
    code, _, err = run_cli(capsys, "train", "--exp", "1", "--config", str(bad))
    assert code == 2 and one_error_line(err) == (f"error: cannot read config {bad}: expected ',' or ']', but got "
                                                 "':' at line 3, column 7")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def _bad_weights(folder: Path) -> dict[str, str]:
    """Files that are no state dict dogkit can load safely, and what the error line must say about each."""
    import datetime

    torch = pytest.importorskip("torch")
    from torchvision.models import resnet18

    torch.save({"saved": datetime.datetime(2024, 1, 1)}, folder / "pickled.pt")  # needs weights_only=False
    (folder / "garbage\x1b[31m.pt").write_bytes(bytes(range(7, 256)) * 4)
    (folder / "empty.pt").write_bytes(b"")
    (folder / "notes.txt").write_text("lr 1e-4, 15 epochs\n")
    state = resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)  # another network's first layer: a size mismatch
    torch.save(state, folder / "other.pth")
    return {"pickled.pt": "holds more than tensors and plain containers: Unsupported global: GLOBAL "
                          "datetime.datetime was not an allowed global by default)",
            "garbage\x1b[31m.pt": "it was not saved by PyTorch)", "empty.pt": "the file is empty)",
            "notes.txt": "it was not saved by PyTorch)", "other.pth": "wrong shape: conv1.weight"}


def test_bad_weights_files_are_one_line_naming_the_file(prepared_sample: Path, tmp_path: Path, capsys):
    for name, cause in _bad_weights(tmp_path).items():
        code, _, err = run_cli(capsys, "train", "--exp", "1", "--arch", "resnet18", "--data", str(prepared_sample),
                               "--runs-dir", str(tmp_path / "runs"), "--weights", str(tmp_path / name))
        line = one_error_line(err)
        assert code == 2 and shown(tmp_path / name) in line and line.endswith(cause), line
        assert "weights_only" not in line and "\x1b" not in line
        if name != "other.pth":
            assert "not a state dict or checkpoint dogkit can load safely" in line
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("args", [["--name", "../../outside"], ["--name", "a/b"], ["--name", ".."], ["--name", ""],
                                  ["--name", "red\x1b[31m"], ["--set", "name=../outside"]])
def test_a_run_name_that_is_not_one_plain_folder_is_refused(args: list[str], tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    code, _, err = run_cli(capsys, "train", "--exp", "1", "--runs-dir", str(tmp_path / "deep" / "er" / "runs"),
                           "--data", str(tmp_path / "nowhere"), *args)
    line = one_error_line(err)
    assert code == 2 and "must be" in line and "\x1b" not in line, line
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")] == ["deep", "deep/er"]  # nothing written


def test_new_run_dir_refuses_a_name_with_a_path_in_it(tmp_path: Path):
    from dogkit.runs import new_run_dir

    with pytest.raises(DogkitError, match="one folder name inside --runs-dir"):
        new_run_dir(tmp_path / "runs", name="../x", exp=1, arch="resnet50")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_an_interrupted_command_says_only_what_is_true_of_it(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dogkit.data.prepare.prepare", interrupted)
    code, _, err = run_cli(capsys, "prepare", "--source", str(tmp_path))
    assert code == 130 and "resumes a cut download" in err
    monkeypatch.setattr("dogkit.analysis.evaluate.evaluate", interrupted)
    code, _, err = run_cli(capsys, "eval", "--data", str(tmp_path))
    assert code == 130 and err.strip() == "interrupted (Ctrl-C)"  # nothing kept that a second run would use


TINY_TRAIN = ["train", "--exp", "3", "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
              "--set", "max_steps_per_epoch=1", "--set", "amp=off", "--set", "workers=0"]


def test_an_interrupted_train_names_the_command_that_resumes_it(prepared_sample: Path, tmp_path: Path, capsys,
                                                                  monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr("dogkit.training.trainer.Trainer.run", interrupted)
    runs = tmp_path / "my runs"
    code, _, err = run_cli(capsys, *TINY_TRAIN, "--data", str(prepared_sample), "--runs-dir", str(runs))
    run = runs / "exp3-resnet18"
    expected = f"`dogkit train --resume '{run}'` continues it"
    assert code == 130 and err.strip().splitlines()[-1] == f"interrupted (Ctrl-C); {expected}", err
    assert (run / "run.log").read_text().splitlines()[-1].endswith(f"interrupted (Ctrl-C); {expected}")
    code, _, err = run_cli(capsys, "train", "--resume", str(run))  # the command said: it does resume this run
    assert code == 130 and err.strip().splitlines()[-1] == f"interrupted (Ctrl-C); {expected}"
    assert "resuming" not in (run / "run.log").read_text() and sorted(p.name for p in runs.iterdir()) == [run.name]


def test_a_class_named_with_escape_sequences_is_shown_escaped(tmp_path: Path, capsys):
    """``prepare`` refuses such class folders; a dataset made otherwise (its classes.json edited) still never
    puts the sequences on the terminal, in run.log or in the report."""
    from dogkit.analysis.report import report
    from dogkit.data.dataset import load_dataset
    from dogkit.data.prepare import PrepareConfig, prepare

    red, bad_file = "\x1b[31mred", "\x1b[31m0.jpg"
    for k, name in enumerate(("red", "blue")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(6):
            file = bad_file if (name, i) == ("red", 0) else f"{i}.jpg"
            (tmp_path / "src" / name / file).write_bytes(encode(pattern(seed=10 * k + i), "JPEG"))
    prepare(PrepareConfig(sources=[tmp_path / "src"], out=tmp_path / "data"))
    classes_json = tmp_path / "data" / "classes.json"
    classes = json.loads(classes_json.read_text())
    classes[[c["name"] for c in classes].index("red")]["name"] = red
    classes_json.write_text(json.dumps(classes))
    assert red in load_dataset(tmp_path / "data").class_names
    args = [*TINY_TRAIN, "--data", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs")]
    code, _, err = run_cli(capsys, *args, "--name", "ok")
    assert code == 0, err
    assert "\x1b" not in err
    text = report([tmp_path / "runs" / "ok"], tmp_path / "report", resamples=20).read_text()
    assert "\\\\x1b\\[31mred" in text and "\x1b" not in text  # shown, then escaped for Markdown
    # An image gone bad after prepare, its name holding an escape sequence: train's error line and run.log
    # name it, escaped.
    (tmp_path / "src" / "red" / bad_file).write_bytes(b"")
    capsys.readouterr()
    code, _, err = run_cli(capsys, *args, "--name", "broken")
    line = err.strip().splitlines()[-1]
    assert code == 2 and line == f"error: {shown(tmp_path / 'src' / 'red' / bad_file)}: empty file", err
    assert "\x1b" not in err and "Traceback" not in err
    last = (tmp_path / "runs" / "broken" / "run.log").read_text().splitlines()[-1]
    assert "red/\\x1b[31m0.jpg" in last and "\x1b" not in last and "empty file" in last


# ----------------------------------------------------------------------------- property-based

MAGIC = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8X",
         b"II*\x00", b"MM\x00*"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MAGIC), st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_image_error(magic: bytes, tail: bytes):
    data = magic + tail
    for fmt in ("png", "jpeg", "gif", "bmp", "webp", "tiff"):
        size = header_size(data, fmt)
        assert size is None or all(isinstance(v, int) and v >= 0 for v in size)
    try:
        image = decode_rgb(data)
    except ImageError as e:
        assert e.reason and "\n" not in e.reason
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] * image.shape[1] <= 50_000_000


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_random_ratios_are_fractions_or_a_clear_error(text: str):
    try:
        ratios = parse_ratios(text)
    except DogkitError as e:
        assert str(e).startswith("--ratios")
    else:
        assert len(ratios) == 3 and all(r > 0 for r in ratios) and abs(sum(ratios) - 1) < 1e-9


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(["--ratios", "--cache", "--seed", "--workers", "--split", "--crop"]),
       value=st.one_of(st.text(max_size=12), st.integers(-10**12, 10**12).map(str),
                       st.floats(allow_nan=True, allow_infinity=True).map(str)))
def test_random_prepare_options_end_in_one_line(option: str, value: str, capsys, tmp_path: Path):
    if value.startswith("-") and not value.lstrip("-").replace(".", "").isdigit():
        value = "x" + value  # a value starting with "-" would be read as an option name
    try:
        main(["prepare", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), option, value])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "out").exists()


def test_read_rgb_names_the_file(tmp_path: Path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=f"{path}: empty file"):
        read_rgb(path)


OPENCV_CAP = """
import sys
sys.path.insert(0, sys.argv[1])
import dogkit.data.images as images
from imagegen import png_of_zeros
images.header_size = lambda data, fmt: None  # as for a format whose header dogkit does not parse
try:
    images.decode_rgb(png_of_zeros(8000, 7000))
except images.ImageError as e:
    print(e.reason)
"""


def test_opencv_pixel_cap_backs_up_the_header_check():
    proc = subprocess.run([sys.executable, "-c", OPENCV_CAP, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("undecodable PNG data"), proc.stdout + proc.stderr
