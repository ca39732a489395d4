"""2D navigation: the point-agent task family of MAML's reinforcement-learning experiments (Finn, Abbeel, Levine,
"Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017, sec. 5.3).

A point starts at the origin and moves by its action each step; the task is a goal drawn uniformly from the
square [-0.5, 0.5]^2, hidden from the agent (the observation is the position only), and the reward is minus the
Euclidean distance to it. One policy-gradient step on a few episodes of a new task must find the goal.

Choices and their sources (the paper's code = github.com/cbfinn/maml_rl, ``maml_examples/point_env_randgoal.py``
(``PointEnvRandGoal``) and ``maml_examples/maml_trpo_point.py``):

- Goals: uniform in [-0.5, 0.5]^2 (``sample_goals``). The paper draws fresh goals every meta-iteration; here a
  fixed set of 1200 goals is drawn once from ``np.random.default_rng(2017)``: tasks 0-999 train, 1000-1099 val,
  1100-1199 test (continuous draws, so the splits share no goal).
- Dynamics and reward: ``position += clip(action, -0.1, 0.1)``, then the reward ``-||position - goal||``
  (``step``). The paper's env adds the action unclipped; its ``normalize`` wrapper maps the policy's
  ``[-1, 1]`` output linearly onto the box and clips it, which is clipping here plus the ``[-1, 1] -> box`` map
  that :mod:`metalab.rl.maml_rl` does (as PEARL's ``to_box``).
- Episodes: start at (0, 0); terminate when both coordinates are within 0.01 of the goal (the paper's
  ``done``: ``abs(x) < 0.01 and abs(y) < 0.01``); truncated after 100 steps (``max_path_length = 100``).
- Observations: the position ``(2,)`` float32 (the paper's ``observation_space``), in a Box of the reachable
  positions, ``max_steps * 0.1 + 0.01`` either way (the paper: unbounded; the gymnasium checker warns on
  infinite bounds). ``info`` holds ``task`` and ``distance`` (after the move).

:class:`Navigation2DDiscrete` (``metalab/Navigation2DDiscrete-v0``, metalab's, not the paper's) is the same task
family with 9 discrete actions, for Q-learners such as RL²: stay, or move ``MAX_ACTION`` along either axis or both
(:data:`DISCRETE_MOVES`: the 8 compass directions at the largest move the continuous env allows, the diagonals
``(+-0.1, +-0.1)``, and ``(0, 0)``), the corners, edge midpoints and centre of the continuous action box. The
point then moves on a 0.1 lattice: it can end within 0.05 of a goal on either axis, but within 0.01 on both (and
so terminate early) only for the about 4% of goals that close to a lattice point; the best return on the test goals
is about -4.4 (the continuous env's: -0.50). It also answers to RL²'s names: ``problems(split)`` is
``tasks(split)`` and ``reset(options={"problem": i})`` is ``{"task": i}``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from metalab.envs.tasks import check_action, check_options, choose_task

NAVIGATION_2D_ID = "metalab/Navigation2D-v0"
NAVIGATION_2D_DISCRETE_ID = "metalab/Navigation2DDiscrete-v0"

Split = Literal["train", "val", "test"]

N_TRAIN_TASKS, N_VAL_TASKS, N_TEST_TASKS = 1000, 100, 100
GOAL_HIGH = 0.5
"""Goals are uniform in ``[-GOAL_HIGH, GOAL_HIGH]^2``."""
MAX_ACTION = 0.1
"""Each action coordinate is clipped to ``[-MAX_ACTION, MAX_ACTION]``."""
HORIZON = 100
"""Steps before an episode is truncated (the paper's ``max_path_length``)."""
DONE_TOLERANCE = 0.01
"""An episode terminates when both coordinates are closer than this to the goal."""


def _goals() -> np.ndarray:
    goals = np.random.default_rng(2017).uniform(
        -GOAL_HIGH, GOAL_HIGH, (N_TRAIN_TASKS + N_VAL_TASKS + N_TEST_TASKS, 2)
    )
    goals.setflags(write=False)
    return goals


GOALS = _goals()
"""``(1200, 2)`` goal of each task: train 0-999, val 1000-1099, test 1100-1199."""


def tasks(split: Split) -> list[int]:
    """Task ids of ``split``: ``"train"`` (0-999), ``"val"`` (1000-1099) or ``"test"`` (1100-1199)."""
    starts = {"train": 0, "val": N_TRAIN_TASKS, "test": N_TRAIN_TASKS + N_VAL_TASKS}
    sizes = {"train": N_TRAIN_TASKS, "val": N_VAL_TASKS, "test": N_TEST_TASKS}
    if split not in starts:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    return list(range(starts[split], starts[split] + sizes[split]))


class Navigation2D(gym.Env):
    """MAML's 2D navigation (ICML 2017): reach a hidden goal in [-0.5, 0.5]^2 from (0, 0); reward ``-distance``.

    ``reset(options=...)`` keys: ``task`` (int in [0, 1200); default: drawn from ``split``) and ``split``
    (``"train"``, ``"val"`` or ``"test"``; default ``"train"``).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    _OPTIONS: ClassVar[frozenset[str]] = frozenset({"task", "split"})

    def __init__(self, max_steps: int = HORIZON):
        if max_steps < 1:
            raise ValueError(f"Navigation2D needs max_steps >= 1, got {max_steps}")
        self.max_steps = max_steps
        bound = max_steps * MAX_ACTION + 0.01  # reachable positions plus a rounding margin
        self.observation_space = spaces.Box(-bound, bound, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-MAX_ACTION, MAX_ACTION, shape=(2,), dtype=np.float32)
        self.task = 0
        """The hidden task of the current episode (privileged: not in the observation)."""
        self._pos = np.zeros(2)
        self._steps = 0

    @staticmethod
    def tasks(split: Split) -> list[int]:
        """Task ids of ``split`` (train 1000, val 100, test 100); see :func:`tasks`."""
        return tasks(split)

    @property
    def goal(self) -> np.ndarray:
        """The current task's goal ``(2,)``."""
        return GOALS[self.task]

    @property
    def position(self) -> np.ndarray:
        """The point's position ``(2,)`` (a copy)."""
        return self._pos.copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = check_options(options, self._OPTIONS)
        self.task = choose_task(options, len(GOALS), tasks, self.np_random)
        self._pos = np.zeros(2)
        self._steps = 0
        return self._pos.astype(np.float32), {"task": self.task}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = check_action(action, 2)
        self._pos = self._pos + np.clip(a, -MAX_ACTION, MAX_ACTION)
        self._steps += 1
        gap = self._pos - self.goal
        distance = float(np.sqrt(gap @ gap))
        terminated = bool(np.all(np.abs(gap) < DONE_TOLERANCE))
        info = {"task": self.task, "distance": distance}
        return self._pos.astype(np.float32), -distance, terminated, self._steps >= self.max_steps, info


DISCRETE_MOVES = MAX_ACTION * np.array(
    [[0, 0], [0, 1], [1, 1], [1, 0], [1, -1], [0, -1], [-1, -1], [-1, 0], [-1, 1]], dtype=np.float64
)
"""``(9, 2)`` the move of each discrete action: stay, then N, NE, E, SE, S, SW, W, NW (``+y`` is north)."""


class Navigation2DDiscrete(Navigation2D):
    """:class:`Navigation2D` with 9 discrete actions (:data:`DISCRETE_MOVES`): the same goals, splits, start,
    reward, termination and horizon.

    ``reset(options=...)`` keys: ``task`` or its alias ``problem`` (RL²'s name), and ``split``.
    """

    _OPTIONS: ClassVar[frozenset[str]] = frozenset({"task", "problem", "split"})

    def __init__(self, max_steps: int = HORIZON):
        super().__init__(max_steps)
        self.action_space = spaces.Discrete(len(DISCRETE_MOVES))

    @staticmethod
    def problems(split: Split) -> list[int]:
        """Problem ids of ``split`` for RL²: the task ids, :func:`tasks`."""
        return tasks(split)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        options = check_options(options, self._OPTIONS)
        if "problem" in options:
            if "task" in options:
                raise ValueError("give the task as 'task' or as 'problem', not both")
            options["task"] = options.pop("problem")
        return super().reset(seed=seed, options=options)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an int in [0, {len(DISCRETE_MOVES)}), got {action!r}")
        return super().step(DISCRETE_MOVES[int(action)])
