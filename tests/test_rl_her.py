"""Hindsight relabeling against hand-computed episodes, for each strategy."""

from __future__ import annotations

import numpy as np
import pytest

from metalab.envs import BitFlip
from metalab.errors import ConfigError
from metalab.rl.buffer import Experience
from metalab.rl.her import Strategy, relabel

ENV = BitFlip(3)
S0, S1, S2, S3 = ([0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1])
GOAL = [0, 1, 1]  # never reached


def episode() -> Experience:
    """From 000 flip bits 0, 1, 2: states 000 -> 100 -> 110 -> 111, goal 011, rewards all -1."""
    states = np.array([S0, S1, S2, S3], dtype=np.float32)
    return Experience(
        obs=states[:-1],
        achieved_goal=states[:-1],
        desired_goal=np.array([GOAL] * 3, dtype=np.float32),
        action=np.array([0, 1, 2]),
        reward=np.full(3, -1.0, dtype=np.float32),
        next_obs=states[1:],
        next_achieved_goal=states[1:],
        terminated=np.zeros(3, dtype=bool),
    )


def do(strategy: str, k: int, pool: np.ndarray | None = None, seed: int = 0) -> Experience:
    return relabel(episode(), strategy, k, ENV.compute_reward, np.random.default_rng(seed),
                   compute_terminated=ENV.compute_terminated, pool=pool)  # fmt: skip


def check_consistent(out: Experience, k: int) -> None:
    """Rows are transition-major copies; reward and termination follow the NEXT achieved goal."""
    ep = episode()
    t = np.repeat(np.arange(3), k)
    for name in ("obs", "achieved_goal", "action", "next_obs", "next_achieved_goal"):
        assert np.array_equal(getattr(out, name), getattr(ep, name)[t]), name
    reached = (out.desired_goal == ep.next_achieved_goal[t]).all(-1)
    assert out.reward.tolist() == [0.0 if r else -1.0 for r in reached]
    assert out.terminated.tolist() == reached.tolist()
    assert out.reward.dtype == np.float32 and out.desired_goal.dtype == np.float32


def goals_of(out: Experience, t: int, k: int) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in g) for g in out.desired_goal[t * k : (t + 1) * k]}


def test_final() -> None:
    out = do("final", k=2)
    assert out.desired_goal.tolist() == [S3] * 6
    assert out.reward.tolist() == [-1, -1, -1, -1, 0, 0]  # only the last transition lands on 111
    assert out.terminated.tolist() == [False] * 4 + [True] * 2
    check_consistent(out, 2)
    never = relabel(episode(), "final", 2, ENV.compute_reward, np.random.default_rng(0))
    assert not never.terminated.any() and never.reward.tolist() == out.reward.tolist()  # envs without it


def test_future() -> None:
    k = 200
    out = do("future", k)
    check_consistent(out, k)
    assert goals_of(out, 0, k) == {tuple(S1), tuple(S2), tuple(S3)}  # states after transition 0
    assert goals_of(out, 1, k) == {tuple(S2), tuple(S3)}
    assert goals_of(out, 2, k) == {tuple(S3)}
    assert out.reward[2 * k :].tolist() == [0.0] * k  # the last transition always reaches its future goal
    assert 0.2 < (out.reward[:k] == 0).mean() < 0.47  # transition 0 succeeds for goal S1 only: 1/3 of draws


def test_episode() -> None:
    k = 200
    out = do("episode", k)
    check_consistent(out, k)
    for t in range(3):  # any achieved goal of the episode, including earlier ones
        assert goals_of(out, t, k) == {tuple(S1), tuple(S2), tuple(S3)}


def test_random_draws_from_the_pool() -> None:
    pool = np.array([S0, S2], dtype=np.float32)
    k = 100
    out = do("random", k, pool)
    check_consistent(out, k)
    assert goals_of(out, 0, k) == {tuple(S0), tuple(S2)}
    assert out.reward[k : 2 * k].tolist() == [
        0.0 if g == S2 else -1.0 for g in out.desired_goal[k : 2 * k].tolist()
    ]
    with pytest.raises(ValueError, match="pool"):
        do("random", 1)


def test_deterministic_given_the_rng() -> None:
    a, b = do("future", 5, seed=7), do("future", 5, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_strategy_is_validated_with_the_choices() -> None:
    assert Strategy.parse("future") is Strategy.FUTURE
    assert Strategy.parse(Strategy.FINAL) is Strategy.FINAL
    with pytest.raises(ConfigError, match="final, future, episode, random") as e:
        do("futur", 1)
    assert e.value.key == "her"
    with pytest.raises(ValueError, match="k"):
        do("final", 0)
