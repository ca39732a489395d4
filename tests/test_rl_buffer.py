"""Replay buffer: wrap-around, sampling as tensors, and a checkpoint round trip through weights_only loading."""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import pytest
import torch

from metalab.rl.buffer import Experience, ReplayBuffer, Transitions


def rows(start: int, count: int) -> Experience:
    """``count`` transitions whose every field encodes its row id ``start .. start+count-1``."""
    ids = np.arange(start, start + count)
    return Experience(
        obs=ids[:, None].astype(np.float32).repeat(3, 1),
        achieved_goal=ids[:, None].astype(np.float32),
        desired_goal=-ids[:, None].astype(np.float32),
        action=ids.astype(np.int64),
        reward=ids.astype(np.float32),
        next_obs=(ids + 1)[:, None].astype(np.float32).repeat(3, 1),
        next_achieved_goal=(ids + 1)[:, None].astype(np.float32),
        terminated=ids % 2 == 0,
    )


def test_wraps_around_overwriting_the_oldest_rows() -> None:
    buffer = ReplayBuffer(5)
    buffer.add(rows(0, 3))
    assert (len(buffer), buffer.pos) == (3, 3)
    buffer.add(rows(3, 4))  # ids 3, 4 fill slots 3, 4; ids 5, 6 wrap to slots 0, 1
    assert (len(buffer), buffer.pos) == (5, 2)
    assert buffer.filled().action.tolist() == [5, 6, 2, 3, 4]
    assert buffer.filled().obs[:, 0].tolist() == [5, 6, 2, 3, 4]
    buffer.add(rows(7, 12))  # more than the capacity: only the newest 5 survive
    assert sorted(buffer.filled().action.tolist()) == [14, 15, 16, 17, 18]
    assert (len(buffer), buffer.pos) == (5, 2)


def test_sample_returns_consistent_tensor_rows() -> None:
    buffer = ReplayBuffer(100)
    buffer.add(rows(0, 10))
    batch = buffer.sample(64, np.random.default_rng(0))
    assert isinstance(batch, Transitions)
    assert batch.obs.shape == (64, 3) and batch.goal.shape == (64, 1) and batch.action.dtype == torch.int64
    ids = batch.action
    assert set(ids.tolist()) <= set(range(10)) and len(set(ids.tolist())) > 5
    assert torch.equal(batch.obs[:, 0], ids.float()) and torch.equal(batch.goal[:, 0], -ids.float())
    assert torch.equal(batch.reward, ids.float()) and torch.equal(batch.next_obs[:, 0], ids.float() + 1)
    assert torch.equal(batch.done, (ids % 2 == 0).float())
    same = buffer.sample(64, np.random.default_rng(0))
    assert all(torch.equal(a, b) for a, b in zip(batch, same, strict=True))


def test_state_round_trip_with_weights_only_load() -> None:
    buffer = ReplayBuffer(6)
    buffer.add(rows(0, 8))
    blob = io.BytesIO()
    torch.save(buffer.state(), blob)
    blob.seek(0)
    restored = ReplayBuffer(6)
    restored.load_state(torch.load(blob, weights_only=True))
    assert (restored.pos, restored.size) == (buffer.pos, buffer.size)
    for a, b in zip(buffer.filled(), restored.filled(), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    buffer.add(rows(8, 3))
    restored.add(rows(8, 3))  # and it continues identically
    assert np.array_equal(buffer.filled().action, restored.filled().action)
    with pytest.raises(ValueError, match="holds 6 rows"):
        ReplayBuffer(7).load_state(buffer.state())
    empty = ReplayBuffer(4)
    empty.load_state(ReplayBuffer(4).state())
    assert len(empty) == 0


def test_errors() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(3).sample(1, np.random.default_rng(0))


class Sequences(NamedTuple):
    inputs: np.ndarray  # (rows, T, D)
    length: np.ndarray  # (rows,)


def test_buffer_stores_any_row_type_and_round_trips_its_state() -> None:
    buffer: ReplayBuffer[Sequences] = ReplayBuffer(3, Sequences)
    for i in range(5):  # wraps: rows 2, 3, 4 survive, row 3 at slot 0
        buffer.add(Sequences(np.full((1, 4, 2), i, np.float32), np.array([i])))
    assert sorted(buffer.filled().length.tolist()) == [2, 3, 4]
    sampled = buffer.sample_rows(8, np.random.default_rng(0))
    assert sampled.inputs.shape == (8, 4, 2) and set(sampled.length.tolist()) <= {2, 3, 4}
    assert np.all(sampled.inputs[:, 0, 0] == sampled.length)  # columns stay aligned
    assert buffer.rows(np.array([0, 0, 2])).length.tolist() == [3, 3, 2]  # by storage slot
    with pytest.raises(IndexError, match="out of range"):
        buffer.rows(np.array([3]))
    with pytest.raises(TypeError, match="Sequences rows"):
        buffer.add(rows(0, 1))  # an Experience
    with pytest.raises(TypeError, match="sample_rows"):
        buffer.sample(2, np.random.default_rng(0))
    copy: ReplayBuffer[Sequences] = ReplayBuffer(3, Sequences)
    copy.load_state(buffer.state())
    for a, b in zip(copy.filled(), buffer.filled(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (copy.pos, copy.size) == (buffer.pos, buffer.size)
