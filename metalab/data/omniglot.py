"""Omniglot (Lake et al., Science 2015): verified installs, download, decode once, and the Vinyals / Lake splits.

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
:func:`load` logs a warning. Concurrent installs into one data root are not supported.

Images are read from the extracted folders when present, else straight from the zips (so a read-only root
of zips works), resized once to ``image_size`` and cached as one uint8 tensor under the cache root. The cache
is keyed by content (a zip's md5, an install's content digest, or the names, sizes and mtimes of extracted files
nobody recorded), so a changed or partial install is never served from an old cache. Ink is stored as 255 on a
0 background (the originals are black strokes on white).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from metalab.data.episodes import Episode, generator_for
from metalab.data.root import (
    cache_root,
    copy_atomic,
    download,
    md5sum,
    open_zip,
    read_member,
    safe_extract,
    safe_member_names,
)
from metalab.errors import ChecksumError, DataError
from metalab.progress import progress
from metalab.utils import atomic_path

log = logging.getLogger(__name__)

SETS = ("images_background", "images_evaluation")
DRAWINGS = 20
MOST_CHARACTERS = 55
"""Characters of the largest alphabet (Tifinagh): the most distinct characters an alphabet-level class has."""
# What a complete set holds: (alphabets, characters); every character has DRAWINGS drawings.
EXPECTED = {"images_background": (30, 964), "images_evaluation": (20, 659)}
CACHE_VERSION = 2
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


@dataclass(frozen=True)
class OmniglotImages:
    """Every Omniglot character, decoded: 1623 characters x 20 drawings."""

    images: torch.Tensor  # (1623, 20, H, W) uint8, ink = 255
    names: list[str]  # "Alphabet/characterNN", same order as images
    background: torch.Tensor  # (1623,) bool: True for images_background (the Lake training set)


@dataclass(frozen=True)
class ClassSplit:
    """The classes of one split, ready for the episode sampler."""

    images: torch.Tensor  # (n_classes, 20, 1, H, W) uint8
    classes: list[str]  # "Alphabet/characterNN/rotDDD"


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
    installed, complete, is left as it is. Decoding is left to :func:`load`, which needs both sets.
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


# ----------------------------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class _Source:
    """Where :func:`load` reads a set from, and what keys its cache."""

    name: str
    path: Path  # extracted folder or zip
    key: str  # "content:<sha256>" (recorded install), "files:<fingerprint>" (unrecorded folder), "zip:<md5>"
    verified: bool | None  # known without decoding (install record, official zip md5), else None


def _reinstall_hint(root: Path, set_name: str) -> str:
    archive = omniglot_dir(root) / f"{set_name}.zip"
    source = archive if archive.is_file() else "DIR_WITH_ZIPS"
    return f"re-install it: `metalab data install omniglot --from {source}`"


def _sources(root: Path) -> list[_Source]:
    """For each set, the extracted folder if present (complete, else DataError), else the zip."""
    base = omniglot_dir(root)
    found = []
    for name in SETS:
        folder, archive = base / name, base / f"{name}.zip"
        if folder.is_dir():
            scan = scan_folder(folder)
            problem = scan.layout.problem(name)
            if problem:
                raise DataError(
                    f"Omniglot {name} in {folder} is incomplete ({problem}; an interrupted install?): "
                    f"{_reinstall_hint(root, name)}"
                )
            entry = _recorded(root, name, scan)
            if entry is not None:
                found.append(
                    _Source(name, folder, f"content:{entry['content_sha256']}", bool(entry["verified"]))
                )
            else:
                found.append(_Source(name, folder, f"files:{scan.fingerprint}", None))
        elif archive.is_file():
            md5 = md5sum(archive)
            found.append(
                _Source(name, archive, f"zip:{md5}", True if official_match(name, md5, None) else None)
            )
        else:
            raise DataError(
                f"Omniglot not found: neither {folder} nor {archive} exists. Run "
                f"`metalab data install omniglot --from DIR_WITH_ZIPS` or `metalab data install omniglot "
                f"--download`, or point --data-root / $METALAB_DATA at a folder that has omniglot/"
            )
    return found


def _decode_png(png: bytes, size: int, where: str) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(png)).convert("L")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode {where}: {e}") from None
    return 255 - np.asarray(image, dtype=np.uint8)  # ink high


def _decode(sources: list[_Source], image_size: int) -> tuple[OmniglotImages, dict[str, str]]:
    """Decode and resize every PNG of ``sources``; also the content digest of each set, computed on the way."""
    chars: dict[str, list[np.ndarray]] = {}
    in_background: dict[str, bool] = {}
    digests: dict[str, str] = {}
    total = sum(EXPECTED[s.name][1] for s in sources) * DRAWINGS
    with progress(total, f"decode omniglot {image_size}px", "img", every=3.0) as bar:
        for source in sources:
            digest, rels = ContentDigest(source.name), []
            for rel, png in _iter_pngs(source.path, source.name):
                digest.add(rel, png)
                rels.append(rel)
                parts = rel.split("/")
                if len(parts) != 3:
                    raise DataError(
                        f"{source.path}: unexpected path {rel!r} (want <Alphabet>/characterNN/<file>.png)"
                    )
                key = f"{parts[0]}/{parts[1]}"
                chars.setdefault(key, []).append(_decode_png(png, image_size, f"{source.path}:{rel}"))
                in_background[key] = source.name == "images_background"
                bar.update()
            problem = layout(rels).problem(source.name)
            if problem:
                raise DataError(
                    f"Omniglot {source.name} in {source.path} is incomplete ({problem}): "
                    f"{_reinstall_hint(source.path.parent.parent, source.name)}"
                )
            digests[source.name] = digest.hexdigest()
    bad = [k for k, v in chars.items() if len(v) != DRAWINGS]
    if bad:
        raise DataError(f"character {bad[0]} has {len(chars[bad[0]])} drawings, expected {DRAWINGS}")
    names = sorted(chars, key=lambda k: (not in_background[k], k))
    images = torch.from_numpy(np.stack([np.stack(chars[k]) for k in names]))  # (C, 20, H, W)
    return OmniglotImages(images, names, torch.tensor([in_background[k] for k in names])), digests


def decode(root: Path, image_size: int = 28) -> OmniglotImages:
    """Read every PNG under the data root and resize it (about 10 s on one core; use :func:`load`)."""
    return _decode(_sources(root), image_size)[0]


def _cache_key(sources: list[_Source], image_size: int) -> str:
    text = json.dumps([CACHE_VERSION, image_size, [[s.name, s.key] for s in sources]])
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_file(key: str, image_size: int) -> Path:
    return cache_root() / "omniglot" / f"omniglot_{image_size}px_{key[:16]}.pt"


def cache_path(root: Path, image_size: int) -> Path:
    """The cache file for the data under ``root`` as it is now: another content means another file."""
    return _cache_file(_cache_key(_sources(root), image_size), image_size)


def _read_cache(path: Path, key: str) -> tuple[OmniglotImages, dict[str, bool]] | None:
    """The decoded images and each set's verified flag from a cache file, or None if it is absent or unusable."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if blob.get("version") == CACHE_VERSION and blob.get("key") == key:
            data = OmniglotImages(blob["images"], list(blob["names"]), blob["background"])
            return data, {str(k): bool(v) for k, v in blob["verified"].items()}
        log.info("Omniglot cache %s is for other data or an older format; decoding again", path)
    except (
        OSError,
        RuntimeError,
        EOFError,
        KeyError,
        AttributeError,
        TypeError,
        pickle.UnpicklingError,
    ) as e:
        log.warning("ignoring unreadable Omniglot cache %s (%s); decoding again", path, e)
    return None


