"""Hindsight Experience Replay relabeling (Andrychowicz et al., "Hindsight Experience Replay", NeurIPS 2017).

An episode that missed its goal still shows how to reach the goals it did achieve. :func:`relabel` replays
each transition with ``k`` substitute goals taken from achieved goals, and recomputes reward and termination
with the environment's own ``compute_reward`` / ``compute_terminated`` from the achieved goal of the NEXT
state (the reward of a transition depends on where it lands). Strategies for choosing the goals (sec. 4.5):

- ``final``: the goal achieved at the end of the episode;
- ``future``: a goal achieved later in the same episode, after the transition (at ``t+1 .. T``);
- ``episode``: a goal achieved anywhere in the same episode (at ``1 .. T``);
- ``random``: a goal achieved anywhere in the replay buffer (drawn from a ``pool`` of achieved goals).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

import numpy as np

from metalab.errors import ConfigError
from metalab.rl.buffer import Experience

GoalFn = Callable[[np.ndarray, np.ndarray, Any], np.ndarray]
"""``(achieved_goal (N, g), desired_goal (N, g), infos) -> (N,)``: a goal env's vectorized reward or termination."""


class Strategy(StrEnum):
    """Where substitute goals come from."""

    FINAL = "final"
    FUTURE = "future"
    EPISODE = "episode"
    RANDOM = "random"

    @classmethod
    def parse(cls, value: str | Strategy, key: str = "her") -> Strategy:
        """``"future"`` -> ``Strategy.FUTURE``; anything else raises ConfigError listing the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise ConfigError(key, f"unknown HER strategy {value!r}; choose one of {choices}") from None


def sample_goals(
    next_achieved: np.ndarray,
    strategy: Strategy,
    k: int,
    rng: np.random.Generator,
    pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Transition index ``(T*k,)`` (each of ``0..T-1`` repeated ``k`` times) and its substitute goal ``(T*k, g)``.

    ``next_achieved`` ``(T, g)`` holds the goal achieved after each of the episode's ``T`` transitions.
    """
    steps = next_achieved.shape[0]
    t = np.repeat(np.arange(steps), k)  # (T*k,)
    if strategy is Strategy.FINAL:
        return t, next_achieved[np.full_like(t, steps - 1)]
    if strategy is Strategy.FUTURE:  # achieved after transition t: next_achieved[t], ..., next_achieved[T-1]
        return t, next_achieved[rng.integers(t, steps)]
    if strategy is Strategy.EPISODE:
        return t, next_achieved[rng.integers(0, steps, size=t.shape)]
    if pool is None or len(pool) == 0:
        raise ValueError("the 'random' strategy needs a non-empty pool of achieved goals")
    return t, pool[rng.integers(0, len(pool), size=t.shape)]


def relabel(
    episode: Experience,
    strategy: Strategy | str,
    k: int,
    compute_reward: GoalFn,
    rng: np.random.Generator,
    *,
    compute_terminated: GoalFn | None = None,
    pool: np.ndarray | None = None,
) -> Experience:
    """``k`` relabeled copies of each transition of ``episode`` (``T*k`` rows, transition-major).

    Args:
        episode: one episode's ``T`` transitions in order (an :class:`Experience`).
        strategy: ``final``, ``future``, ``episode`` or ``random`` (see the module docstring).
        k: substitute goals per transition (identical copies for ``final``: ``k`` sets its replay weight).
        compute_reward: the env's vectorized ``compute_reward(achieved_goal, desired_goal, infos)``.
        rng: draws the goals of ``future``, ``episode`` and ``random``.
        compute_terminated: the env's vectorized termination test; None: the env never terminates on a goal.
        pool: achieved goals ``(M, g)`` to draw from for ``random`` (e.g. the replay buffer's).
    """
    strategy = Strategy.parse(strategy)
    if k < 1:
        raise ValueError(f"k (relabeled goals per transition) must be >= 1, got {k}")
    t, goals = sample_goals(episode.next_achieved_goal, strategy, k, rng, pool)
    achieved = episode.next_achieved_goal[t]  # (T*k, g) where each replayed transition lands
    infos = [{} for _ in range(len(t))]
    reward = np.asarray(compute_reward(achieved, goals, infos), dtype=episode.reward.dtype)  # (T*k,)
    if compute_terminated is None:
        terminated = np.zeros(len(t), dtype=bool)
    else:
        terminated = np.asarray(compute_terminated(achieved, goals, infos), dtype=bool)
    return Experience(
        obs=episode.obs[t],
        achieved_goal=episode.achieved_goal[t],
        desired_goal=goals.astype(episode.desired_goal.dtype),
        action=episode.action[t],
        reward=reward,
        next_obs=episode.next_obs[t],
        next_achieved_goal=achieved,
        terminated=terminated,
    )
