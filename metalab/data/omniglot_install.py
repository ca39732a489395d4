"""Installing the official Omniglot zips (Lake et al., Science 2015) and checking them: verified installs,
download, and what the data root holds (``metalab data info``).

Layout under the data root, as the official zips unpack::

    <root>/omniglot/images_background.zip         964 characters, 30 alphabets (optional once extracted)
    <root>/omniglot/images_evaluation.zip         659 characters, 20 alphabets
    <root>/omniglot/images_background/<Alphabet>/characterNN/<ID>_<DD>.png   (after `metalab data install`)
    <root>/omniglot/install.json                  what each install put there: content digest, verified or not
    <root>/omniglot/splits/vinyals/{train,val,trainval,test}.txt   lines "Alphabet/characterNN/rotDDD"

Installs are transactional. Each zip is verified first (the official zip md5, or the content digest of its
images, which every container of the official files shares), extracted into a temporary folder beside the
target, counted (alphabets, characters, 20 drawings each), and only then renamed into place: an interrupted
install leaves the previous install or nothing. A zip that matches neither digest installs only with
``verify=False`` (``--no-verify``) and is recorded as unverified: ``metalab data info`` says so and
:func:`~metalab.data.omniglot.load` logs a warning. Concurrent installs into one data root are not supported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from metalab.data.root import (
    copy_atomic,
    download,
    md5sum,
    open_zip,
    read_member,
    safe_extract,
    safe_member_names,
)
from metalab.errors import ChecksumError, DataError
from metalab.utils import atomic_path

log = logging.getLogger(__name__)

SETS = ("images_background", "images_evaluation")
DRAWINGS = 20
# What a complete set holds: (alphabets, characters); every character has DRAWINGS drawings.
EXPECTED = {"images_background": (30, 964), "images_evaluation": (20, 659)}
MANIFEST = "install.json"
MANIFEST_VERSION = 1
_BASE = "https://raw.githubusercontent.com"
# Official location of the data (brendenlake/omniglot); md5s as published by torchvision for these files.
OFFICIAL_ZIPS = {
    "images_background": (
        f"{_BASE}/brendenlake/omniglot/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
    ),
    "images_evaluation": (
        f"{_BASE}/brendenlake/omniglot/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
    ),
}
# Content digests of the official images, independent of the zip container (see content_digest): sha256 over
# every PNG of the set in member-path order, each fed as its path "<set>/<Alphabet>/characterNN/<file>.png", a
# NUL byte, its length (8 bytes, big-endian) and its bytes. Any zip or folder holding the official files has
# these digests. Computed once from the project's shared copies (../shared/data/omniglot), which hold the
# official PNG files byte for byte in another zip container (zip md5 a9c87fc89b3b653f896376a0545ecb8f and
# 59652fbdc8cc40b805b64b25adf7742c, not the official md5s above).
CONTENT_DIGESTS = {
    "images_background": "cf1a6cbcdbecf5c37d4f6aba9dbcf04dc45e5eec6a75f15594c1d25b6534e8cf",
    "images_evaluation": "cda6915567cdc792bbef828ec7e3396dc47e172ed8beda1fce519a79bc388d9f",
}
# The Vinyals split lists as used by Prototypical Networks (jakesnell/prototypical-networks, MIT license).
SPLIT_PARTS = ("train", "val", "trainval", "test")
VINYALS_LISTS = {
    "train": "433d1fcc2b20dcee2983ceb524586f7f",
    "val": "78c535fa427b12b6596908376a0b3f34",
    "trainval": "888433268015439fd05fb6e9006ead50",
    "test": "43534e6d5f9e74acbb7de1b4874abad8",
}
VINYALS_URL = f"{_BASE}/jakesnell/prototypical-networks/master/data/splits/vinyals/{{part}}.txt"
NOT_VERIFIED = "not verified (installed with --no-verify)"


def omniglot_dir(root: Path) -> Path:
    return root / "omniglot"


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """What the PNG paths of one set add up to."""

    alphabets: int
    characters: int
    images: int
    uneven: tuple[tuple[str, int], ...]  # ("Alphabet/characterNN", drawings) where drawings != DRAWINGS
    stray: tuple[str, ...]  # PNG paths that are not <Alphabet>/characterNN/<file>.png

    def problem(self, set_name: str) -> str | None:
        """Why this is not a complete ``set_name`` (None when it is)."""
        alphabets, characters = EXPECTED[set_name]
        if self.stray:
            return f"unexpected file {self.stray[0]!r} (want <Alphabet>/characterNN/<file>.png)"
        if (self.alphabets, self.characters) != (alphabets, characters):
            return (
                f"{self.characters} of {characters} characters in {self.alphabets} of {alphabets} alphabets"
            )
        if self.uneven:
            name, drawings = self.uneven[0]
            return f"character {name} has {drawings} drawings, expected {DRAWINGS}"
        return None


def layout(rel_paths: Iterable[str]) -> Layout:
    """Count alphabets, characters and drawings in PNG paths relative to a set folder."""
    drawings: dict[str, int] = {}
    stray = []
    for rel in rel_paths:
        parts = rel.split("/")
        if len(parts) != 3 or not all(parts):
            stray.append(rel)
            continue
        key = f"{parts[0]}/{parts[1]}"
        drawings[key] = drawings.get(key, 0) + 1
    alphabets = {key.split("/")[0] for key in drawings}
    uneven = tuple((k, n) for k, n in sorted(drawings.items()) if n != DRAWINGS)
    return Layout(len(alphabets), len(drawings), sum(drawings.values()), uneven, tuple(sorted(stray)))


@dataclass(frozen=True)
class FolderScan:
    """An extracted set folder as it is on disk now."""

    layout: Layout
    fingerprint: str  # sha256 over the sorted (path, size, mtime) of its PNG files


def _png_files(folder: Path, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """(path relative to ``folder``, size, mtime in ns) of every PNG below it; symlinked folders not followed."""
    with os.scandir(folder) as entries:
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                yield from _png_files(Path(entry.path), f"{rel}/")
            elif entry.name.endswith(".png") and entry.is_file():
                info = entry.stat()
                yield rel, info.st_size, info.st_mtime_ns


def scan_folder(folder: Path) -> FolderScan:
    """Count an extracted set folder and fingerprint its files (about 50 ms for images_background)."""
    files = sorted(_png_files(folder))
    digest = hashlib.sha256()
    for rel, size, mtime in files:
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return FolderScan(layout(rel for rel, _, _ in files), digest.hexdigest())


def _zip_pngs(archive: zipfile.ZipFile, set_name: str) -> list[str]:
    """The set's PNG member names in a zip, sorted (other top-level folders, e.g. __MACOSX, are ignored)."""
    prefix = f"{set_name}/"
    return sorted(n for n in safe_member_names(archive) if n.startswith(prefix) and n.endswith(".png"))


