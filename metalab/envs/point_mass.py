"""Point mass to a goal: a family of 2-D reaching tasks with the same dynamics and a goal per task, for
multi-task model-based RL (:mod:`metalab.rl.multitask_mbrl`; the reacher / point-mass goal families of the
multi-task RL literature, e.g. Yu et al., "Meta-World", CoRL 2019, and the DeepMind Control Suite's
``point_mass``, Tassa et al. 2018).

Choices (metalab's own; no reference implementation is followed):

- State ``(x, y, vx, vy)``, float32; the action is a force in ``[-1, 1]^2`` (clipped), unit mass.
- Dynamics: semi-implicit Euler with ``dt = 0.1`` and linear damping ``c = 0.5``:
  ``v' = v + dt (a - c v)``, ``p' = p + dt v'``. A speed never exceeds ``1 / c = 2`` per coordinate; from rest a
  full push covers the unit distance in about 14 steps.
- Episodes start at rest at the origin, never terminate and are truncated after 50 steps.
- Reward of a step: ``-||p' - g|| - 0.01 ||a||^2`` with ``p'`` the position after it and ``a`` the clipped
  force (:func:`goal_reward`). The goal ``g`` is not in the observation: a policy or planner must be told the
  task, or infer it from rewards.
- Success: the final position is within 0.1 of the goal (``info["is_success"]`` of the last step).
- Goals: 70 drawn once, uniformly by area in the annulus ``0.3 <= ||g|| <= 1`` (so that staying at the origin
  never succeeds), from ``numpy.random.default_rng(31)``; the first 40 are the training tasks (ids 0-39), the
  next 10 the val tasks (40-49), the last 20 the test tasks (50-69): :data:`GOALS`, :func:`tasks`.

``reset(options={"task": i})`` chooses the task, as :class:`metalab.envs.point_robot.PointRobotSparse` does
(without it, a task is drawn from ``options["split"]``, default ``"train"``, with the reset seed).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from metalab.envs.tasks import check_action, check_options, choose_task
from metalab.rl.planners import RewardFn

POINT_MASS_ID = "metalab/PointMassGoal-v0"

Split = Literal["train", "val", "test"]

DT = 0.1
"""Seconds per step."""
DAMPING = 0.5
"""Linear damping ``c`` of ``v' = v + dt (a - c v)``, per second."""
MAX_FORCE = 1.0
"""Each action coordinate is clipped to ``[-MAX_FORCE, MAX_FORCE]``."""
MAX_STEPS = 50
"""Steps of an episode (then truncated)."""
ACTION_COST = 0.01
"""Weight of ``||a||^2`` in the reward."""
SUCCESS_RADIUS = 0.1
"""An episode succeeds when its final position is closer than this to the goal."""
GOAL_RADII = (0.3, 1.0)
"""Goals lie in this annulus."""
SPLIT_SIZES = {"train": 40, "val": 10, "test": 20}
"""Tasks of each split, numbered in this order (train 0-39, val 40-49, test 50-69)."""
GOAL_SEED = 31


def _goals() -> np.ndarray:
    rng = np.random.default_rng(GOAL_SEED)
    n = sum(SPLIT_SIZES.values())
    inner, outer = GOAL_RADII
    radius = np.sqrt(rng.uniform(inner**2, outer**2, n))  # uniform by area
    angle = rng.uniform(0.0, 2 * np.pi, n)
    goals = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)  # (70, 2)
    goals.setflags(write=False)
    return goals


ALL_GOALS = _goals()
"""``(70, 2)`` goal of every task id."""


