"""Omniglot installs that cannot go stale: verified, transactional, content-keyed caches, honest `data info`.

Most tests use a tiny synthetic Omniglot (3 + 2 characters of 20 drawings, 8x8 PNGs) with
:data:`omniglot_install.EXPECTED` and :data:`omniglot_install.CONTENT_DIGESTS` patched to fit it; one test
installs the shared zips for real (one full decode).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import OMNIGLOT
from PIL import Image

from metalab.cli import main
from metalab.data import omniglot, omniglot_install
from metalab.data.root import md5sum, safe_extract
from metalab.errors import ChecksumError, DataError

TINY = {"images_background": {"Alpha": 2, "Beta": 1}, "images_evaluation": {"Gamma": 2}}
SIZE = 8  # the synthetic PNGs are 8x8: loaded at 8 px, nothing is resized
# The drawing that the "modified" zips change: images_background/Alpha/character01, drawing 03.
CHANGED = ("images_background", "Alpha/character01", 3)


def _png(ink: tuple[int, int] | None) -> bytes:
    """An 8x8 white PNG with one black pixel at ``ink`` (x, y), or all black when ``ink`` is None."""
    image = Image.new("L", (SIZE, SIZE), 0 if ink is None else 255)
    if ink is not None:
        image.putpixel(ink, 0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _members(set_name: str, modified: bool = False) -> dict[str, bytes]:
    """The PNG members of a tiny set zip; ``modified`` blackens the CHANGED drawing."""
    members, char_id = {}, 1 if set_name == "images_background" else 100
    for alphabet, characters in TINY[set_name].items():
        for c in range(1, characters + 1):
            for d in range(1, 21):
                changed = modified and (set_name, f"{alphabet}/character{c:02d}", d) == CHANGED
                png = _png(None if changed else (d % SIZE, c % SIZE))
                members[f"{set_name}/{alphabet}/character{c:02d}/{char_id:04d}_{d:02d}.png"] = png
            char_id += 1
    return members


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@dataclass
class Tiny:
    src: Path  # folder with the two good zips
    modified: Path  # a folder with the background zip, one PNG changed, and the good evaluation zip
    root: Path  # an empty data root

    def zip(self, set_name: str) -> Path:
        return self.src / f"{set_name}.zip"


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Tiny:
    """Tiny good and modified zips; EXPECTED and CONTENT_DIGESTS patched so the good ones are 'official'."""
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "cache"))
    expected = {s: (len(a), sum(a.values())) for s, a in TINY.items()}
    for module in (omniglot_install, omniglot):  # the install checks, and the decoder's progress total
        monkeypatch.setattr(module, "EXPECTED", expected, raising=True)
    src, modified = tmp_path / "src", tmp_path / "modified"
    for set_name in omniglot_install.SETS:
        _write_zip(src / f"{set_name}.zip", _members(set_name))
    _write_zip(modified / "images_background.zip", _members("images_background", modified=True))
    shutil.copyfile(src / "images_evaluation.zip", modified / "images_evaluation.zip")
    digests = {s: omniglot_install.content_digest(src / f"{s}.zip", s) for s in omniglot_install.SETS}
    monkeypatch.setattr(omniglot_install, "CONTENT_DIGESTS", digests)
    return Tiny(src, modified, tmp_path / "root")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def install_cli(
    capsys: pytest.CaptureFixture[str], root: Path, source: Path, *extra: str
) -> tuple[int, str, str]:
    return cli(capsys, "--data-root", root, "data", "install", "omniglot", "--from", source, *extra)


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalab: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def changed_drawing(data: omniglot.OmniglotImages) -> torch.Tensor:
    """The decoded CHANGED drawing (ink high: all 255 when modified, one 255 pixel when good)."""
    return data.images[data.names.index(CHANGED[1]), CHANGED[2] - 1]


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes: to check that something left the root unchanged."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(root: Path) -> dict:
    return json.loads((root / "omniglot" / omniglot_install.MANIFEST).read_text())["sets"]


# --------------------------------------------------------------------------------- verified installs


def test_unverified_install_then_good_zips_serve_the_good_image(
    tiny: Tiny, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    rc, _, err = install_cli(capsys, tiny.root, tiny.modified)
    assert_one_line_error(rc, err, "images_background.zip", "not the official", "--no-verify")
    assert not tiny.root.exists() or not tree(tiny.root)  # nothing written, not even the good evaluation set

    rc, out, _ = install_cli(capsys, tiny.root, tiny.modified, "--no-verify")
    assert rc == 0
    assert "images_background: installed, 3 characters, UNVERIFIED" in out
    assert "images_evaluation: installed, 2 characters, verified (official content digest)" in out
    sets = manifest(tiny.root)
    assert sets["images_background"]["verified"] is False and sets["images_evaluation"]["verified"] is True
    rc, out, _ = cli(capsys, "--data-root", tiny.root, "data", "info")
    assert rc == 0 and "images_background: installed, complete, UNVERIFIED" in out
    with caplog.at_level(logging.WARNING, logger="metalab.data.omniglot"):
        caplog.clear()
        bad = omniglot.load(tiny.root, SIZE)
    assert bool((changed_drawing(bad) == 255).all())  # the modified drawing is what is installed
    assert any(
        "UNVERIFIED" in r.getMessage() and "images_background" in r.getMessage() for r in caplog.records
    )
    stale_cache = omniglot.cache_path(tiny.root, SIZE)

    rc, out, _ = install_cli(capsys, tiny.root, tiny.src)  # the good zips, into the same root
    assert rc == 0
    assert "images_background: installed, 3 characters, verified (official content digest)" in out
    assert "images_evaluation: already installed, unchanged" in out
    sets = manifest(tiny.root)
    assert sets["images_background"]["verified"] is True
    assert (
        sets["images_background"]["content_sha256"] == omniglot_install.CONTENT_DIGESTS["images_background"]
    )
    assert omniglot.cache_path(tiny.root, SIZE) != stale_cache
    with caplog.at_level(logging.WARNING, logger="metalab.data.omniglot"):
        caplog.clear()
        good = omniglot.load(tiny.root, SIZE)
    assert int((changed_drawing(good) == 255).sum()) == 1  # one ink pixel: the good drawing, not the cache
    assert not [r for r in caplog.records if "UNVERIFIED" in r.getMessage()]
    rc, out, _ = cli(capsys, "--data-root", tiny.root, "data", "info")
    assert "UNVERIFIED" not in out and out.count("installed, complete, verified") == 2


def test_tampered_zip_is_refused_and_the_root_is_unchanged(
    tiny: Tiny, capsys: pytest.CaptureFixture[str]
) -> None:
    assert install_cli(capsys, tiny.root, tiny.src)[0] == 0
    before = tree(tiny.root)
    tampered = tiny.modified / "images_background.zip"
    rc, _, err = install_cli(capsys, tiny.root, tampered)
    assert_one_line_error(rc, err, "not the official images_background", "--no-verify")
    assert tree(tiny.root) == before
    with pytest.raises(ChecksumError, match="content sha256"):
        omniglot_install.install(tampered, tiny.root)
    assert tree(tiny.root) == before


def test_official_zip_md5_alone_verifies(tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zip with the official md5 is accepted even if the content digest constant did not match."""
    zip_path = tiny.zip("images_background")
    url, _ = omniglot_install.OFFICIAL_ZIPS["images_background"]
    md5 = md5sum(zip_path)
    monkeypatch.setitem(omniglot_install.OFFICIAL_ZIPS, "images_background", (url, md5))
    monkeypatch.setitem(omniglot_install.CONTENT_DIGESTS, "images_background", "0" * 64)
    (done,) = omniglot_install.install(zip_path, tiny.root)
    assert done.verified and done.verified_by == "official zip md5"
    assert manifest(tiny.root)["images_background"]["zip_md5"] == md5