def _is_verified(source: _Source, digest: str) -> bool:
    """Whether a decoded set is the official files: as its install recorded, else by its content digest."""
    if source.verified is not None:
        return source.verified
    return official_match(source.name, None, digest) is not None


def load(root: Path, image_size: int = 28) -> OmniglotImages:
    """Decoded Omniglot from the content-keyed cache, decoding and caching it first if needed.

    Logs a warning when a set is not the official files (installed with ``--no-verify``, or a modified copy).
    """
    sources = _sources(root)
    key = _cache_key(sources, image_size)
    path = _cache_file(key, image_size)
    cached = _read_cache(path, key)
    if cached is None:
        data, digests = _decode(sources, image_size)
        verified = {s.name: _is_verified(s, digests[s.name]) for s in sources}
        blob = {
            "version": CACHE_VERSION,
            "key": key,
            "sources": {s.name: s.key for s in sources},
            "digests": digests,
            "verified": verified,
            "images": data.images,
            "names": data.names,
            "background": data.background,
        }
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
    else:
        data, verified = cached
    for source in sources:
        if not verified.get(source.name, False):
            log.warning(
                "Omniglot %s (%s) is UNVERIFIED: its images are not the official files (installed with "
                "--no-verify, or modified); results on it are not comparable to published ones",
                source.name,
                source.path,
            )
    return data


# ------------------------------------------------------------------------------------------------ splits


LAKE_VAL_EVERY = 6
"""Lake val: background alphabets number 0, 6, 12, 18, 24 in name order (5 of 30)."""
_LAKE = {"train": {"train"}, "val": {"val"}, "trainval": {"train", "val"}, "test": {"test"}}


