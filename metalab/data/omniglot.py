"""Omniglot (Lake et al., Science 2015): decode once, and the Vinyals / Lake splits.

Images are read from the extracted folders when present, else straight from the zips (so a read-only root
of zips works), resized once to ``image_size`` and cached as one uint8 tensor under the cache root. The cache
is keyed by content (a zip's md5, an install's content digest, or the names, sizes and mtimes of extracted files
nobody recorded), so a changed or partial install is never served from an old cache. Ink is stored as 255 on a
0 background (the originals are black strokes on white).

Installing and checking the official zips, and the layout under the data root:
:mod:`metalab.data.omniglot_install`. Alphabet-level tasks: :mod:`metalab.data.alphabet`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from metalab.data.omniglot_install import (
    DRAWINGS,
    EXPECTED,
    SETS,
    SPLIT_PARTS,
    ContentDigest,
    _iter_pngs,
    _recorded,
    layout,
    official_match,
    omniglot_dir,
    scan_folder,
)
from metalab.data.root import cache_root, md5sum
from metalab.errors import DataError
from metalab.progress import progress
from metalab.utils import atomic_path

log = logging.getLogger(__name__)

CACHE_VERSION = 2


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
