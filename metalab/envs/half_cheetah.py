"""Half-cheetah task families of MAML's locomotion experiments (Finn, Abbeel, Levine, ICML 2017, sec. 5.3), on
gymnasium's MuJoCo ``HalfCheetah-v5`` (the ``mujoco`` extra: ``pip install -e ".[mujoco]"``).

- ``metalab/HalfCheetahDir-v0``, forward/backward: task 0 runs forward, task 1 backward; the reward is
  ``direction * v - 0.05 |a|^2``. The family has two tasks, so every split holds both: what is held out at test
  time is the episodes (their initial states), not the task.
- ``metalab/HalfCheetahVel-v0``, goal velocity: the reward is ``-|v - goal| - 0.05 |a|^2`` for a goal velocity
  drawn once from ``np.random.default_rng(2017)``, uniform in [0, 2] (the paper's range; its code's
  ``half_cheetah_env_rand.py`` draws from [0.1, 0.8]): tasks 0-999 train, 1000-1099 val, 1100-1199 test.
- ``metalab/HalfCheetahVelPEARL-v0``, PEARL's goal velocity (Rakelly et al., ICML 2019, "Half-Cheetah-Vel"), the
  task set of its code (github.com/katerakelly/oyster, ``rlkit/envs/half_cheetah_vel.py`` with
  ``configs/cheetah-vel.json``): 130 goal velocities drawn by ``np.random.seed(1337)`` then
  ``np.random.uniform(0.0, 3.0, 130)`` (reproduced exactly by ``np.random.RandomState(1337)``; that file's
  docstring says [0, 2], its code draws from [0, 3]); tasks 0-99 train and 100-129 test, as
  ``launch_experiment.py``'s ``tasks[:n_train_tasks]`` and ``tasks[-n_eval_tasks:]`` with 100 and 30. Tasks
  130-159 are metalab's val goals, 30 more velocities from ``np.random.RandomState(2019)`` on [0, 3], for learning
  curves and choices made without the test goals (the official code has no val tasks). The reward is the same
  ``-|v - goal| - 0.05 |a|^2`` and episodes the same 200 steps (oyster's default ``max_path_length``); the
  observation is the official code's 20-d one (``rlkit/envs/half_cheetah.py``: gymnasium's 17 values, then the
  torso's centre of mass, x, y, z). The official env is gym's mujoco-py ``HalfCheetah-v2``; this one steps
  gymnasium's ``HalfCheetah-v5`` (the same model, frame skip 5 and reset noise 0.1).

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

from metalab.envs.config import quiet_mujoco
from metalab.envs.tasks import check_action, check_options, choose_task

HALF_CHEETAH_DIR_ID = "metalab/HalfCheetahDir-v0"
HALF_CHEETAH_VEL_ID = "metalab/HalfCheetahVel-v0"
HALF_CHEETAH_VEL_PEARL_ID = "metalab/HalfCheetahVelPEARL-v0"

Family = Literal["direction", "velocity", "pearl_velocity"]
FAMILIES = ("direction", "velocity", "pearl_velocity")
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

PEARL_N_TRAIN, PEARL_N_TEST, PEARL_N_VAL = 100, 30, 30
PEARL_MAX_GOAL_VELOCITY = 3.0


def _pearl_goal_velocities() -> np.ndarray:
    # np.random.seed(1337); np.random.uniform(...) in the official code: the legacy generator draws the same.
    official = np.random.RandomState(1337).uniform(0.0, PEARL_MAX_GOAL_VELOCITY, PEARL_N_TRAIN + PEARL_N_TEST)
    val = np.random.RandomState(2019).uniform(0.0, PEARL_MAX_GOAL_VELOCITY, PEARL_N_VAL)
    goals = np.concatenate([official, val])
    goals.setflags(write=False)
    return goals


PEARL_GOAL_VELOCITIES = _pearl_goal_velocities()
"""``(160,)`` goal velocity of each PEARL task: the official code's 130 (train 0-99, test 100-129), then metalab's
val goals 130-159."""


def tasks(family: Family, split: Split) -> list[int]:
    """Task ids of ``split`` in ``family``: both directions in every split; goal velocities 0-999 (train),
    1000-1099 (val), 1100-1199 (test); PEARL's goal velocities 0-99 (train), 100-129 (test), 130-159 (val)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if family == "direction":
        return [0, 1]
    if family == "pearl_velocity":
        first, size = {"train": (0, PEARL_N_TRAIN), "test": (PEARL_N_TRAIN, PEARL_N_TEST),
                       "val": (PEARL_N_TRAIN + PEARL_N_TEST, PEARL_N_VAL)}[split]  # fmt: skip
        return list(range(first, first + size))
    first = {"train": 0, "val": N_TRAIN_GOALS, "test": N_TRAIN_GOALS + N_VAL_GOALS}[split]
    size = {"train": N_TRAIN_GOALS, "val": N_VAL_GOALS, "test": N_TEST_GOALS}[split]
    return list(range(first, first + size))


class HalfCheetahTasks(gym.Env):
    """A half-cheetah task family over ``HalfCheetah-v5``: MAML's ``"direction"`` or ``"velocity"``, or PEARL's
    ``"pearl_velocity"`` (20-d observations: the torso's centre of mass appended).

    ``reset(options=...)`` keys: ``task`` (default: drawn from ``split``) and ``split`` (default ``"train"``).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    _OPTIONS: ClassVar[frozenset[str]] = frozenset({"task", "split"})

    def __init__(self, family: Family = "direction", max_steps: int = HORIZON):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
        if max_steps < 1:
            raise ValueError(f"HalfCheetahTasks needs max_steps >= 1, got {max_steps}")
        self.family, self.max_steps = family, max_steps
        quiet_mujoco()
        self._env = gym.make("HalfCheetah-v5").unwrapped  # our own time limit; MuJoCo is imported here
        extra = 3 if family == "pearl_velocity" else 0  # the torso's centre of mass (the official PEARL code)
        shape = (self._env.observation_space.shape[0] + extra,)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape, np.float32)
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
        return -abs(x_velocity - float(self.goals()[self.task])) - ctrl

    def goals(self) -> np.ndarray:
        """Goal velocity of every task id (velocity families only)."""
        return PEARL_GOAL_VELOCITIES if self.family == "pearl_velocity" else GOAL_VELOCITIES

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        if self.family == "pearl_velocity":
            obs = np.concatenate([obs, self._env.get_body_com("torso")])
        return obs.astype(np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = check_options(options, self._OPTIONS)
        n_tasks = len(DIRECTIONS) if self.family == "direction" else len(self.goals())
        self.task = choose_task(options, n_tasks, self.tasks, self.np_random)
        inner_seed = int(
            self.np_random.integers(2**31)
        )  # the MuJoCo env's initial-state noise, from our seed
        obs, _ = self._env.reset(seed=inner_seed)
        self._steps = 0
        return self._obs(obs), {"task": self.task}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = check_action(action, self.action_space.shape[0])
        obs, _, _, _, info = self._env.step(a.astype(np.float32))
        self._steps += 1
        velocity = float(info["x_velocity"])
        out = {"task": self.task, "x_velocity": velocity, "x_position": float(info["x_position"])}
        return self._obs(obs), self.reward(velocity, a), False, self._steps >= self.max_steps, out
