"""Checkpoints: atomic writes, weights-only loading, every RNG state restored, clear errors on bad files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from metalab.errors import CheckpointError
from metalab.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_mismatch,
)


def draw() -> tuple[float, float, float, float, float]:
    """One number from each global generator (including NumPy's cached Gaussian)."""
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.normal()),
        float(torch.rand(1)),
    )


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leave a cached Gaussian in Python's and NumPy's state
    np.random.normal()
    state = rng_state()
    expected = [draw() for _ in range(3)]
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    # Scramble every generator, then restore from the file (read back with weights_only=True).
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw() != expected[0]
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert [draw() for _ in range(3)] == expected


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / "sub" / "checkpoint.pt",
        {"step": 7, "model": model.state_dict(), "optimizer": opt.state_dict()},
    )
    assert path == tmp_path / "sub" / "checkpoint.pt"
    state = load_checkpoint(path)
    assert state["step"] == 7
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    again = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    again.load_state_dict(state["optimizer"])
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]  # no temporary file left


def test_overwrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})

    def broken_save(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def assert_one_line_refusal(error: CheckpointError, path: Path, cause: str) -> None:
    """A checkpoint refusal: one line naming the file and the cause, without torch's text or advice."""
    message = str(error)
    assert "\n" not in message
    assert message == f"cannot read checkpoint {path}: {cause}" or message.startswith(
        f"cannot read checkpoint {path}: {cause} (found "
    )
    assert "weights_only" not in message and "Error" not in message


# 5000 of a 400 kB file: torch raises "OSError: [Errno 22] Invalid argument"; the others: RuntimeError, EOFError,
# UnpicklingError.
@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", 10, 500, 5000, -100])
def test_corrupt_checkpoint(tmp_path: Path, content: bytes | int) -> None:
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, int):  # a checkpoint cut short after this many bytes (negative: short of the end)
        save_checkpoint(path, {"step": 3, "w": torch.zeros(100_000)})
        path.write_bytes(path.read_bytes()[:content])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert_one_line_refusal(info.value, path, "truncated or corrupt")


class Payload:
    """Not a tensor or plain data: a weights-only load must refuse to unpickle it."""


@pytest.mark.parametrize("zipped", [True, False])
def test_pickled_code_is_not_loaded(tmp_path: Path, zipped: bool) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "evil": Payload()}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert_one_line_refusal(
        info.value, path, "it holds objects other than tensors and plain data; refusing to load it"
    )
    assert "Payload" in str(info.value)  # what it found, so the user can tell where the file came from


def test_a_mismatched_state_is_described_in_one_line() -> None:
    small, large = torch.nn.Sequential(torch.nn.Linear(1, 4)), torch.nn.Sequential(torch.nn.Linear(1, 8))
    with pytest.raises(RuntimeError) as info:
        small.load_state_dict(large.state_dict())
    assert len(str(info.value).splitlines()) > 2  # torch's own text: a header and a line per tensor
    line = state_mismatch(info.value)
    assert "\n" not in line
    assert line.startswith("size mismatch for 0.weight") and line.endswith("(and 1 more)")


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path: Path) -> None:
    import os
    import stat

    from metalab.utils import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "results.json") as tmp:
            tmp.write_text("[]")
        plain = tmp_path / "plain.json"
        plain.write_text("[]")
    finally:
        os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "results.json").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode) == 0o644
