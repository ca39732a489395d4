"""Where data lives, and the file plumbing every data set shares: md5, download, safe zip extraction.

The *data root* holds data sets as their owners publish them (``<root>/omniglot/images_background.zip``). It is
``--data-root`` when given, else ``$METALAB_DATA``, else ``~/.cache/metalab``. It may be read-only (tests and CI
point it at a shared folder), so decoded caches go to the *cache root*: ``$METALAB_CACHE``, else
``~/.cache/metalab``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from metalab.errors import ChecksumError, DataError, UnsafeArchiveError
from metalab.progress import progress
from metalab.utils import atomic_path

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("~/.cache/metalab")


def data_root(override: str | Path | None = None) -> Path:
    """The data root: ``override``, else ``$METALAB_DATA``, else ``~/.cache/metalab``."""
    chosen = override or os.environ.get("METALAB_DATA") or DEFAULT_ROOT
    return Path(chosen).expanduser().resolve()


def cache_root() -> Path:
    """Where decoded caches are written: ``$METALAB_CACHE``, else ``~/.cache/metalab``."""
    return Path(os.environ.get("METALAB_CACHE") or DEFAULT_ROOT).expanduser().resolve()


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise ChecksumError(
            f"{path} has md5 {actual}, expected {expected}: the file is corrupt or not the right one"
        )


def download(url: str, dest: Path, md5: str | None) -> Path:
    """Fetch ``url`` to ``dest`` (atomically: a partial download never takes the final name), checking ``md5``."""
    try:
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                desc = f"download {dest.name}"
                with progress(total, desc, "B", unit_scale=True) as bar:
                    while block := response.read(1 << 16):
                        out.write(block)
                        bar.update(len(block))
            if md5 is not None:
                check_md5(tmp, md5)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
    return dest


def safe_member_names(archive: zipfile.ZipFile) -> list[str]:
    """All member names, refusing any that would land outside the extraction folder ("zip slip")."""
    names = archive.namelist()
    for name in names:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or name.startswith(("/", "\\")) or ".." in path.parts or ":" in path.parts[0]:
            raise UnsafeArchiveError(f"{archive.filename}: refusing unsafe member path {name!r}")
    return names


def open_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip, turning a truncated or non-zip file into a DataError that names it."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable zip file ({e}); re-download or re-install it") from None


# What zipfile raises on a damaged member (bad CRC, broken deflate stream, truncated data, unknown method).
ZIP_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


def read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    """The bytes of member ``name``; a damaged member raises DataError naming the archive and the member."""
    try:
        return archive.read(name)
    except ZIP_MEMBER_ERRORS as e:
        raise DataError(f"{archive.filename}: member {name!r} is corrupt ({e}); the zip is damaged") from None


def safe_extract(path: Path, dest: Path) -> Path:
    """Extract zip ``path`` into ``dest`` after checking every member path; a corrupt member raises DataError."""
    with open_zip(path) as archive:
        names = safe_member_names(archive)
        try:
            bad = archive.testzip()
        except ZIP_MEMBER_ERRORS as e:
            raise DataError(f"{path}: the zip is damaged ({e})") from None
        if bad is not None:
            raise DataError(f"{path}: member {bad!r} fails its CRC check; the zip is corrupt")
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            try:
                archive.extract(name, dest)
            except ZIP_MEMBER_ERRORS as e:
                raise DataError(f"{path}: member {name!r} cannot be extracted ({e})") from None
    return dest


def copy_atomic(src: Path, dest: Path) -> Path:
    """Copy ``src`` to ``dest`` through a temporary name in the same folder, then rename."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest
