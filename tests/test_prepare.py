import csv
import json
import os
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from imagegen import encode, pattern

from dogkit.data.cache import ImageCache, build_cache
from dogkit.data.dataset import load_dataset
from dogkit.data.prepare import PrepareConfig, prepare
from dogkit.errors import DogkitError


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def make_tree(root: Path, classes: dict[str, int], size=(40, 56)) -> Path:
    for k, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / name / f"img{i}.jpg").write_bytes(encode(pattern(*size, seed=100 * k + i), "JPEG"))
    return root


def test_real_sample_gives_stratified_disjoint_70_15_15(prepared_sample: Path, sample_dir: Path):
    rows = read_csv(prepared_sample / "manifest.csv")
    assert len(rows) == 960
    assert len({r["path"] for r in rows}) == 960  # each image in exactly one split
    per_class = defaultdict(Counter)
    for r in rows:
        per_class[r["class_name"]][r["split"]] += 1
    assert len(per_class) == 120
    for counts in per_class.values():
        assert (counts["train"], counts["val"], counts["test"]) == (6, 1, 1)  # 5.6/1.2/1.2 by largest remainder
    info = json.loads((prepared_sample / "dataset.json").read_text())
    assert info["counts"] == {"train": 720, "val": 120, "test": 120, "total": 960}
    assert info["rejects"] == {} and info["duplicate_groups"] == 0
    classes = json.loads((prepared_sample / "classes.json").read_text())
    assert classes[0] == {"index": 0, "name": "Chihuahua", "folder": "n02085620-Chihuahua"}
    assert [c["index"] for c in classes] == list(range(120))
    # Sizes and content hashes agree with the sample's own manifest (sha1 there, sha256 here: check sizes).
    theirs = {r["image"].removeprefix("Images/"): r for r in read_csv(sample_dir / "manifest.csv")}
    for r in rows:
        theirs_row = theirs[r["path"]]
        assert (int(r["width"]), int(r["height"])) == (int(theirs_row["width"]), int(theirs_row["height"]))


def test_boxes_come_from_the_xml_including_percent_s_files(prepared_sample: Path):
    rows = {r["path"]: r for r in read_csv(prepared_sample / "manifest.csv")}
    assert all(r["boxes"] for r in rows.values())
    # A box-crop breed: its derived XML makes the first box the whole 224x224 frame.
    crops = [r for p, r in rows.items() if p.startswith("n02091032-Italian_greyhound/")]
    assert crops and all(r["boxes"].split(";")[0] == "0 0 224 224" for r in crops)
    # Breeds whose official XML has a literal %s in <filename> still get their boxes.
    foxhound = [r for p, r in rows.items() if p.startswith("n02089973-English_foxhound/")]
    assert len(foxhound) == 8 and all(r["boxes"] for r in foxhound)
    for r in rows.values():
        for box in r["boxes"].split(";"):
            x0, y0, x1, y1 = map(int, box.split())
            assert 0 <= x0 < x1 <= int(r["width"]) and 0 <= y0 < y1 <= int(r["height"])