def lake_parts(data: OmniglotImages) -> list[str]:
    """The Lake part (``train``, ``val`` or ``test``) of each character of ``data``, in its order."""
    flags = data.background.tolist()
    background = sorted({n.split("/")[0] for n, b in zip(data.names, flags, strict=True) if b})
    val = {a for i, a in enumerate(background) if i % LAKE_VAL_EVERY == 0}
    return [
        "test" if not b else ("val" if n.split("/")[0] in val else "train")
        for n, b in zip(data.names, flags, strict=True)
    ]


def read_split_list(root: Path, part: str) -> list[str]:
    path = omniglot_dir(root) / "splits" / "vinyals" / f"{part}.txt"
    if not path.is_file():
        raise DataError(
            f"Vinyals split list missing: {path}. Install with `metalab data install omniglot --from DIR` "
            f"(DIR/splits/vinyals/*.txt) or `--download`"
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_classes(
    data: OmniglotImages,
    root: Path,
    split: Literal["vinyals", "lake"],
    part: Literal["train", "val", "trainval", "test"],
) -> ClassSplit:
    """The classes of ``part`` of ``split``: Vinyals (rotations are classes of their own) or Lake (no rotations).

    Vinyals: 1028 / 172 / 423 characters (train / val / test), each in 4 rotations. Lake: the 659 evaluation
    characters are ``test``; the background alphabets are split into ``val`` (every
    :data:`LAKE_VAL_EVERY`-th alphabet in name order, 5 of the 30) and ``train`` (the other 25), with
    ``trainval`` all 964 background characters. Lake's val never holds an evaluation alphabet.
    """
    if split == "lake":
        if part not in SPLIT_PARTS:
            raise DataError(f"the Lake split has parts {', '.join(SPLIT_PARTS)}, not {part!r}")
        chosen = torch.tensor([i for i, p in enumerate(lake_parts(data)) if p in _LAKE[part]])
        return ClassSplit(data.images[chosen].unsqueeze(2), [f"{data.names[i]}/rot000" for i in chosen])
    if split != "vinyals":
        raise DataError(f"unknown Omniglot split {split!r}; choose 'vinyals' or 'lake'")
    index = {name: i for i, name in enumerate(data.names)}
    lines = read_split_list(root, part)
    chars, rots = [], []
    for line in lines:
        *char, rot = line.split("/")
        name = "/".join(char)
        if name not in index or not rot.startswith("rot") or int(rot[3:]) % 90:
            raise DataError(f"split list {part}.txt: cannot resolve {line!r}")
        chars.append(index[name])
        rots.append(int(rot[3:]) // 90)
    base = data.images[torch.tensor(chars)]  # (n, 20, H, W)
    rot_t = torch.tensor(rots)
    out = torch.empty_like(base)
    for k in range(4):  # 4 vectorised rotations, not one per class
        sel = rot_t == k
        out[sel] = torch.rot90(base[sel], k, dims=(-2, -1))
    return ClassSplit(out.unsqueeze(2), lines)


# ---------------------------------------------------------------------------------------- alphabet level


@dataclass(frozen=True)
class AlphabetClasses:
    """The characters of one split part grouped by alphabet: the classes of alphabet-level episodes.

    A class is one alphabet in one rotation, ``Alphabet/rotDDD``: the Vinyals split makes each rotation of a
    character a character of its own, so the rotated characters of an alphabet make an alphabet of their own
    (the Lake split has rotation 0 only, so its classes are the alphabets).
    """

    images: torch.Tensor  # (n_characters, 20, 1, H, W) uint8: the part's characters, as ClassSplit.images
    members: torch.Tensor  # (n_alphabets, most) int64: the characters of each class, -1 past its count
    counts: torch.Tensor  # (n_alphabets,) int64: characters per class
    alphabets: list[str]  # "Alphabet/rotDDD", in the order of members


def alphabet_classes(classes: ClassSplit, min_characters: int = 1) -> AlphabetClasses:
    """Group the characters of ``classes`` (names ``Alphabet/characterNN/rotDDD``) by alphabet and rotation,
    keeping the classes of at least ``min_characters`` characters (sorted by name)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(classes.classes):
        parts = name.split("/")
        if len(parts) != 3:
            raise DataError(f"cannot read an alphabet from class {name!r} (want Alphabet/characterNN/rotDDD)")
        groups.setdefault(f"{parts[0]}/{parts[2]}", []).append(i)
    kept = sorted(key for key, chars in groups.items() if len(chars) >= min_characters)
    counts = torch.tensor([len(groups[key]) for key in kept], dtype=torch.long)
    members = torch.full((len(kept), int(counts.max()) if kept else 0), -1, dtype=torch.long)
    for row, key in enumerate(kept):
        members[row, : len(groups[key])] = torch.tensor(groups[key])
    return AlphabetClasses(classes.images, members, counts, kept)


AlphabetQueries = Literal["new_characters", "support_characters"]
"""What an alphabet episode's queries draw: characters not in its support set, or new drawings of its support
characters (:class:`AlphabetSampler`)."""


class AlphabetSampler:
    """Alphabet-level episodes (the alphabet recognition task of Allen et al., "Infinite Mixture Prototypes for
    Few-Shot Learning", ICML 2019): each class is an alphabet, and its K + Q examples are one random drawing each
    of K + Q distinct characters of it, so no character is in both the support and the query set and a class's
    support spans several characters (one prototype per class is too few).

    A pure function of ``(seed, index)``, like :class:`~metalab.data.episodes.EpisodeSampler`; labels and layout
    as in :class:`~metalab.data.episodes.Episode` (examples grouped by class, labels in the order drawn).

    Args:
        classes: the alphabet classes (:func:`alphabet_classes`).
        n_way: alphabets per episode (N).
        k_shot: support characters per alphabet (K).
        q_query: query characters per alphabet; every class needs at least ``k_shot + q_query`` characters.
        seed: the sampler's stream; batch ``index`` of seed ``s`` is always the same episodes.
        queries: ``new_characters`` (the default, above) or ``support_characters``: each query is another
            drawing of one of the class's K support characters (Q distinct character-drawing pairs), as the
            official IMP code builds its alphabet episodes; every class then needs only ``k_shot`` characters.
    """

    def __init__(
        self,
        classes: AlphabetClasses,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        queries: AlphabetQueries = "new_characters",
    ):
        n_classes = len(classes.alphabets)
        if not 1 <= n_way <= n_classes:
            raise ValueError(f"n_way={n_way} but there are {n_classes} alphabet classes")
        fewest = int(classes.counts.min())
        if queries == "support_characters":
            others = k_shot * (classes.images.shape[1] - 1)
            if k_shot < 1 or k_shot > fewest or not 0 <= q_query <= others:
                raise ValueError(
                    f"k_shot={k_shot} must fit in the {fewest} characters of the smallest alphabet class and "
                    f"q_query={q_query} in the {others} other drawings of the support characters"
                )
        elif k_shot < 1 or q_query < 0 or k_shot + q_query > fewest:
            raise ValueError(
                f"k_shot={k_shot} + q_query={q_query} must fit in the {fewest} characters of the smallest "
                f"alphabet class"
            )
        self.classes, self.n_way, self.k_shot, self.q_query, self.seed = classes, n_way, k_shot, q_query, seed
        self.queries = queries

    def draw(self, index: int, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(T, N, K+Q)`` characters (indices into ``classes.images``) of batch ``index``, support then
        query of each class, and the drawing of each."""
        g = generator_for(self.seed, index)
        members, n, kq = self.classes.members, self.n_way, self.k_shot + self.q_query
        classes = torch.multinomial(torch.ones(tasks, members.shape[0]), n, replacement=False, generator=g)
        keys = torch.rand(tasks, n, members.shape[1], generator=g)  # (T, N, most)
        keys = keys.masked_fill(members[classes] < 0, 2.0)  # padding sorts after every character
        if self.queries == "support_characters":  # the official code's episodes: queries redraw support chars
            k, per = self.k_shot, self.classes.images.shape[1]
            picks = keys.argsort(-1)[..., :k]  # (T, N, K): distinct characters of each alphabet
            drawn = torch.randint(per, (tasks, n, k), generator=g)
            # Q distinct (support character, other drawing) pairs per class
            pairs = torch.rand(tasks, n, k * (per - 1), generator=g).argsort(-1)[..., : self.q_query]
            which, offset = pairs // (per - 1), pairs % (per - 1)
            chars = members[classes[..., None], picks]
            query_chars = chars.gather(-1, which)
            query_drawn = (drawn.gather(-1, which) + 1 + offset) % per  # never the support drawing
            return torch.cat([chars, query_chars], -1), torch.cat([drawn, query_drawn], -1)
        picks = keys.argsort(-1)[..., :kq]  # (T, N, K+Q): distinct characters of each alphabet
        drawings = torch.randint(self.classes.images.shape[1], (tasks, n, kq), generator=g)
        return members[classes[..., None], picks], drawings

    def sample(self, index: int, tasks: int) -> Episode:
        """Episode batch number ``index`` with ``tasks`` tasks; images as float in [0, 1]."""
        n, k, q = self.n_way, self.k_shot, self.q_query
        chars, drawings = self.draw(index, tasks)
        images = self.classes.images[chars, drawings].float().div_(255.0)  # (T, N, K+Q, C, H, W)
        shape = images.shape[3:]
        labels = torch.arange(n)
        return Episode(
            images[:, :, :k].reshape(tasks, n * k, *shape),
            labels.repeat_interleave(k).expand(tasks, -1).contiguous(),
            images[:, :, k:].reshape(tasks, n * q, *shape),
            labels.repeat_interleave(q).expand(tasks, -1).contiguous(),
            n,
            k,
            q,
        )