def _iter_pngs(source: Path, set_name: str) -> Iterator[tuple[str, bytes]]:
    """(path in the set "<Alphabet>/characterNN/<file>.png", PNG bytes) in path order, from a folder or a zip."""
    if source.is_dir():
        for rel, _, _ in sorted(_png_files(source)):
            yield rel, (source / rel).read_bytes()
        return
    with open_zip(source) as archive:
        cut = len(set_name) + 1
        for name in _zip_pngs(archive, set_name):
            yield name[cut:], read_member(archive, name)


class ContentDigest:
    """The content digest of one set, fed its PNG files in path order (the format of CONTENT_DIGESTS)."""

    def __init__(self, set_name: str) -> None:
        self.set_name = set_name
        self._sha = hashlib.sha256()

    def add(self, rel: str, png: bytes) -> None:
        """Feed one PNG: ``rel`` is its path in the set folder, "<Alphabet>/characterNN/<file>.png"."""
        self._sha.update(f"{self.set_name}/{rel}".encode() + b"\0" + len(png).to_bytes(8, "big"))
        self._sha.update(png)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def content_digest(source: Path, set_name: str) -> str:
    """sha256 of a set's images, the same for every zip or folder holding the same PNG files (about 0.3 s)."""
    digest = ContentDigest(set_name)
    for rel, png in _iter_pngs(source, set_name):
        digest.add(rel, png)
    return digest.hexdigest()


def official_match(set_name: str, md5: str | None, digest: str | None) -> str | None:
    """How a set matches the official files ("official zip md5" / "official content digest"), or None."""
    if md5 is not None and md5 == OFFICIAL_ZIPS[set_name][1]:
        return "official zip md5"
    if digest is not None and digest == CONTENT_DIGESTS[set_name]:
        return "official content digest"
    return None


# --------------------------------------------------------------------------------------------- manifest