def tasks(split: Split) -> list[int]:
    """Task ids of ``split``: ``"train"`` (0-39), ``"val"`` (40-49) or ``"test"`` (50-69)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_SIZES)}, got {split!r}")
    names = list(SPLIT_SIZES)
    first = sum(SPLIT_SIZES[name] for name in names[: names.index(split)])
    return list(range(first, first + SPLIT_SIZES[split]))


GOALS: dict[str, np.ndarray] = {split: ALL_GOALS[tasks(split)] for split in SPLIT_SIZES}
"""The goals of each split, ``(tasks, 2)``, in task-id order."""


def goal_reward(
    obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor, goal: torch.Tensor
) -> torch.Tensor:
    """``-||p' - g|| - 0.01 ||clip(a)||^2`` of the task with goal ``g``, elementwise over leading dimensions:
    ``obs`` ``(..., 4)`` (unused), ``action`` ``(..., 2)``, ``next_obs`` ``(..., 4)`` (its first two entries the
    position ``p'``), ``goal`` ``(..., 2)`` -> ``(...)``."""
    a = action.clamp(-MAX_FORCE, MAX_FORCE)
    return -torch.linalg.vector_norm(next_obs[..., :2] - goal, dim=-1) - ACTION_COST * (a**2).sum(-1)


def reward_fn(goal: torch.Tensor | np.ndarray) -> RewardFn:
    """The task's reward as a planner's :data:`~metalab.rl.planners.RewardFn` ``(obs, action, next_obs) -> r``
    for a goal ``(2,)``."""
    g = torch.tensor(np.asarray(goal), dtype=torch.float32)

    def reward(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return goal_reward(obs, action, next_obs, g.to(next_obs.device))

    return reward


class PointMassGoal(gym.Env):
    """A unit point mass pushed by a bounded force to a hidden goal (see the module docstring for the constants).

    ``reset(options=...)`` keys: ``task`` (an id in ``[0, 70)``; default: drawn from ``split``) and ``split``
    (``"train"``, ``"val"`` or ``"test"``; default ``"train"``).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    _OPTIONS: ClassVar[frozenset[str]] = frozenset({"task", "split"})

    def __init__(self, max_steps: int = MAX_STEPS):
        if max_steps < 1:
            raise ValueError(f"PointMassGoal needs max_steps >= 1, got {max_steps}")
        self.max_steps = max_steps
        speed = MAX_FORCE / DAMPING  # the bound of each velocity coordinate, from rest
        reach = max_steps * DT * speed + 0.01
        high = np.array([reach, reach, speed + 0.01, speed + 0.01], dtype=np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-MAX_FORCE, MAX_FORCE, shape=(2,), dtype=np.float32)
        self.task = 0
        """The hidden task of the current episode (privileged: not in the observation)."""
        self._state = np.zeros(4)
        self._steps = 0

    @staticmethod
    def tasks(split: Split) -> list[int]:
        """Task ids of ``split``; see :func:`tasks`."""
        return tasks(split)

    @staticmethod
    def goal_of(task: int) -> np.ndarray:
        """Task ``task``'s goal ``(2,)``."""
        return ALL_GOALS[task]

    @property
    def goal(self) -> np.ndarray:
        """The current task's goal ``(2,)``."""
        return ALL_GOALS[self.task]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = check_options(options, self._OPTIONS)
        self.task = choose_task(options, len(ALL_GOALS), tasks, self.np_random)
        self._state = np.zeros(4)
        self._steps = 0
        return self._state.astype(np.float32), {"task": self.task}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = check_action(action, 2)
        a = np.clip(a, -MAX_FORCE, MAX_FORCE)
        position, velocity = self._state[:2], self._state[2:]
        velocity = velocity + DT * (a - DAMPING * velocity)  # semi-implicit Euler: the new velocity moves
        position = position + DT * velocity
        self._state = np.concatenate([position, velocity])
        self._steps += 1
        distance = float(np.linalg.norm(position - self.goal))
        reward = -distance - ACTION_COST * float(a @ a)
        info = {"task": self.task, "distance": distance, "is_success": distance < SUCCESS_RADIUS}
        return self._state.astype(np.float32), reward, False, self._steps >= self.max_steps, info
