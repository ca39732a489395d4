"""Shared fixtures: the read-only Omniglot data root, one decoded-Omniglot cache per session, tiny run configs.

``METALAB_DATA`` points at ``../shared/data`` beside the repository (read-only: zips and split lists) and
``METALAB_CACHE`` at a session temporary folder, so Omniglot is decoded at most once per test session.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from metalab.config import merge

# The tests use tiny tensors: one intra-op thread is faster for them, and it keeps the suite's time stable when
# other processes share the 2 cores (OpenMP workers spinning against a busy machine slow small ops 100-fold).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OMNIGLOT = DATA / "omniglot"

# A MAML sinusoid run small enough to train 20 steps in well under a second.
TINY_SINUSOID: dict[str, Any] = {
    "algo": "maml",
    "seed": 0,
    "task": {"dataset": "sinusoid", "ways": 1, "shots": 5, "queries": 5},
    "train": {
        "steps": 20,
        "meta_batch": 4,
        "lr": 0.01,
        "log_every": 1,
        "eval_every": 10,
        "checkpoint_every": 5,
        "eval_episodes": 8,
        "device": "cpu",
    },
    "eval": {"episodes": 8, "batch": 4},
    "maml": {"inner_lr": 0.01, "inner_steps": 1, "eval_inner_steps": 2, "mlp_hidden": [16, 16]},
}


def omniglot_available() -> bool:
    return (
        all((OMNIGLOT / f"{name}.zip").is_file() for name in ("images_background", "images_evaluation"))
        and (OMNIGLOT / "splits" / "vinyals" / "test.txt").is_file()
    )


@pytest.fixture(scope="session", autouse=True)
def metalab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the data root at the shared data and the cache root at one folder for the whole session."""
    cache = tmp_path_factory.mktemp("metalab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METALAB_DATA", str(DATA))
        mp.setenv("METALAB_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The data root holding omniglot/ (skips the test when the shared data folder is absent)."""
    if not omniglot_available():
        pytest.skip(f"Omniglot data not found under {OMNIGLOT} (need the official zips and splits/vinyals)")
    from metalab.data.root import data_root

    return data_root()


@pytest.fixture(scope="session")
def omniglot_data(omniglot_root: Path):
    """Decoded Omniglot (decoded once per session into the session cache, then read from it)."""
    from metalab.data import omniglot

    return omniglot.load(omniglot_root)


@pytest.fixture
def sinusoid_config() -> Callable[..., dict[str, Any]]:
    """``sinusoid_config(train={"steps": 10})`` -> a fresh copy of the tiny MAML sinusoid config dict, merged."""

    def make(**sections: Any) -> dict[str, Any]:
        return merge(copy.deepcopy(TINY_SINUSOID), sections)

    return make
