"""Sinusoid regression tasks (MAML sec. 5.1): shapes, ranges, the true function, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from metalab.data.sinusoid import AMPLITUDE, PHASE, X_RANGE, SinusoidTasks, sinusoid
from metalab.data.tasks import TaskConfig, make_sampler


def test_shapes() -> None:
    ep = SinusoidTasks(k_shot=10, q_query=7, seed=0).sample(0, 25)
    assert ep.support_x.shape == (25, 10, 1) and ep.support_y.shape == (25, 10, 1)
    assert ep.query_x.shape == (25, 7, 1) and ep.query_y.shape == (25, 7, 1)
    assert ep.support_y.dtype == torch.float32
    assert (ep.n_way, ep.k_shot, ep.q_query, ep.tasks) == (1, 10, 7, 25)


def test_targets_follow_the_task_function() -> None:
    tasks = SinusoidTasks(k_shot=5, q_query=5, seed=3)
    ep = tasks.sample(9, 50)
    amplitude, phase = tasks.functions(9, 50)
    assert amplitude.shape == phase.shape == (50,)
    a, p = amplitude[:, None, None], phase[:, None, None]
    torch.testing.assert_close(ep.support_y, a * torch.sin(ep.support_x - p))
    torch.testing.assert_close(ep.query_y, sinusoid(ep.query_x, a, p))
    # A different batch has other functions.
    assert not torch.equal(tasks.functions(10, 50)[0], amplitude)


def test_ranges() -> None:
    tasks = SinusoidTasks(k_shot=10, q_query=10, seed=0)
    amplitude, phase = tasks.functions(0, 2000)
    ep = tasks.sample(0, 2000)
    assert AMPLITUDE[0] <= float(amplitude.min()) and float(amplitude.max()) <= AMPLITUDE[1]
    assert PHASE == (0.0, pytest.approx(math.pi))
    assert PHASE[0] <= float(phase.min()) and float(phase.max()) <= PHASE[1]
    x = torch.cat([ep.support_x, ep.query_x], 1)
    assert X_RANGE[0] <= float(x.min()) and float(x.max()) <= X_RANGE[1]
    # The ranges are covered, not just respected.
    assert float(amplitude.min()) < 0.3 and float(amplitude.max()) > 4.8
    assert float(x.min()) < -4.9 and float(x.max()) > 4.9
    assert float(ep.support_y.abs().max()) <= AMPLITUDE[1]


def test_determinism() -> None:
    a = SinusoidTasks(5, 5, seed=1).sample(4, 8)
    b = SinusoidTasks(5, 5, seed=1).sample(4, 8)
    for x, y in zip(a[:4], b[:4], strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.support_x, SinusoidTasks(5, 5, seed=1).sample(5, 8).support_x)
    assert not torch.equal(a.support_x, SinusoidTasks(5, 5, seed=2).sample(4, 8).support_x)


@pytest.mark.parametrize(("k", "q"), [(0, 5), (5, 0)])
def test_rejects_empty_sets(k: int, q: int) -> None:
    with pytest.raises(ValueError):
        SinusoidTasks(k, q)


def test_sampler_parts_are_different_tasks(tmp_path) -> None:
    """Training, validation and test draw different tasks, although val and test share the evaluation seed."""
    cfg = TaskConfig(dataset="sinusoid", ways=1, shots=5, queries=5)
    train = make_sampler(cfg, "train", 0, tmp_path)
    val = make_sampler(cfg, "val", 1_000_003, tmp_path)
    test = make_sampler(cfg, "test", 1_000_003, tmp_path)
    amplitudes = [s.functions(0, 50)[0] for s in (train, val, test)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(amplitudes[i], amplitudes[j])
    assert torch.equal(make_sampler(cfg, "val", 1_000_003, tmp_path).functions(0, 50)[0], amplitudes[1])
