"""Omniglot (Lake et al., Science 2015): install, download, decode once, and the Vinyals / Lake class splits.

Layout under the data root, as the official zips unpack::

    <root>/omniglot/images_background.zip         964 characters, 30 alphabets (optional once extracted)
    <root>/omniglot/images_evaluation.zip         659 characters, 20 alphabets
    <root>/omniglot/images_background/<Alphabet>/characterNN/<ID>_<DD>.png   (after `metalab data install`)
    <root>/omniglot/splits/vinyals/{train,val,trainval,test}.txt   lines "Alphabet/characterNN/rotDDD"

Images are read from the extracted folders when present, else straight from the zips (so a read-only root
of zips works), resized once to ``image_size`` and cached as one uint8 tensor under the cache root. Ink is
stored as 255 on a 0 background (the originals are black strokes on white).
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metalab.data.root import (
    cache_root,
    copy_atomic,
    download,
    open_zip,
    safe_extract,
    safe_member_names,
)
from metalab.errors import DataError
from metalab.utils import atomic_path

log = logging.getLogger(__name__)

SETS = ("images_background", "images_evaluation")
DRAWINGS = 20
CACHE_VERSION = 1
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
# The Vinyals split lists as used by Prototypical Networks (jakesnell/prototypical-networks, MIT license).
SPLIT_PARTS = ("train", "val", "trainval", "test")
VINYALS_LISTS = {
    "train": "433d1fcc2b20dcee2983ceb524586f7f",
    "val": "78c535fa427b12b6596908376a0b3f34",
    "trainval": "888433268015439fd05fb6e9006ead50",
    "test": "43534e6d5f9e74acbb7de1b4874abad8",
}
VINYALS_URL = f"{_BASE}/jakesnell/prototypical-networks/master/data/splits/vinyals/{{part}}.txt"


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


# ---------------------------------------------------------------------------------------------- install


def install(source: Path, root: Path, image_size: int = 28) -> OmniglotImages:
    """Install from a folder holding the official zips (and optionally ``splits/``) or from one zip.

    Each zip is checked (readable, CRCs, no unsafe member paths, official layout), copied into the data root
    and extracted there; split lists found beside the zips are copied too. Ends by building the decoded cache.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"nothing to install: {source} does not exist")
    zips = [source] if source.is_file() else [source / f"{name}.zip" for name in SETS]
    zips = [z for z in zips if z.is_file()]
    if not zips:
        raise DataError(f"{source} holds neither images_background.zip nor images_evaluation.zip")
    dest = omniglot_dir(root)
    for path in zips:
        set_name = _check_official_zip(path)
        log.info("installing %s into %s", path.name, dest)
        safe_extract(path, dest)
        copy_atomic(path, dest / f"{set_name}.zip")
    splits = source / "splits" / "vinyals" if source.is_dir() else source.parent / "splits" / "vinyals"
    for part in SPLIT_PARTS:
        if (splits / f"{part}.txt").is_file():
            copy_atomic(splits / f"{part}.txt", dest / "splits" / "vinyals" / f"{part}.txt")
    return load(root, image_size)


def _check_official_zip(path: Path) -> str:
    """The set name (images_background / images_evaluation) that a zip holds, after checking it."""
    with open_zip(path) as archive:
        names = safe_member_names(archive)
        tops = {n.split("/", 1)[0] for n in names if "/" in n}
        sets = [s for s in SETS if s in tops]
        if len(sets) != 1 or not any(n.endswith(".png") for n in names):
            raise DataError(f"{path} does not have the official Omniglot layout (images_*/<Alphabet>/...png)")
        bad = archive.testzip()
        if bad is not None:
            raise DataError(f"{path}: member {bad!r} fails its CRC check; the zip is corrupt")
    return sets[0]


def fetch(root: Path, image_size: int = 28) -> OmniglotImages:
    """Download the official zips and the Vinyals split lists (md5-checked), then install them."""
    dest = omniglot_dir(root)
    for name, (url, md5) in OFFICIAL_ZIPS.items():
        path = dest / f"{name}.zip"
        if not path.is_file():
            download(url, path, md5)
        if not (dest / name).is_dir():
            safe_extract(path, dest)
    for part, md5 in VINYALS_LISTS.items():
        path = dest / "splits" / "vinyals" / f"{part}.txt"
        if not path.is_file():
            download(VINYALS_URL.format(part=part), path, md5)
    return load(root, image_size)