def read_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """The install record of each set (``<root>/omniglot/install.json``); {} when absent or unreadable."""
    path = omniglot_dir(root) / MANIFEST
    if not path.is_file():
        return {}
    try:
        sets = json.loads(path.read_text())["sets"]
        return {k: v for k, v in sets.items() if k in SETS and isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable install record %s (%s)", path, e)
        return {}


def _record(root: Path, set_name: str, entry: dict[str, Any]) -> None:
    """Write ``entry`` as the install record of ``set_name`` (atomically, keeping the other sets' records)."""
    sets = read_manifest(root)
    sets[set_name] = entry
    blob = {"version": MANIFEST_VERSION, "sets": dict(sorted(sets.items()))}
    with atomic_path(omniglot_dir(root) / MANIFEST) as tmp:
        tmp.write_text(json.dumps(blob, indent=2) + "\n")


def _recorded(root: Path, set_name: str, scan: FolderScan) -> dict[str, Any] | None:
    """The install record of ``set_name`` if it describes the folder as it is now (same files), else None."""
    entry = read_manifest(root).get(set_name)
    if entry and entry.get("files") == scan.fingerprint and isinstance(entry.get("content_sha256"), str):
        return entry
    return None


# ---------------------------------------------------------------------------------------------- install


@dataclass(frozen=True)
class SetInstall:
    """One set as :func:`install` or :func:`fetch` left it."""

    name: str
    characters: int
    images: int
    digest: str  # content sha256 of its PNG files (see content_digest)
    verified: bool
    verified_by: str  # "official zip md5", "official content digest" or NOT_VERIFIED
    unchanged: bool = False  # True when the same content was already installed, complete: nothing was done


@dataclass(frozen=True)
class _CheckedZip:
    path: Path
    set_name: str
    layout: Layout
    md5: str
    digest: str
    verified_by: str | None


def _check_zip(path: Path, verify: bool) -> _CheckedZip:
    """Check a zip before anything is written: member paths, layout and counts, CRCs, and the digests."""
    with open_zip(path) as archive:
        names = safe_member_names(archive)
        tops = {n.split("/", 1)[0] for n in names if "/" in n}
        sets = [s for s in SETS if s in tops]
        if len(sets) != 1 or not any(n.endswith(".png") for n in names):
            raise DataError(f"{path} does not have the official Omniglot layout (images_*/<Alphabet>/...png)")
        set_name = sets[0]
        cut = len(set_name) + 1
        counted = layout(n[cut:] for n in _zip_pngs(archive, set_name))
    md5, digest = md5sum(path), content_digest(path, set_name)  # reading every member also checks its CRC
    problem = counted.problem(set_name)
    if problem:
        raise DataError(f"{path} is not a complete {set_name}: {problem}")
    how = official_match(set_name, md5, digest)
    if how is None and verify:
        raise ChecksumError(
            f"{path} is not the official {set_name}: zip md5 {md5} (official {OFFICIAL_ZIPS[set_name][1]}) "
            f"and image content sha256 {digest[:16]}... (official {CONTENT_DIGESTS[set_name][:16]}...) both "
            f"differ; to install it anyway, marked unverified, add --no-verify"
        )
    return _CheckedZip(path, set_name, counted, md5, digest, how)


def install(source: Path, root: Path, verify: bool = True) -> list[SetInstall]:
    """Install from a folder holding the official zips (and optionally ``splits/``) or from one zip.

    Every zip is checked before anything is written (member paths, layout and counts, CRCs, and the official
    md5 or content digest unless ``verify`` is False), then each set is installed as one transaction (see the
    module docstring); split lists found beside the zips are copied too. A set whose content is already
    installed, complete, is left as it is. Decoding is left to :func:`~metalab.data.omniglot.load`, which
    needs both sets.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"nothing to install: {source} does not exist")
    zips = [source] if source.is_file() else [source / f"{name}.zip" for name in SETS]
    zips = [z for z in zips if z.is_file()]
    if not zips:
        raise DataError(f"{source} holds neither images_background.zip nor images_evaluation.zip")
    checked = [_check_zip(path, verify) for path in zips]
    if len({c.set_name for c in checked}) != len(checked):
        raise DataError(f"{source}: both zips hold {checked[0].set_name}")
    done = [_install_set(c, root) for c in checked]
    splits = source / "splits" / "vinyals" if source.is_dir() else source.parent / "splits" / "vinyals"
    for part in SPLIT_PARTS:
        if (splits / f"{part}.txt").is_file():
            copy_atomic(splits / f"{part}.txt", omniglot_dir(root) / "splits" / "vinyals" / f"{part}.txt")
    return done


def _result(c: _CheckedZip, unchanged: bool = False) -> SetInstall:
    how = c.verified_by or NOT_VERIFIED
    return SetInstall(
        c.set_name, c.layout.characters, c.layout.images, c.digest, c.verified_by is not None, how, unchanged
    )


def _install_set(c: _CheckedZip, root: Path) -> SetInstall:
    """Extract one checked zip beside its target, count it, and rename it into place (see the module doc)."""
    base = omniglot_dir(root)
    target, archive = base / c.set_name, base / f"{c.set_name}.zip"
    if target.is_dir():
        scan = scan_folder(target)
        entry = _recorded(root, c.set_name, scan)
        if entry and entry["content_sha256"] == c.digest and scan.layout.problem(c.set_name) is None:
            if not archive.is_file():
                copy_atomic(c.path, archive)
            log.info("%s: the same content is already installed in %s", c.path, target)
            return _result(c, unchanged=True)
    base.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(base, c.set_name)
    log.info("installing %s into %s", c.path, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{c.set_name}.install-", dir=base))
    try:
        safe_extract(c.path, staging)
        scan = scan_folder(staging / c.set_name)
        problem = scan.layout.problem(c.set_name)
        if problem:
            raise DataError(
                f"{c.path} extracted to an incomplete {c.set_name} ({problem}); nothing installed"
            )
        if not (archive.is_file() and archive.samefile(c.path)):
            shutil.copyfile(c.path, staging / archive.name)
        entry = {
            "content_sha256": c.digest,
            "zip_md5": c.md5,
            "verified": c.verified_by is not None,
            "verified_by": c.verified_by or NOT_VERIFIED,
            "alphabets": scan.layout.alphabets,
            "characters": scan.layout.characters,
            "images": scan.layout.images,
            "files": scan.fingerprint,
            "source": str(c.path),
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _commit(staging, root, c.set_name, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if c.verified_by is None:
        log.warning("%s installed UNVERIFIED: its images are not the official Omniglot files", c.set_name)
    return _result(c)


def _commit(staging: Path, root: Path, set_name: str, entry: dict[str, Any]) -> None:
    """Swap the staged set folder (and zip) into place, then record it; the old folder goes last."""
    base = omniglot_dir(root)
    target = base / set_name
    retired = None
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{set_name}.old-", dir=base))
        os.replace(target, retired / set_name)
    os.replace(staging / set_name, target)
    if (staging / f"{set_name}.zip").is_file():
        os.replace(staging / f"{set_name}.zip", base / f"{set_name}.zip")
    _record(root, set_name, entry)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _remove_leftovers(base: Path, set_name: str) -> None:
    """Remove the staging and retired folders of installs of ``set_name`` that were killed mid-way."""
    for pattern in (f".{set_name}.install-*", f".{set_name}.old-*"):
        for path in base.glob(pattern):
            if path.is_dir():
                log.info("removing %s, left by an interrupted install", path)
                shutil.rmtree(path, ignore_errors=True)


def fetch(root: Path) -> list[SetInstall]:
    """Download the official zips (md5-checked) and the Vinyals split lists, then install the zips.

    A zip already in ``<root>/omniglot/`` is not downloaded again; it is verified like any other install.
    """
    base = omniglot_dir(root)
    for name, (url, md5) in OFFICIAL_ZIPS.items():
        path = base / f"{name}.zip"
        if not path.is_file():
            download(url, path, md5)
    for part, md5 in VINYALS_LISTS.items():
        path = base / "splits" / "vinyals" / f"{part}.txt"
        if not path.is_file():
            download(VINYALS_URL.format(part=part), path, md5)
    return install(base, root)


# ----------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class SetStatus:
    """What the data root holds of one set, for ``metalab data info``."""

    name: str
    state: Literal["installed", "zip", "incomplete", "missing"]
    verified: bool | None  # None: nothing complete to verify
    detail: str


def set_status(root: Path, set_name: str) -> SetStatus:
    """Whether ``set_name`` is installed (extracted), only a zip, incomplete (e.g. half extracted) or missing."""
    base = omniglot_dir(root)
    folder, archive = base / set_name, base / f"{set_name}.zip"
    if folder.is_dir():
        scan = scan_folder(folder)
        problem = scan.layout.problem(set_name)
        if problem:
            return SetStatus(set_name, "incomplete", None, f"folder {folder.name}/ has {problem}")
        entry = _recorded(root, set_name, scan)
        if entry is not None:
            verified, how = bool(entry.get("verified")), str(entry.get("verified_by"))
        else:  # extracted by hand, by an older metalab, or changed since its install: look at the content
            how = official_match(set_name, None, content_digest(folder, set_name)) or "content differs"
            verified = how != "content differs"
        counts = f"{scan.layout.characters} characters"
        return SetStatus(set_name, "installed", verified, f"folder {folder.name}/, {counts}, {how}")
    if archive.is_file():
        try:
            checked = _check_zip(archive, verify=False)
        except DataError as e:
            return SetStatus(set_name, "incomplete", None, str(e))
        how = checked.verified_by or "content differs"
        counts = f"{checked.layout.characters} characters"
        return SetStatus(set_name, "zip", checked.verified_by is not None, f"{archive.name}, {counts}, {how}")
    return SetStatus(set_name, "missing", None, f"neither {folder.name}/ nor {archive.name}")


def status(root: Path) -> list[SetStatus]:
    """:func:`set_status` of each set."""
    return [set_status(root, name) for name in SETS]
