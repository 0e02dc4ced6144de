"""dogkit.archives: unsafe archives write nothing, valid ones land complete, re-runs are no-ops."""

from __future__ import annotations

import io
import json
import os
import random
import stat
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from dogkit.data import archives
from dogkit.data.archives import check_archive, is_archive, safe_extract
from dogkit.errors import DogkitError

FILES = {
    "Images/n02085620-Chihuahua/a.jpg": b"chihuahua bytes",
    "Images/n02085620-Chihuahua/b.jpg": b"\x00\x01\x02" * 100,
    "Images/n02085782-Japanese_spaniel/c.jpg": b"spaniel",
    "train_list.mat": b"MATLAB 5.0",
}


def _file_info(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def make_tar(path: Path, files: dict[str, bytes], extra: Sequence[tarfile.TarInfo] = ()) -> Path:
    """A tar (compression from the suffix) with regular ``files`` then the raw ``extra`` members."""
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            tf.addfile(*_file_info(name, data))
        for info in extra:
            tf.addfile(info)
    return path


def special(name: str, type_: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info


def make_zip(path: Path, files: dict[str, bytes], infos: Sequence[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for info, data in infos:
            zf.writestr(info, data)
    return path


def read_tree(root: Path) -> dict[str, bytes]:
    """Every non-hidden file under root as {relative posix path: bytes}."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def leftovers(dest: Path) -> list[Path]:
    return list(dest.parent.glob(f".{dest.name}.extracting-*"))


def assert_refused(archive: Path, dest: Path, *fragments: str) -> None:
    """safe_extract raises a DogkitError naming the archive and ``fragments``, and writes nothing."""
    before = sorted(dest.parent.rglob("*"))
    with pytest.raises(DogkitError) as err:
        safe_extract(archive, dest)
    message = str(err.value)
    for fragment in (archive.name, "Nothing was extracted", *fragments):
        assert fragment in message
    assert not dest.exists()
    assert not leftovers(dest)
    assert sorted(dest.parent.rglob("*")) == before


# ----------------------------------------------------------------------------- valid archives


def test_is_archive_suffixes() -> None:
    for name in ("a.tar", "a.TAR.GZ", "a.tgz", "a.tar.bz2", "a.tar.xz", "A.Zip"):
        assert is_archive(Path(name)), name
    for name in ("a.gz", "a.rar", "tar", "a.tar.gz.part"):
        assert not is_archive(Path(name)), name


def test_valid_tar_gz_and_zip_extract_exact_bytes(tmp_path: Path) -> None:
    tgz = make_tar(tmp_path / "dogs.tar.gz", FILES)
    zipped = make_zip(tmp_path / "dogs.zip", FILES)
    assert sorted(check_archive(tgz)) == sorted(FILES)
    assert sorted(check_archive(zipped)) == sorted(FILES)

    for archive in (tgz, zipped):
        dest = tmp_path / "out" / archive.name.split(".")[-1]
        assert safe_extract(archive, dest) == dest
        assert read_tree(dest) == FILES
        assert not leftovers(dest)
        stamp = json.loads((dest / f".{archive.name}.extracted").read_text())
        assert stamp["size"] == archive.stat().st_size
        assert stamp["mtime_ns"] == archive.stat().st_mtime_ns


def test_check_archive_returns_only_regular_files(tmp_path: Path) -> None:
    folder = tarfile.TarInfo("Images")
    folder.type = tarfile.DIRTYPE
    archive = make_tar(tmp_path / "a.tar", {"Images/x.jpg": b"x"}, [folder])
    assert check_archive(archive) == ["Images/x.jpg"]


# ----------------------------------------------------------------------------- unsafe tar members


def test_tar_parent_traversal_writes_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        tf.addfile(*_file_info("../evil.txt", b"pwned"))
    dest = tmp_path / "work" / "raw"
    dest.parent.mkdir()
    assert_refused(archive, dest, "../evil.txt", "'..'")
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "work" / "evil.txt").exists()


def test_tar_absolute_path_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "abs.txt"
    archive = make_tar(tmp_path / "abs.tar", {str(target): b"pwned"})
    # tarfile.TarInfo keeps the leading slash as given; make sure the test really builds one.
    with tarfile.open(archive) as tf:
        assert tf.getnames()[0].startswith("/")
    assert_refused(archive, tmp_path / "raw", "absolute path")
    assert not target.exists()


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (special("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (special("hard", tarfile.LNKTYPE, "Images/a.jpg"), "hard link"),
        (special("pipe", tarfile.FIFOTYPE), "FIFO"),
        (special("tty", tarfile.CHRTYPE), "device"),
        (special("disk", tarfile.BLKTYPE), "device"),
    ],
    ids=["symlink", "hardlink", "fifo", "chardev", "blockdev"],
)
def test_tar_special_members_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    archive = make_tar(tmp_path / "special.tar", {"Images/a.jpg": b"a"}, [member])
    assert_refused(archive, tmp_path / "raw", repr(member.name), reason)


def test_bad_member_after_good_ones_extracts_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "mixed.tar"
    with tarfile.open(archive, "w") as tf:
        for name in ("Images/a.jpg", "Images/b.jpg", "lists.mat"):
            tf.addfile(*_file_info(name, b"fine"))
        tf.addfile(*_file_info("../x", b"pwned"))
    assert_refused(archive, tmp_path / "raw", "../x")
    assert not (tmp_path / "x").exists()


def test_message_lists_first_few_and_counts_the_rest(tmp_path: Path) -> None:
    evil = {f"../evil{i}.txt": b"x" for i in range(8)}
    archive = make_tar(tmp_path / "many.tar", evil)
    with pytest.raises(DogkitError, match=r"8 unsafe member\(s\)") as err:
        check_archive(archive)
    message = str(err.value)
    assert "../evil0.txt" in message and "../evil4.txt" in message
    assert "../evil5.txt" not in message
    assert "3 more" in message


# ----------------------------------------------------------------------------- unsafe zip members


def test_zip_parent_traversal_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "evil.zip", {"ok.txt": b"ok", "../x": b"pwned"})
    assert_refused(archive, tmp_path / "raw", "../x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["/abs/x.txt", "\\abs\\x.txt", "C:/x.txt", "dir\\..\\..\\x.txt"])
def test_zip_absolute_or_backslash_names_refused(tmp_path: Path, name: str) -> None:
    # ZipInfo would normalise some of these names; write the raw name the way a hostile tool would.
    info = zipfile.ZipInfo("placeholder")
    info.filename = name
    archive = make_zip(tmp_path / "abs.zip", {}, [(info, b"pwned")])
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == [name]
    assert_refused(archive, tmp_path / "raw", repr(name))


def test_zip_symlink_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(tmp_path / "link.zip", {"ok.txt": b"ok"}, [(info, b"/etc/passwd")])
    assert_refused(archive, tmp_path / "raw", "'link'", "symbolic link")


# ----------------------------------------------------------------------------- corrupt archives


def test_corrupt_tar_is_a_dogkit_error(tmp_path: Path) -> None:
    archive = tmp_path / "random.tar"
    archive.write_bytes(random.Random(0).randbytes(4096))  # seeded: the same garbage on every run
    with pytest.raises(DogkitError, match="random.tar"):
        safe_extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert not leftovers(tmp_path / "raw")


def test_truncated_tar_gz_and_corrupt_zip_are_dogkit_errors(tmp_path: Path) -> None:
    big = {"Images/big.bin": os.urandom(200_000)}
    tgz = make_tar(tmp_path / "cut.tar.gz", big)
    tgz.write_bytes(tgz.read_bytes()[:5000])
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 not really a zip")
    for archive in (tgz, bad_zip):
        with pytest.raises(DogkitError, match=archive.name):
            check_archive(archive)


def test_extracts_without_data_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Older 3.10/3.11 patch releases lack tarfile.data_filter; check_archive alone must then suffice.
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    dest = safe_extract(make_tar(tmp_path / "dogs.tar", FILES), tmp_path / "raw")
    assert read_tree(dest) == FILES


def test_missing_archive_is_a_dogkit_error(tmp_path: Path) -> None:
    with pytest.raises(DogkitError, match="nope.tar"):
        safe_extract(tmp_path / "nope.tar", tmp_path / "raw")


def test_failure_during_extraction_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_tar(tmp_path / "dogs.tar", FILES)

    def half_then_fail(_archive: Path, target: Path) -> None:
        (target / "Images").mkdir()
        (target / "Images" / "partial.jpg").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archives, "_extract_tar", half_then_fail)
    dest = tmp_path / "raw"
    with pytest.raises(DogkitError, match="No space left"):
        safe_extract(archive, dest)
    assert not (dest / "Images").exists()
    assert not list(dest.glob(".*.extracted"))
    assert not leftovers(dest)


# ----------------------------------------------------------------------------- stamps and coexistence


def test_stamp_skips_rerun_and_new_mtime_reextracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_tar(tmp_path / "images.tar", FILES)
    dest = tmp_path / "raw"
    safe_extract(archive, dest)
    edited = dest / "Images" / "n02085620-Chihuahua" / "a.jpg"
    edited.write_bytes(b"edited by the user")
    stray = dest / "Images" / "stray.txt"
    stray.write_bytes(b"left from an older extraction")

    calls: list[Path] = []
    real_extract = archives._extract_tar

    def counting_extract(src: Path, target: Path) -> None:
        calls.append(src)
        real_extract(src, target)

    monkeypatch.setattr(archives, "_extract_tar", counting_extract)
    assert safe_extract(archive, dest) == dest
    assert calls == []
    assert edited.read_bytes() == b"edited by the user"

    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    safe_extract(archive, dest)
    assert calls == [archive]
    assert read_tree(dest) == FILES  # edited file restored, stale Images/ replaced as a whole
    assert not stray.exists()
    assert not leftovers(dest)
    stamp = json.loads((dest / ".images.tar.extracted").read_text())
    assert stamp["mtime_ns"] == archive.stat().st_mtime_ns


def test_stamp_ignored_when_extracted_entries_were_deleted(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "images.tar", FILES)
    dest = safe_extract(archive, tmp_path / "raw")
    (dest / "train_list.mat").unlink()
    safe_extract(archive, dest)
    assert read_tree(dest) == FILES


def test_several_archives_share_one_dest(tmp_path: Path) -> None:
    images = {"Images/n1-A/a.jpg": b"a", "Images/n2-B/b.jpg": b"b"}
    annotation = {"Annotation/n1-A/a": b"<xml/>", "Annotation/n2-B/b": b"<xml/>"}
    lists = {"file_list.mat": b"f", "train_list.mat": b"tr", "test_list.mat": b"te"}
    dest = tmp_path / "raw"
    safe_extract(make_tar(tmp_path / "images.tar", images), dest)
    safe_extract(make_tar(tmp_path / "annotation.tar.gz", annotation), dest)
    safe_extract(make_zip(tmp_path / "lists.zip", lists), dest)
    assert read_tree(dest) == {**images, **annotation, **lists}
    stamps = sorted(p.name for p in dest.glob(".*.extracted"))
    assert stamps == [".annotation.tar.gz.extracted", ".images.tar.extracted", ".lists.zip.extracted"]

    # Re-extracting one archive (it changed) leaves the others' entries alone.
    images_tar = tmp_path / "images.tar"
    st = images_tar.stat()
    os.utime(images_tar, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    safe_extract(images_tar, dest)
    assert read_tree(dest) == {**images, **annotation, **lists}
    assert not leftovers(dest)


def test_dest_that_is_a_file_is_a_dogkit_error(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "dogs.tar", FILES)
    dest = tmp_path / "raw"
    dest.write_text("not a folder")
    with pytest.raises(DogkitError, match="not a folder"):
        safe_extract(archive, dest)