# ----------------------------------------------------------------------------------------------- decode


def _png_sources(root: Path) -> dict[str, Path]:
    """For each set, the extracted folder if present, else the zip; DataError if neither is there."""
    base = omniglot_dir(root)
    found = {}
    for name in SETS:
        if (base / name).is_dir():
            found[name] = base / name
        elif (base / f"{name}.zip").is_file():
            found[name] = base / f"{name}.zip"
        else:
            raise DataError(
                f"Omniglot not found: neither {base / name} nor {base / name}.zip exists. Run "
                f"`metalab data install omniglot --from DIR_WITH_ZIPS` or `metalab data install omniglot "
                f"--download`, or point --data-root / $METALAB_DATA at a folder that has omniglot/"
            )
    return found


def _iter_pngs(source: Path) -> Iterator[tuple[str, bytes]]:
    """(path relative to the set folder, PNG bytes), sorted, from an extracted folder or a zip."""
    if source.is_dir():
        for path in sorted(source.rglob("*.png")):
            yield path.relative_to(source).as_posix(), path.read_bytes()
        return
    with open_zip(source) as archive:
        for name in sorted(n for n in safe_member_names(archive) if n.endswith(".png")):
            yield name.split("/", 1)[1], archive.read(name)


def _decode(png: bytes, size: int, where: str) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(png)).convert("L")
    except OSError as e:
        raise DataError(f"cannot decode {where}: {e}") from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(image, dtype=np.uint8)  # ink high


def decode(root: Path, image_size: int = 28) -> OmniglotImages:
    """Read every PNG under the data root and resize it (about 10 s on one core; use :func:`load`)."""
    sources = _png_sources(root)
    chars: dict[str, list[np.ndarray]] = {}
    in_background: dict[str, bool] = {}
    total = 32460
    with tqdm(total=total, desc=f"decode omniglot {image_size}px", unit="img", disable=None) as bar:
        for set_name, source in sources.items():
            for rel, png in _iter_pngs(source):
                parts = rel.split("/")
                if len(parts) != 3:
                    raise DataError(
                        f"{source}: unexpected path {rel!r} (want <Alphabet>/characterNN/<file>.png)"
                    )
                key = f"{parts[0]}/{parts[1]}"
                chars.setdefault(key, []).append(_decode(png, image_size, f"{source}:{rel}"))
                in_background[key] = set_name == "images_background"
                bar.update()
    bad = [k for k, v in chars.items() if len(v) != DRAWINGS]
    if bad:
        raise DataError(f"character {bad[0]} has {len(chars[bad[0]])} drawings, expected {DRAWINGS}")
    names = sorted(chars, key=lambda k: (not in_background[k], k))
    images = torch.from_numpy(np.stack([np.stack(chars[k]) for k in names]))  # (C, 20, H, W)
    return OmniglotImages(images, names, torch.tensor([in_background[k] for k in names]))


def cache_path(root: Path, image_size: int) -> Path:
    tag = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return cache_root() / "omniglot" / f"omniglot_{image_size}px_{tag}.pt"


def load(root: Path, image_size: int = 28) -> OmniglotImages:
    """Decoded Omniglot from the cache, decoding and caching it first if needed."""
    path = cache_path(root, image_size)
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            if blob.get("version") == CACHE_VERSION and blob.get("root") == str(root):
                return OmniglotImages(blob["images"], list(blob["names"]), blob["background"])
        except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
            log.warning("ignoring unreadable Omniglot cache %s (%s); decoding again", path, e)
    data = decode(root, image_size)
    blob = {
        "version": CACHE_VERSION,
        "root": str(root),
        "images": data.images,
        "names": data.names,
        "background": data.background,
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return data


# ------------------------------------------------------------------------------------------------ splits


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

    Vinyals: 1028 / 172 / 423 characters (train / val / test), each in 4 rotations. Lake: 964 background
    characters for training, 659 evaluation characters for testing; it has no val part.
    """
    if split == "lake":
        if part not in ("train", "test"):
            raise DataError(
                f"the Lake split has only 'train' (background) and 'test' (evaluation), not {part!r}"
            )
        chosen = torch.nonzero(data.background == (part == "train")).flatten()
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
