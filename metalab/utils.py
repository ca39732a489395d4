"""Seeding and device choice: one place for each."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from metalab.errors import ConfigError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda requested but no CUDA device is available; use auto or cpu")
    return torch.device(choice)


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write to; it takes ``dest``'s name only if the block succeeds.

    A crash or an exception mid-write leaves ``dest`` as it was (the rename is atomic on one file system). The
    file ends up with the permissions ``open()`` would give it (``0666`` less the umask), not ``mkstemp``'s 0600.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private (0600); give it the mode open() would
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


Params = dict[str, torch.Tensor]
"""Parameters (or any named tensors) of a network by name, as ``torch.func.functional_call`` takes them: the
one type every functional algorithm passes around."""
