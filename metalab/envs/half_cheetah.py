"""Half-cheetah task families of MAML's locomotion experiments (Finn, Abbeel, Levine, ICML 2017, sec. 5.3), on
gymnasium's MuJoCo ``HalfCheetah-v5`` (the ``mujoco`` extra: ``pip install -e ".[mujoco]"``).

- ``metalab/HalfCheetahDir-v0``, forward/backward: task 0 runs forward, task 1 backward; the reward is
  ``direction * v - 0.05 |a|^2``. The family has two tasks, so every split holds both: what is held out at test
  time is the episodes (their initial states), not the task.
- ``metalab/HalfCheetahVel-v0``, goal velocity: the reward is ``-|v - goal| - 0.05 |a|^2`` for a goal velocity
  drawn once from ``np.random.default_rng(2017)``, uniform in [0, 2] (the paper's range; its code's
  ``half_cheetah_env_rand.py`` draws from [0.1, 0.8]): tasks 0-999 train, 1000-1099 val, 1100-1199 test.

Choices and their sources (the paper's code = github.com/cbfinn/maml_rl, ``rllab/envs/mujoco/
half_cheetah_env_rand_direc.py`` and ``half_cheetah_env_rand.py``):

- ``v`` is the env's ``info["x_velocity"]``, the root's forward displacement over the step divided by ``dt``
  (the paper's code: the torso's centre-of-mass velocity); the control cost ``0.5 * 0.1 |a|^2`` is the paper
  code's (gymnasium's own reward uses ``0.1 |a|^2``), on the action clipped to ``[-1, 1]``.
- Episodes: 200 steps (the paper's ``max_path_length``), never terminating; the observation is gymnasium's
  17-d default (joint positions without the root's x, and velocities; the paper's code adds the torso's
  centre of mass). ``info`` holds ``task``, ``x_velocity`` and ``x_position`` (the root's, from 0 at reset:
  its final value is the episode's forward progress).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from metalab.envs.tasks import check_action, check_options, choose_task

HALF_CHEETAH_DIR_ID = "metalab/HalfCheetahDir-v0"
HALF_CHEETAH_VEL_ID = "metalab/HalfCheetahVel-v0"

Family = Literal["direction", "velocity"]
Split = Literal["train", "val", "test"]

HORIZON = 200
"""Steps per episode (the paper's ``max_path_length`` for the half-cheetah)."""
CTRL_COST = 0.05
"""Control cost per unit ``|a|^2`` (the paper's code: ``1e-1 * 0.5``)."""
N_TRAIN_GOALS, N_VAL_GOALS, N_TEST_GOALS = 1000, 100, 100
MAX_GOAL_VELOCITY = 2.0


def _goal_velocities() -> np.ndarray:
    goals = np.random.default_rng(2017).uniform(
        0.0, MAX_GOAL_VELOCITY, N_TRAIN_GOALS + N_VAL_GOALS + N_TEST_GOALS
    )
    goals.setflags(write=False)
    return goals


GOAL_VELOCITIES = _goal_velocities()
"""``(1200,)`` goal velocity of each goal-velocity task: train 0-999, val 1000-1099, test 1100-1199."""
DIRECTIONS = np.array([1.0, -1.0])
"""Task 0 forward, task 1 backward."""


def tasks(family: Family, split: Split) -> list[int]:
    """Task ids of ``split`` in ``family``: both directions in every split; goal velocities 0-999 (train),
    1000-1099 (val), 1100-1199 (test)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if family == "direction":
        return [0, 1]
    first = {"train": 0, "val": N_TRAIN_GOALS, "test": N_TRAIN_GOALS + N_VAL_GOALS}[split]
    size = {"train": N_TRAIN_GOALS, "val": N_VAL_GOALS, "test": N_TEST_GOALS}[split]
    return list(range(first, first + size))


class HalfCheetahTasks(gym.Env):
    """MAML's half-cheetah task family ``family`` (``"direction"`` or ``"velocity"``) over ``HalfCheetah-v5``.

    ``reset(options=...)`` keys: ``task`` (default: drawn from ``split``) and ``split`` (default ``"train"``).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    _OPTIONS: ClassVar[frozenset[str]] = frozenset({"task", "split"})

    def __init__(self, family: Family = "direction", max_steps: int = HORIZON):
        if family not in ("direction", "velocity"):
            raise ValueError(f"family must be 'direction' or 'velocity', got {family!r}")
        if max_steps < 1:
            raise ValueError(f"HalfCheetahTasks needs max_steps >= 1, got {max_steps}")
        self.family, self.max_steps = family, max_steps
        self._env = gym.make("HalfCheetah-v5").unwrapped  # our own time limit; MuJoCo is imported here
        self.observation_space = spaces.Box(-np.inf, np.inf, self._env.observation_space.shape, np.float32)
        self.action_space = self._env.action_space
        self.task = 0
        """The hidden task of the current episode (privileged: not in the observation)."""
        self._steps = 0

    def tasks(self, split: Split) -> list[int]:
        """Task ids of ``split``; see :func:`tasks`."""
        return tasks(self.family, split)

    def reward(self, x_velocity: float, action: np.ndarray) -> float:
        """The current task's reward for forward velocity ``x_velocity`` and ``action``."""
        ctrl = CTRL_COST * float(np.square(np.clip(action, -1.0, 1.0)).sum())
        if self.family == "direction":
            return float(DIRECTIONS[self.task]) * x_velocity - ctrl
        return -abs(x_velocity - float(GOAL_VELOCITIES[self.task])) - ctrl

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = check_options(options, self._OPTIONS)
        n_tasks = len(DIRECTIONS) if self.family == "direction" else len(GOAL_VELOCITIES)
        self.task = choose_task(options, n_tasks, self.tasks, self.np_random)
        inner_seed = int(
            self.np_random.integers(2**31)
        )  # the MuJoCo env's initial-state noise, from our seed
        obs, _ = self._env.reset(seed=inner_seed)
        self._steps = 0
        return obs.astype(np.float32), {"task": self.task}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = check_action(action, self.action_space.shape[0])
        obs, _, _, _, info = self._env.step(a.astype(np.float32))
        self._steps += 1
        velocity = float(info["x_velocity"])
        out = {"task": self.task, "x_velocity": velocity, "x_position": float(info["x_position"])}
        return obs.astype(np.float32), self.reward(velocity, a), False, self._steps >= self.max_steps, out
