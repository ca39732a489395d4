"""Atomic checkpoints with every RNG state, loaded with ``weights_only=True`` (no pickled code runs on load)."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalab.errors import CheckpointError
from metalab.utils import atomic_path


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states, as tensors and plain values only."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a missing or unreadable file raises a one-line CheckpointError.

    The message names the file and the cause in our words: torch's own text is several lines long and suggests
    loading with ``weights_only=False``, which would run whatever code the file holds.
    """
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied") from None
    except Exception as e:  # torch raises several unrelated types for a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {load_failure(e)}") from None


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def load_failure(error: BaseException) -> str:
    """Why a weights-only ``torch.load`` failed, in one line that never repeats torch's advice."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in text:
        found = _UNSAFE_GLOBAL.search(text)
        what = f" (found {found.group(1)})" if found else ""
        return f"it holds objects other than tensors and plain data; refusing to load it{what}"
    return "truncated or corrupt"


def state_mismatch(error: BaseException) -> str:
    """One line for a ``load_state_dict`` failure: torch lists every mismatched tensor on lines of its own."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    details = [line for line in lines if not line.startswith("Error(s) in loading state_dict")]
    if not details:
        return lines[0] if lines else type(error).__name__
    first = details[0].rstrip(".")
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return first + more
