"""Omniglot and the data plumbing: split sizes, decoding, the cache, zip safety, checksums, corrupt archives."""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import DATA

from metalab.data import omniglot, omniglot_install
from metalab.data.root import cache_root, data_root, download, md5sum, open_zip, safe_extract
from metalab.data.tasks import TaskConfig, make_sampler
from metalab.errors import ChecksumError, ConfigError, DataError, UnsafeArchiveError

# ------------------------------------------------------------------------------------------ roots


def test_roots_come_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert data_root() == DATA.resolve()
    assert data_root(tmp_path / "x") == (tmp_path / "x").resolve()  # an explicit root wins
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "c"))
    assert cache_root() == (tmp_path / "c").resolve()
    monkeypatch.delenv("METALAB_DATA")
    monkeypatch.delenv("METALAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root() == (tmp_path / ".cache" / "metalab").resolve()
    assert cache_root() == (tmp_path / ".cache" / "metalab").resolve()


# ------------------------------------------------------------------------------------ real Omniglot


def test_decoded_images(omniglot_data: omniglot.OmniglotImages) -> None:
    images = omniglot_data.images
    assert images.shape == (1623, 20, 28, 28) and images.dtype == torch.uint8
    assert len(omniglot_data.names) == len(set(omniglot_data.names)) == 1623
    assert int(omniglot_data.background.sum()) == 964
    # Background characters first, as the names are ordered.
    assert bool(omniglot_data.background[:964].all()) and not bool(omniglot_data.background[964:].any())
    # Ink is high on a dark background: strokes cover a small part of each image.
    ink = images.float().mean() / 255
    assert 0.02 < ink < 0.3
    corners = images[..., 0, 0].float().mean() / 255
    assert corners < 0.05
    assert all(n.count("/") == 1 and "/character" in n for n in omniglot_data.names)


@pytest.mark.parametrize(
    ("part", "characters"), [("train", 1028), ("val", 172), ("test", 423), ("trainval", 1200)]
)
def test_vinyals_split_sizes(omniglot_data, omniglot_root: Path, part: str, characters: int) -> None:
    split = omniglot.split_classes(omniglot_data, omniglot_root, "vinyals", part)
    assert split.images.shape == (4 * characters, 20, 1, 28, 28)
    assert split.images.dtype == torch.uint8
    assert len(split.classes) == len(set(split.classes)) == 4 * characters
    chars = {c.rsplit("/", 1)[0] for c in split.classes}
    assert len(chars) == characters


def test_vinyals_parts_are_disjoint(omniglot_data, omniglot_root: Path) -> None:
    parts = {
        p: set(omniglot.split_classes(omniglot_data, omniglot_root, "vinyals", p).classes)
        for p in ("train", "val", "test", "trainval")
    }
    assert not parts["train"] & parts["val"]
    assert not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert parts["trainval"] == parts["train"] | parts["val"]
    # The Vinyals test characters all come from the evaluation alphabets.
    background = {n for n, b in zip(omniglot_data.names, omniglot_data.background.tolist(), strict=True) if b}
    assert not {c.rsplit("/", 1)[0] for c in parts["test"]} & background


def test_vinyals_rotations_are_rotated_copies(omniglot_data, omniglot_root: Path) -> None:
    split = omniglot.split_classes(omniglot_data, omniglot_root, "vinyals", "test")
    index = {c: i for i, c in enumerate(split.classes)}
    char = split.classes[0].rsplit("/", 1)[0]
    base = split.images[index[f"{char}/rot000"]]
    original = omniglot_data.images[omniglot_data.names.index(char)]  # (20, 28, 28)
    assert torch.equal(base[:, 0], original)
    for k, deg in ((1, "090"), (2, "180"), (3, "270")):
        rotated = split.images[index[f"{char}/rot{deg}"]]
        assert torch.equal(rotated, torch.rot90(base, k, dims=(-2, -1)))
        assert not torch.equal(rotated, base)


@pytest.mark.parametrize(
    ("part", "classes"), [("train", 787), ("val", 177), ("trainval", 964), ("test", 659)]
)
def test_lake_split_sizes(omniglot_data, omniglot_root: Path, part: str, classes: int) -> None:
    split = omniglot.split_classes(omniglot_data, omniglot_root, "lake", part)
    assert split.images.shape == (classes, 20, 1, 28, 28)
    assert all(c.endswith("/rot000") for c in split.classes)


def test_lake_val_is_carved_from_background_alphabets_only(omniglot_data, omniglot_root: Path) -> None:
    """Lake val holds 5 whole background alphabets and never an evaluation one; train and val partition the
    background characters."""
    parts = {
        p: omniglot.split_classes(omniglot_data, omniglot_root, "lake", p).classes
        for p in omniglot_install.SPLIT_PARTS
    }
    alphabets = {p: {c.split("/")[0] for c in classes} for p, classes in parts.items()}
    background = {
        n.split("/")[0]
        for n, b in zip(omniglot_data.names, omniglot_data.background.tolist(), strict=True)
        if b
    }
    assert len(alphabets["val"]) == 5 and alphabets["val"] <= background
    assert not alphabets["val"] & alphabets["test"] and not alphabets["val"] & alphabets["train"]
    assert sorted(parts["train"] + parts["val"]) == sorted(parts["trainval"])
    with pytest.raises(DataError, match="Lake split has parts"):
        omniglot.split_classes(omniglot_data, omniglot_root, "lake", "valid")  # type: ignore[arg-type]


def test_unknown_split(omniglot_data, omniglot_root: Path) -> None:
    with pytest.raises(DataError, match="unknown Omniglot split"):
        omniglot.split_classes(omniglot_data, omniglot_root, "bogus", "train")  # type: ignore[arg-type]


def test_missing_split_list(omniglot_data, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split list missing"):
        omniglot.split_classes(omniglot_data, tmp_path, "vinyals", "train")


def test_unresolvable_split_line(omniglot_data, tmp_path: Path) -> None:
    lists = tmp_path / "omniglot" / "splits" / "vinyals"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text(f"{omniglot_data.names[0]}/rot000\nNoSuchAlphabet/character01/rot000\n")
    with pytest.raises(DataError, match="NoSuchAlphabet"):
        omniglot.split_classes(omniglot_data, tmp_path, "vinyals", "val")


def test_make_sampler_omniglot(omniglot_root: Path) -> None:
    cfg = TaskConfig(ways=5, shots=1, queries=3, train_ways=20)
    train = make_sampler(cfg, "train", 0, omniglot_root)
    test = make_sampler(cfg, "test", 0, omniglot_root)
    assert train.pool.shape[0] == 4112 and train.n_way == 20  # training ways
    assert test.pool.shape[0] == 1692 and test.n_way == 5
    lake_val = make_sampler(TaskConfig(split="lake"), "val", 0, omniglot_root)
    assert lake_val.pool.shape[0] == 177  # 5 background alphabets, never the evaluation ones
    val = make_sampler(cfg, "val", 0, omniglot_root)
    assert val.seed != test.seed  # the parts draw from distinct seeds
    with pytest.raises(ConfigError) as info:
        make_sampler(TaskConfig(ways=700), "val", 0, omniglot_root)
    assert info.value.key == "task.ways"


def test_missing_omniglot_is_actionable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="metalab data install omniglot"):
        omniglot.decode(tmp_path)


# ------------------------------------------------------------------------------------------- cache


def test_real_cache_is_reused_without_decoding(
    omniglot_data, omniglot_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert omniglot.cache_path(omniglot_root, 28).is_file()

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again although the session cache exists")

    monkeypatch.setattr(omniglot, "_decode", no_decode)
    start = time.perf_counter()
    again = omniglot.load(omniglot_root, 28)
    assert time.perf_counter() - start < 5  # a cache hit: ~0.03 s on the shared zips (a decode takes ~10 s)
    assert torch.equal(again.images, omniglot_data.images)
    assert again.names == omniglot_data.names


# --------------------------------------------------------------------------------------- zip safety


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize(
    "member",
    [
        "../evil.png",
        "/abs.png",
        "images_background/../../evil.png",
        "images_background/Alpha/../../../evil.png",
    ],
)
def test_zip_slip_rejected_by_safe_extract(tmp_path: Path, member: str) -> None:
    archive = _zip(
        tmp_path / "evil.zip", {"images_background/A/character01/0001_01.png": b"x", member: b"evil"}
    )
    dest = tmp_path / "out" / "deeper"
    with pytest.raises(UnsafeArchiveError, match="unsafe member"):
        safe_extract(archive, dest)
    assert not (tmp_path / "out" / "evil.png").exists()
    assert not (tmp_path / "evil.png").exists()
    assert not dest.exists()  # nothing extracted at all: the check comes first


@pytest.mark.parametrize("member", ["../evil.png", "/abs.png"])
def test_zip_slip_rejected_by_install(tmp_path: Path, member: str) -> None:
    source = tmp_path / "src"
    source.mkdir()
    _zip(
        source / "images_background.zip",
        {"images_background/A/character01/0001_01.png": b"x", member: b"evil"},
    )
    root = tmp_path / "root"
    with pytest.raises(UnsafeArchiveError):
        omniglot_install.install(source, root)
    with pytest.raises(UnsafeArchiveError):
        omniglot_install.install(source / "images_background.zip", root)
    assert not (tmp_path / "evil.png").exists() and not (root / "evil.png").exists()
    assert not (root / "omniglot" / "images_background.zip").exists()


def test_safe_extract_extracts_good_zip(tmp_path: Path) -> None:
    members = {"a/b/c.png": b"abc", "top.txt": b"hello"}
    dest = safe_extract(_zip(tmp_path / "good.zip", members), tmp_path / "out")
    for name, data in members.items():
        assert (dest / name).read_bytes() == data


def _corrupt_crc_zip(path: Path) -> Path:
    """A zip whose central directory is fine but whose one stored member has a flipped byte."""
    payload = b"OMNIGLOT" * 64
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("images_background/A/character01/0001_01.png", payload)
    raw = bytearray(path.read_bytes())
    at = raw.index(payload) + 100
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def test_corrupt_zips_raise_data_error(tmp_path: Path) -> None:
    good = _zip(
        tmp_path / "good.zip", {f"images_background/A/character01/{i}.png": bytes(300) for i in range(5)}
    )
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the central directory is lost
    with pytest.raises(DataError, match="not a readable zip"):
        open_zip(truncated)
    with pytest.raises(DataError, match="not a readable zip"):
        safe_extract(truncated, tmp_path / "out")
    bad_crc = _corrupt_crc_zip(tmp_path / "crc.zip")
    with pytest.raises(DataError, match="CRC"):
        safe_extract(bad_crc, tmp_path / "out2")


def test_install_rejects_corrupt_or_foreign_zips(tmp_path: Path) -> None:
    root = tmp_path / "root"
    not_zip = tmp_path / "images_background.zip"
    not_zip.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DataError, match="not a readable zip"):
        omniglot_install.install(not_zip, root)
    with pytest.raises(DataError, match="CRC"):
        omniglot_install.install(_corrupt_crc_zip(tmp_path / "crc.zip"), root)
    foreign = _zip(tmp_path / "foreign.zip", {"photos/cat.jpg": b"meow"})
    with pytest.raises(DataError, match="official Omniglot layout"):
        omniglot_install.install(foreign, root)
    with pytest.raises(DataError, match="does not exist"):
        omniglot_install.install(tmp_path / "missing", root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds neither"):
        omniglot_install.install(empty, root)
    assert not (root / "omniglot" / "images_background.zip").exists()


# ----------------------------------------------------------------------------------------- download


def test_download_checks_md5(tmp_path: Path) -> None:
    src = tmp_path / "payload.bin"
    payload = bytes(range(256)) * 1000
    src.write_bytes(payload)
    right = hashlib.md5(payload).hexdigest()
    dest_dir = tmp_path / "dl"

    with pytest.raises(ChecksumError, match="md5"):
        download(src.as_uri(), dest_dir / "file.bin", "0" * 32)
    assert not (dest_dir / "file.bin").exists()
    assert list(dest_dir.iterdir()) == []  # no partial file left behind either

    out = download(src.as_uri(), dest_dir / "file.bin", right)
    assert out == dest_dir / "file.bin"
    assert out.read_bytes() == payload
    assert md5sum(out) == right
    assert list(dest_dir.iterdir()) == [out]


def test_download_failure_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="could not download"):
        download((tmp_path / "absent.bin").as_uri(), tmp_path / "dl" / "x.bin", None)
    assert list((tmp_path / "dl").iterdir()) == []


def test_checksum_error_is_a_data_error() -> None:
    assert issubclass(ChecksumError, DataError) and issubclass(UnsafeArchiveError, DataError)