def test_content_digest_ignores_the_container(tmp_path: Path) -> None:
    """The same PNG files in another container (compression, member order) have the same content digest."""
    members = _members("images_evaluation")
    a = _write_zip(tmp_path / "a.zip", members)
    b = tmp_path / "b.zip"
    with zipfile.ZipFile(b, "w", compression=zipfile.ZIP_STORED) as z:
        for name in reversed(list(members)):
            z.writestr(name, members[name])
    assert md5sum(a) != md5sum(b)
    assert omniglot_install.content_digest(a, "images_evaluation") == omniglot_install.content_digest(
        b, "images_evaluation"
    )
    first = next(iter(members))
    members[first] = _png(None)
    c = _write_zip(tmp_path / "c.zip", members)
    assert omniglot_install.content_digest(c, "images_evaluation") != omniglot_install.content_digest(
        a, "images_evaluation"
    )


def test_incomplete_zip_is_refused_even_without_verify(tiny: Tiny) -> None:
    members = _members("images_background")
    del members[next(iter(members))]  # 19 drawings for one character
    short = _write_zip(tiny.src / "short" / "images_background.zip", members)
    with pytest.raises(DataError, match=r"not a complete images_background.*19 drawings"):
        omniglot_install.install(short, tiny.root, verify=False)
    assert not (tiny.root / "omniglot" / "images_background").exists()