def test_same_inputs_and_seed_give_byte_identical_manifest(sample_dir: Path, prepared_sample: Path, tmp_path: Path):
    again = tmp_path / "again"
    prepare(PrepareConfig(sources=[sample_dir], out=again))
    assert (again / "manifest.csv").read_bytes() == (prepared_sample / "manifest.csv").read_bytes()
    assert (again / "classes.json").read_bytes() == (prepared_sample / "classes.json").read_bytes()
    other = tmp_path / "other-seed"
    shutil.copy(again / "scan.csv", tmp_path / "scan.csv")
    prepare(PrepareConfig(sources=[sample_dir], out=other, seed=1))
    a, b = read_csv(again / "manifest.csv"), read_csv(other / "manifest.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert sum(x["split"] != y["split"] for x, y in zip(a, b)) > 100


def test_bad_files_are_rejected_with_reasons_and_the_run_succeeds(sample_copy: Path, tmp_path: Path):
    images = sample_copy / "Images"
    chihuahua, pug = images / "n02085620-Chihuahua", images / "n02110958-pug"
    victim = sorted(chihuahua.glob("*.jpg"))[0]
    data = victim.read_bytes()
    (chihuahua / "cut.jpg").write_bytes(data[: len(data) // 2])
    (chihuahua / "zero.jpg").write_bytes(b"")
    (chihuahua / "notes.jpg").write_text("not a picture\n")
    (chihuahua / "really_png.jpg").write_bytes(encode(pattern(seed=1), "PNG"))
    (chihuahua / "gray.jpg").write_bytes(encode(pattern(seed=2), "JPEG", mode="L"))
    (chihuahua / "cmyk.jpg").write_bytes(encode(pattern(seed=3), "JPEG", mode="CMYK"))
    (chihuahua / "alpha.png").write_bytes(encode(np.dstack([pattern(seed=4), np.full((48, 64), 200, np.uint8)]), "PNG"))
    (chihuahua / "copy_of_first.jpg").write_bytes(data)  # same class: one of the pair is kept
    shared = sorted(pug.glob("*.jpg"))[0]
    (chihuahua / "zz_pug_also_here.jpg").write_bytes(shared.read_bytes())  # across classes: both excluded
    (images / ".DS_Store").write_bytes(b"junk")

    out = tmp_path / "out"
    result = prepare(PrepareConfig(sources=[sample_copy], out=out))

    rejects = {r["path"]: r["reason"] for r in read_csv(out / "rejects.csv")}
    ch = "n02085620-Chihuahua/"
    assert rejects[ch + "cut.jpg"] == "truncated JPEG (no end-of-image marker)"
    assert rejects[ch + "zero.jpg"] == "empty file"
    assert rejects[ch + "notes.jpg"] == "not an image (unrecognised file format)"
    kept_dup, dropped_dup = sorted([ch + "copy_of_first.jpg", ch + victim.name])
    assert rejects[dropped_dup] == f"duplicate of {kept_dup}"
    assert rejects[ch + "zz_pug_also_here.jpg"].startswith("identical image in several classes")
    assert rejects["n02110958-pug/" + shared.name].startswith("identical image in several classes")
    assert len(rejects) == 6

    rows = {r["path"]: r for r in read_csv(out / "manifest.csv")}
    assert rows[ch + "really_png.jpg"]["format"] == "png"
    for name in ("gray.jpg", "cmyk.jpg", "alpha.png", "really_png.jpg"):
        assert ch + name in rows
    assert kept_dup in rows and dropped_dup not in rows
    # 960 sample images + 4 odd-but-valid files; the pug picture now lives in two classes and leaves both.
    assert len(rows) == 960 + 4 - 1
    assert result.counts["total"] == len(rows)
    assert result.rejects == {"duplicate": 1, "empty file": 1, "identical image in several classes": 2,
                              "not an image (unrecognised file format)": 1,
                              "truncated JPEG (no end-of-image marker)": 1}
    dataset = load_dataset(out)
    for name in ("gray.jpg", "cmyk.jpg", "alpha.png"):
        rec = next(r for r in dataset.records if r.path == ch + name)
        assert dataset.load_rgb(rec).shape == (48, 64, 3)


def test_rerun_is_a_no_op_and_a_changed_file_is_the_only_one_rescanned(tmp_path: Path):
    src = make_tree(tmp_path / "src", {"a": 6, "b": 6})
    out = tmp_path / "out"
    first = prepare(PrepareConfig(sources=[src], out=out))
    assert first.scanned == 12 and not first.up_to_date
    manifest = (out / "manifest.csv").read_bytes()
    second = prepare(PrepareConfig(sources=[src], out=out))
    assert second.up_to_date and second.scanned == 0
    (src / "a" / "img0.jpg").write_bytes(encode(pattern(seed=999), "JPEG"))
    third = prepare(PrepareConfig(sources=[src], out=out))
    assert not third.up_to_date and third.scanned == 1
    assert (out / "manifest.csv").read_bytes() != manifest  # the content hash changed
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_any_class_folder_dataset_and_archives_work(tmp_path: Path):
    src = make_tree(tmp_path / "cars" / "train", {"audi_a4": 7, "bmw_m3": 5, "volvo_240": 9})
    archive = tmp_path / "cars.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cars", arcname="cars")
    out = tmp_path / "out"
    result = prepare(PrepareConfig(sources=[archive], out=out))
    assert result.classes == 3 and result.counts["total"] == 21
    classes = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in classes] == ["audi_a4", "bmw_m3", "volvo_240"]
    rows = read_csv(out / "manifest.csv")
    counts = Counter((r["class_name"], r["split"]) for r in rows)
    assert (counts["bmw_m3", "train"], counts["bmw_m3", "val"], counts["bmw_m3", "test"]) == (3, 1, 1)
    assert (counts["volvo_240", "train"], counts["volvo_240", "val"], counts["volvo_240", "test"]) == (6, 2, 1)
    assert all(r["boxes"] == "" for r in rows)
    # The same tree given as a folder yields the same manifest.
    direct = tmp_path / "direct"
    prepare(PrepareConfig(sources=[src], out=direct))
    assert (direct / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()


@pytest.mark.parametrize(
    ("classes", "message"),
    [({}, "no class folders"), ({"only": 6}, "only one class folder"), ({"a": 6, "b": 0}, "empty class folder")],
)
def test_unusable_datasets_are_clear_errors(tmp_path: Path, classes, message):
    src = make_tree(tmp_path / "src", classes)
    src.mkdir(exist_ok=True)
    with pytest.raises(DogkitError, match=message):
        prepare(PrepareConfig(sources=[src], out=tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_class_with_only_broken_images_is_an_error_with_rejects_written(tmp_path: Path):
    src = make_tree(tmp_path / "src", {"a": 6, "b": 6})
    for f in (src / "b").iterdir():
        f.write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(DogkitError, match="no usable image"):
        prepare(PrepareConfig(sources=[src], out=out))
    assert len(read_csv(out / "rejects.csv")) == 6


def test_official_split_honours_the_lists(tmp_path: Path):
    from scipy.io import savemat

    root = tmp_path / "stanford"
    make_tree(root / "Images", {"n00000001-Akita": 10, "n00000002-Basenji": 10})
    files = sorted(p.relative_to(root / "Images").as_posix() for p in (root / "Images").rglob("*.jpg"))
    test_files = [f for f in files if f.endswith(("img0.jpg", "img1.jpg", "img2.jpg"))]
    train_files = [f for f in files if f not in test_files]

    def cell(names):
        arr = np.empty((len(names), 1), dtype=object)
        for i, n in enumerate(names):
            arr[i, 0] = np.array([n])
        return arr

    savemat(root / "train_list.mat", {"file_list": cell(train_files)})
    savemat(root / "test_list.mat", {"file_list": cell(test_files)})
    out = tmp_path / "out"
    prepare(PrepareConfig(sources=[root], out=out, split="official"))
    rows = read_csv(out / "manifest.csv")
    assert {r["path"] for r in rows if r["split"] == "test"} == set(test_files)
    # 7 official training images per class, carved 70:15 → 6 train + 1 val.
    per = Counter((r["class_name"], r["split"]) for r in rows)
    assert per["Akita", "train"] == 6 and per["Akita", "val"] == 1 and per["Basenji", "test"] == 3


def test_cache_holds_resized_box_crops_and_is_rebuilt_when_stale(prepared_sample: Path, tmp_path: Path):
    out = tmp_path / "ds"
    shutil.copytree(prepared_sample, out)
    dataset = load_dataset(out)
    info = build_cache(dataset, 64, "boxes")
    assert info.built and info.images == 960
    cache = ImageCache(dataset, 64, "boxes")
    for i in (0, 500, 959):
        rec = dataset.records[i]
        crop = dataset.load_rgb(rec, "boxes")
        got = cache[i]
        assert min(got.shape[:2]) == min(64, *crop.shape[:2])
        # The very pixels: the box crop, shorter side shrunk to 64 with INTER_AREA (not another row, box or filter).
        h, w = crop.shape[:2]
        size = (w, h) if min(h, w) <= 64 else (round(w * 64 / min(h, w)), round(h * 64 / min(h, w)))
        np.testing.assert_array_equal(got, cv2.resize(crop, size, interpolation=cv2.INTER_AREA))
        assert not np.array_equal(got, cv2.resize(crop, size, interpolation=cv2.INTER_LINEAR))
    assert not build_cache(dataset, 64, "boxes").built  # current: reused
    # A hand-edited manifest (dataset.json unchanged) is another manifest: the cache is keyed by what was read.
    manifest = out / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",val,", ",test,", 1))
    dataset = load_dataset(out)
    assert dataset.manifest_sha256 != dataset.info["manifest_sha256"]
    with pytest.raises(DogkitError, match="no current image cache"):
        ImageCache(dataset, 64, "boxes")
    assert build_cache(dataset, 64, "boxes").built
    assert sorted(os.listdir(out / "cache")) == ["64px-boxes"]  # no temp folders left


def test_phone_photos_are_turned_upright_with_their_boxes_and_cached_so(tmp_path: Path):
    from imagegen import exif_jpeg

    from dogkit.data.annotations import Box
    from dogkit.data.dataset import Record
    from dogkit.data.images import read_rgb

    src = make_tree(tmp_path / "src", {"a": 6, "b": 6}, size=(40, 56))
    stored = pattern(40, 56, seed=7)  # 56 wide, 40 high, as the sensor wrote it
    (src / "a" / "phone.jpg").write_bytes(exif_jpeg(stored, 6))  # held upright: shown 40 wide, 56 high
    out = tmp_path / "out"
    prepare(PrepareConfig(sources=[src], out=out, cache_size=32))
    dataset = load_dataset(out)
    assert dataset.orients and dataset.info["exif_orientation"] == "apply"
    rec = next(r for r in dataset.records if r.path.endswith("phone.jpg"))
    assert (rec.width, rec.height, rec.orientation) == (56, 40, 6)  # the manifest keeps the stored frame
    upright = dataset.load_rgb(rec)
    np.testing.assert_array_equal(upright, read_rgb(src / "a" / "phone.jpg", orientation=True))
    assert upright.shape == (56, 40, 3)
    assert dataset.load_rgb(rec, orientation=False).shape == (40, 56, 3)
    # The cache holds it upright too: 32 on the shorter side, 45 high.
    cache = ImageCache(dataset, 32)
    row = dataset.records.index(rec)
    assert cache[row].shape == (45, 32, 3)
    # A box (stored frame) is cut out and turned with the image: it is the same pixels as the box turned by
    # hand (90° clockwise: x' = H − y, y' = x) cut from the upright photo.
    boxed = Record(rec.path, rec.label, rec.class_name, rec.split, 56, 40, (Box(10, 5, 30, 25),), rec.sha256,
                   rec.format, 6)
    x0, y0, x1, y1 = 40 - 25, 10, 40 - 5, 30
    np.testing.assert_array_equal(dataset.load_rgb(boxed, "boxes"), upright[y0:y1, x0:x1])


# ----------------------------------------------------------------------------- names, layouts and options


def test_a_file_name_that_is_not_utf8_is_a_reject_and_the_dataset_is_made(tmp_path: Path):
    src = make_tree(tmp_path / "src", {"cats": 6, "dogs": 6})
    odd = src / "cats" / os.fsdecode(b"\xff\xfe.jpg")  # Latin-1 or random bytes, as old archives hold them
    odd.write_bytes(encode(pattern(seed=999), "JPEG"))
    out = tmp_path / "out"
    result = prepare(PrepareConfig(sources=[src], out=out))
    assert result.counts["total"] == 12
    assert read_csv(out / "rejects.csv") == [{"path": "cats/\\xff\\xfe.jpg", "class_folder": "cats",
                                              "reason": "file name is not valid UTF-8; rename it"}]
    assert prepare(PrepareConfig(sources=[src], out=out)).up_to_date
    odd.rename(src / "cats" / "renamed.jpg")  # renamed as told: taken in, and no longer a reject
    assert prepare(PrepareConfig(sources=[src], out=out)).counts["total"] == 13
    assert read_csv(out / "rejects.csv") == []


@pytest.mark.parametrize(("folder", "escaped", "why"), [
    (os.fsdecode(b"caf\xe9"), "caf\\xe9", "not valid UTF-8"),
    ("red\x1b[31m", "red\\x1b[31m", "control characters"),
    ("two\nlines", "two\\nlines", "control characters"),
    ("gpj.\u202eevil", "gpj.\\u202eevil", "control characters"),
])
def test_class_folder_names_that_cannot_be_class_names_are_refused_in_one_line(tmp_path: Path, folder: str,
                                                                                escaped: str, why: str):
    src = make_tree(tmp_path / "src", {"cats": 6, folder: 6})
    with pytest.raises(DogkitError) as info:
        prepare(PrepareConfig(sources=[src], out=tmp_path / "out"))
    message = str(info.value)
    assert f"'{escaped}' ({why})" in message and "Rename them" in message
    assert message.isprintable() and message.encode("utf-8")  # one line, nothing for a terminal to obey
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("wrapped", [False, True])
def test_out_inside_source_gives_the_same_dataset_again(tmp_path: Path, wrapped: bool):
    src = tmp_path / "src"
    make_tree(src / "wrapper" if wrapped else src, {"cats": 6, "dogs": 6})
    out = src / "prepared"
    first = prepare(PrepareConfig(sources=[src], out=out))
    manifest = (out / "manifest.csv").read_bytes()
    again = prepare(PrepareConfig(sources=[src], out=out))
    assert again.up_to_date and again.classes == first.classes == 2
    forced = prepare(PrepareConfig(sources=[src], out=out, force=True))
    assert forced.counts == first.counts and (out / "manifest.csv").read_bytes() == manifest
    # A dataset prepared elsewhere and copied into the source is no class either.
    shutil.copytree(out, src / "old-copy", ignore=shutil.ignore_patterns("cache"))
    other = prepare(PrepareConfig(sources=[src], out=tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "manifest.csv").read_bytes() == manifest and other.classes == 2


@pytest.mark.parametrize(("options", "message"), [
    ({"cache_size": 1}, "cache_size: must be a whole number of at least 16, got 1"),
    ({"split": "official"}, "--split official needs Stanford's train_list.mat"),
])
def test_options_that_would_fail_late_are_refused_before_anything_is_written(tmp_path: Path, options, message):
    src = make_tree(tmp_path / "src", {"cats": 6, "dogs": 6})
    with pytest.raises(DogkitError, match=message):
        prepare(PrepareConfig(sources=[src], out=tmp_path / "out", **options))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the cache on a full disk


@pytest.fixture
def small_dataset(tmp_path: Path):
    out = tmp_path / "ds"
    prepare(PrepareConfig(sources=[make_tree(tmp_path / "src", {"cats": 6, "dogs": 6})], out=out))
    return load_dataset(out)


def test_cache_without_room_is_one_line_before_anything_is_written(small_dataset, monkeypatch):
    import shutil as real_shutil

    usage = real_shutil.disk_usage(small_dataset.root)
    monkeypatch.setattr("dogkit.data.cache.shutil.disk_usage", lambda path: usage._replace(free=5 * 2**20))
    with pytest.raises(DogkitError) as info:
        build_cache(small_dataset, 32)
    message = str(info.value)
    # 12 images at 45×32 px: 51,840 bytes, plus 16 MiB left for the file system.
    assert message.startswith("the image cache needs 16 MB in ") and "but only 5 MB is free" in message
    assert str(small_dataset.root / "cache") in message and "\n" not in message
    assert os.listdir(small_dataset.root / "cache") == []


def test_cache_file_is_reserved_so_a_full_disk_is_an_error_not_sigbus(small_dataset, monkeypatch):
    import errno

    from dogkit.data.cache import _reserve

    path = small_dataset.root / "reserved.u8"
    _reserve(path, 8 * 2**20)
    assert path.stat().st_size == 8 * 2**20 and path.stat().st_blocks * 512 >= 8 * 2**20  # blocks held, not sparse
    path.unlink()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dogkit.data.cache.os.posix_fallocate", full, raising=False)
    with pytest.raises(DogkitError, match=r"cannot reserve 51 kB for the image cache in .*\(No space left on device\); "
                                          "free some space or choose a smaller --cache. Nothing was kept."):
        build_cache(small_dataset, 32)
    assert os.listdir(small_dataset.root / "cache") == []
    monkeypatch.undo()
    assert build_cache(small_dataset, 32).built


def test_a_half_built_cache_of_a_killed_process_goes_with_the_next_build(small_dataset, tmp_path: Path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    cache = small_dataset.root / "cache"
    for name in (f".32px-none.building-p{dead}-x1", ".32px-none.building-abc123"):  # this and older dogkits
        (cache / name).mkdir(parents=True)
        (cache / name / "images.u8").write_bytes(b"half")
    info = build_cache(small_dataset, 32)
    assert info.built and info.images == 12 and info.bytes == 12 * 32 * 45 * 3
    assert os.listdir(cache) == ["32px-none"]
    assert ImageCache(small_dataset, 32)[0].shape == (32, 45, 3)


# ----------------------------------------------------------------------------- a hand-edited manifest


def _edited(tmp_path: Path, edit) -> tuple[Path, list[str]]:
    src = make_tree(tmp_path / "src", {"cats": 6, "dogs": 6, "owls": 6})
    out = tmp_path / "ds"
    prepare(PrepareConfig(sources=[src], out=out))
    manifest = out / "manifest.csv"
    lines = manifest.read_text().splitlines(keepends=True)
    edit(lines, src)
    manifest.write_text("".join(lines))
    return out, lines


def _set(lines: list[str], number: int, column: str, value: str) -> None:
    """Line ``number`` (1 = the header) with ``column`` set to ``value``."""
    header = lines[0].rstrip("\n").split(",")
    cells = lines[number - 1].rstrip("\n").split(",")
    cells[header.index(column)] = value
    lines[number - 1] = ",".join(cells) + "\n"


def _split_lines(lines: list[str], split: str, label: str) -> list[int]:
    """The line numbers of ``label``'s rows in ``split``."""
    return [n for n, line in enumerate(lines, 1) if n > 1 and line.split(",")[1:4:2] == [label, split]]


def _aliases(lines: list[str], src: Path) -> None:
    """A test image listed again as a train row, its path spelled ``./x`` and ``a//x``: still the same file."""
    test = [n for n, line in enumerate(lines, 1) if n > 1 and line.split(",")[3] == "test"][:2]
    for number, spell in zip(test, (lambda p: "./" + p, lambda p: p.replace("/", "//", 1))):
        lines.append(lines[number - 1])
        _set(lines, len(lines), "path", spell(lines[number - 1].split(",")[0]))
        _set(lines, len(lines), "split", "train")


EDITS = {
    "duplicate rows": (lambda lines, src: lines.extend([lines[1], lines[5]]),
                       "lines 20, 21: a path listed on an earlier line (each image may appear once)"),
    "aliased duplicate rows": (_aliases, "lines 20, 21: a path listed on an earlier line (each image may appear once)"),
    "label out of range": (lambda lines, src: _set(lines, 3, "label", "99"),
                           "line 3: a label outside 0-2 (classes.json has 3 classes)"),
    "unknown split": (lambda lines, src: [_set(lines, n, "split", "trian") for n in (4, 7)],
                      "lines 4, 7: an unknown split ('trian'; the splits are train, val, test)"),
    "class without train": (lambda lines, src: [_set(lines, n, "split", "val")
                                                for n in _split_lines(lines, "train", "2")],
                            "1 class(es) without a training image: owls"),
    "missing file": (lambda lines, src: (src / lines[9].split(",")[0]).unlink(),
                     "line 10: no such image file in "),
    "path outside": (lambda lines, src: _set(lines, 2, "path", "../../etc/passwd"),
                     "line 2: a path outside the images folder"),
}


@pytest.mark.parametrize("kind", EDITS)
def test_a_hand_edited_manifest_is_checked_when_loaded(tmp_path: Path, kind: str):
    edit, message = EDITS[kind]
    out, _ = _edited(tmp_path, edit)
    with pytest.raises(DogkitError) as info:
        load_dataset(out)
    text = str(info.value)
    assert text.startswith(f"{out / 'manifest.csv'} is not usable: ") and message in text, text
    assert "\n" not in text and text.endswith("run `dogkit prepare --force` to write it again.")


def test_every_problem_of_a_manifest_is_in_its_one_line(tmp_path: Path):
    def edit(lines, src):
        _set(lines, 3, "label", "-1")
        _set(lines, 4, "split", "dev")
        lines.append(lines[1])

    out, _ = _edited(tmp_path, edit)
    with pytest.raises(DogkitError) as info:
        load_dataset(out)
    text = str(info.value)
    assert "line 20: a path listed on an earlier line" in text and "line 3: a label outside" in text
    assert "line 4: an unknown split ('dev'" in text and "\n" not in text


def test_the_hash_recorded_is_that_of_the_manifest_read(tmp_path: Path):
    import hashlib

    out, lines = _edited(tmp_path, lambda lines, src: _set(lines, _split_lines(lines, "val", "0")[0], "split", "test"))
    dataset = load_dataset(out)
    assert dataset.manifest_sha256 == hashlib.sha256((out / "manifest.csv").read_bytes()).hexdigest()
    assert dataset.manifest_sha256 != dataset.info["manifest_sha256"]
    assert len(dataset.split("test")) == 4 and len(dataset.split("val")) == 2
    torch = pytest.importorskip("torch")
    pytest.importorskip("albumentations")
    from dogkit.training.config import TrainConfig
    from dogkit.training.records import environment

    env = environment(TrainConfig(data=str(out)), dataset, torch.device("cpu"), 0)
    assert env["manifest_sha256"] == dataset.manifest_sha256