# ------------------------------------------------------------------------------------- single zips


def test_from_a_single_zip_installs_that_set(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = install_cli(capsys, tiny.root, tiny.zip("images_background"))
    assert rc == 0
    assert "images_background: installed, 3 characters, verified" in out
    assert "images_evaluation is missing: install it too" in out
    rc, out, _ = cli(capsys, "--data-root", tiny.root, "data", "info")
    assert "images_background: installed, complete, verified" in out and "images_evaluation: missing" in out
    rc, out, _ = install_cli(capsys, tiny.root, tiny.zip("images_evaluation"))
    assert rc == 0 and "omniglot ready" in out and "5 characters" in out
    data = omniglot.load(tiny.root, SIZE)
    assert len(data.names) == 5 and int(data.background.sum()) == 3


# ------------------------------------------------------------------------------ partial / interrupted


def test_partial_folder_is_incomplete_until_reinstalled(
    tiny: Tiny, capsys: pytest.CaptureFixture[str]
) -> None:
    assert install_cli(capsys, tiny.root, tiny.src)[0] == 0
    shutil.rmtree(tiny.root / "omniglot" / "images_evaluation" / "Gamma" / "character02")
    assert omniglot_install.set_status(tiny.root, "images_evaluation").state == "incomplete"
    rc, out, _ = cli(capsys, "--data-root", tiny.root, "data", "info")
    assert rc == 0
    assert "images_evaluation: INCOMPLETE, not installed" in out and "1 of 2 characters" in out
    with pytest.raises(DataError, match=r"images_evaluation .* is incomplete"):
        omniglot.load(tiny.root, SIZE)
    rc, _, err = cli(
        capsys, "--data-root", tiny.root, "data", "show", "omniglot", "--split", "lake", "--part", "test"
    )
    assert_one_line_error(rc, err, "incomplete", "metalab data install omniglot --from")

    rc, out, _ = install_cli(capsys, tiny.root, tiny.src)
    assert rc == 0 and "images_evaluation: installed, 2 characters" in out
    assert omniglot_install.set_status(tiny.root, "images_evaluation").state == "installed"
    assert len(omniglot.load(tiny.root, SIZE).names) == 5


def test_unrecorded_partial_folder_is_not_served_from_the_cache(tiny: Tiny) -> None:
    """An extracted folder without install record (an older install) is keyed by its files, so a removed
    character changes the key and is reported, never served from the cache of the complete folder."""
    base = tiny.root / "omniglot"
    for set_name in omniglot_install.SETS:
        safe_extract(tiny.zip(set_name), base)
    assert len(omniglot.load(tiny.root, SIZE).names) == 5
    shutil.rmtree(base / "images_background" / "Beta")
    with pytest.raises(DataError, match="2 of 3 characters in 1 of 2 alphabets"):
        omniglot.load(tiny.root, SIZE)


def test_interrupted_install_leaves_the_previous_install(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert install_cli(capsys, tiny.root, tiny.src)[0] == 0
    before = tree(tiny.root)
    real_extract = zipfile.ZipFile.extract
    calls = []

    def extract_then_die(
        self: zipfile.ZipFile, member: object, path: object = None, pwd: object = None
    ) -> str:
        calls.append(member)
        if len(calls) == 7:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the extraction
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        omniglot_install.install(tiny.modified / "images_background.zip", tiny.root, verify=False)
    assert len(calls) == 7
    assert tree(tiny.root) == before  # the previous install, and no staging folder left behind
    assert not [p for p in (tiny.root / "omniglot").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    assert int((changed_drawing(omniglot.load(tiny.root, SIZE)) == 255).sum()) == 1


def test_interrupted_first_install_leaves_nothing(tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    def die(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "extract", die)
    with pytest.raises(KeyboardInterrupt):
        omniglot_install.install(tiny.src, tiny.root)
    assert [p.name for p in (tiny.root / "omniglot").iterdir()] == []
    assert omniglot_install.set_status(tiny.root, "images_background").state == "missing"


def test_killed_install_leftovers_are_removed(tiny: Tiny) -> None:
    """A staging folder left by a killed install (no finally ran) is cleaned by the next install."""
    leftover = tiny.root / "omniglot" / ".images_background.install-dead"
    (leftover / "images_background" / "Alpha").mkdir(parents=True)
    omniglot_install.install(tiny.zip("images_background"), tiny.root)
    assert not leftover.exists()


def test_crash_before_the_record_is_written_is_not_stale(tiny: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the new folder took its place but before install.json was updated: the record no longer
    matches the files, so the cache is keyed by the files and the new images are decoded."""
    omniglot_install.install(tiny.modified, tiny.root, verify=False)
    assert bool((changed_drawing(omniglot.load(tiny.root, SIZE)) == 255).all())

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(omniglot_install, "_record", crash)
    with pytest.raises(KeyboardInterrupt):
        omniglot_install.install(tiny.zip("images_background"), tiny.root)
    assert manifest(tiny.root)["images_background"]["verified"] is False  # the old record
    data = omniglot.load(tiny.root, SIZE)
    assert int((changed_drawing(data) == 255).sum()) == 1  # but the new images
    assert omniglot_install.set_status(tiny.root, "images_background").verified is True  # judged by content


# ----------------------------------------------------------------------------------------- data show


def test_show_default_output_is_not_the_cwd(
    tiny: Tiny, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert install_cli(capsys, tiny.root, tiny.src)[0] == 0
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = ("--data-root", tiny.root, "data", "show", "omniglot", "--split", "lake", "--part", "test")
    rc, out, _ = cli(capsys, *args, "--ways", "2", "--queries", "2")
    assert rc == 0
    written = Path(out.strip().rsplit(" ", 1)[-1])
    assert written.is_file() and written.suffix == ".png"
    assert written.is_relative_to(tmp_path / "cache")  # under the cache root
    assert list(cwd.iterdir()) == []


# ------------------------------------------------------------------------------------- real Omniglot


def test_real_install_partial_repair_and_shared_cache(
    omniglot_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared zips (official PNGs in another container) install verified by content digest; a removed
    character folder is reported and refused; a re-install repairs it without decoding again."""
    root = tmp_path / "root"
    rc, out, _ = install_cli(capsys, root, OMNIGLOT)  # decodes once
    assert rc == 0, out
    assert out.count("verified (official content digest)") == 2
    assert "1623 characters, 964 background / 659 evaluation" in out
    sets = manifest(root)
    assert [sets[s]["characters"] for s in omniglot_install.SETS] == [964, 659]
    assert [sets[s]["alphabets"] for s in omniglot_install.SETS] == [30, 20]
    assert all(sets[s]["verified"] for s in omniglot_install.SETS)

    evaluation = root / "omniglot" / "images_evaluation"
    alphabet = sorted(p for p in evaluation.iterdir() if p.is_dir())[0]
    shutil.rmtree(alphabet / "character01")
    rc, out, _ = cli(capsys, "--data-root", root, "data", "info")
    assert "images_evaluation: INCOMPLETE, not installed" in out and "658 of 659 characters" in out
    with pytest.raises(DataError, match="incomplete"):
        omniglot.load(root)

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again although the same content is cached")

    monkeypatch.setattr(omniglot, "_decode", no_decode)
    rc, out, _ = install_cli(capsys, root, OMNIGLOT)
    assert rc == 0
    assert "images_background: already installed, unchanged" in out
    assert "images_evaluation: installed, 659 characters, verified" in out
    assert "1623 characters" in out
    start = time.perf_counter()
    data = omniglot.load(root)
    assert time.perf_counter() - start < 5  # a cache hit (a decode takes ~10 s); measured ~0.2 s
    assert data.images.shape == (1623, 20, 28, 28)


# ---------------------------------------------------------------------------------- content-keyed cache


def zip_root(tiny: Tiny, name: str, background: Path | None = None) -> Path:
    """A data root holding only the tiny zips (like the shared folder); ``background`` replaces that zip."""
    root = tiny.root.parent / name
    (root / "omniglot").mkdir(parents=True)
    shutil.copyfile(background or tiny.zip("images_background"), root / "omniglot" / "images_background.zip")
    shutil.copyfile(tiny.zip("images_evaluation"), root / "omniglot" / "images_evaluation.zip")
    return root


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records the sets of each full decode (the wrapped decoder still runs)."""
    calls: list[list[str]] = []
    real = omniglot._decode

    def counting(sources, image_size):  # type: ignore[no-untyped-def]
        calls.append([s.name for s in sources])
        return real(sources, image_size)

    monkeypatch.setattr(omniglot, "_decode", counting)
    return calls


def test_cache_is_written_once_and_keyed_by_content(
    tiny: Tiny, decodes: list[list[str]], tmp_path: Path
) -> None:
    root = zip_root(tiny, "zips")
    first = omniglot.load(root, SIZE)
    assert len(decodes) == 1
    path = omniglot.cache_path(root, SIZE)
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")
    assert not list(path.parent.glob("*.part"))  # the temporary file is gone
    second = omniglot.load(root, SIZE)
    assert len(decodes) == 1
    assert torch.equal(second.images, first.images) and second.names == first.names
    assert torch.equal(second.background, first.background)
    assert omniglot.cache_path(root, 2 * SIZE) != path  # another image size is another cache
    # The same zips under another root: the same content, the same cache, no decode.
    assert omniglot.cache_path(zip_root(tiny, "copy"), SIZE) == path
    omniglot.load(tiny.root.parent / "copy", SIZE)
    assert len(decodes) == 1
    # A zip with one PNG changed, under the very same path: another cache, decoded, the new image served.
    shutil.copyfile(tiny.modified / "images_background.zip", root / "omniglot" / "images_background.zip")
    assert omniglot.cache_path(root, SIZE) != path
    assert bool((changed_drawing(omniglot.load(root, SIZE)) == 255).all())
    assert len(decodes) == 2


def test_edited_extracted_file_changes_the_cache(tiny: Tiny, decodes: list[list[str]]) -> None:
    """A PNG rewritten in an installed folder no longer matches the install record: decoded again."""
    omniglot_install.install(tiny.src, tiny.root)
    assert int((changed_drawing(omniglot.load(tiny.root, SIZE)) == 255).sum()) == 1
    set_name, char, drawing = CHANGED
    (png,) = (tiny.root / "omniglot" / set_name / char).glob(f"*_{drawing:02d}.png")
    png.write_bytes(_png(None) + b"\0" * 7)  # another size, so the change shows even within one mtime tick
    assert bool((changed_drawing(omniglot.load(tiny.root, SIZE)) == 255).all())
    assert len(decodes) == 2
    assert omniglot_install.set_status(tiny.root, set_name).verified is False


@pytest.mark.parametrize("damage", ["intact", "garbage", "truncated", "old_version", "other_key"])
def test_bad_cache_is_rebuilt(tiny: Tiny, decodes: list[list[str]], damage: str) -> None:
    root = zip_root(tiny, "zips")
    path = omniglot.cache_path(root, SIZE)
    path.parent.mkdir(parents=True)
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        torch.save({"version": omniglot.CACHE_VERSION, "images": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        key = omniglot._cache_key(omniglot._sources(root), SIZE)  # the right key, unless damage says other
        blob = {
            "version": omniglot.CACHE_VERSION - (damage == "old_version"),
            "key": "0" * 64 if damage == "other_key" else key,
            "verified": {s: True for s in omniglot_install.SETS},
            "names": ["X/character01"],
            "images": torch.zeros(1, 20, SIZE, SIZE, dtype=torch.uint8),
            "background": torch.ones(1, dtype=torch.bool),
        }
        torch.save(blob, path)
    data = omniglot.load(root, SIZE)
    if damage == "intact":  # the control: this hand-made cache is served as it is
        assert decodes == [] and data.names == ["X/character01"]
        return
    assert len(decodes) == 1
    assert data.images.shape == (5, 20, SIZE, SIZE)
    assert torch.load(path, weights_only=True)["version"] == omniglot.CACHE_VERSION
