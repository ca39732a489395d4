"""Sparse point robot: the 2-D navigation task of PEARL (Rakelly, Zhou, Quillen, Finn, Levine, "Efficient
Off-Policy Meta-Reinforcement Learning via Probabilistic Context Variables", ICML 2019), without MuJoCo.

A point starts at (0, 0) and moves by its action each step; the task is a goal on the upper half of the unit
circle, and the reward is non-zero only within 0.2 of the goal, so a policy must search the arc to find it.

Choices and their sources (PEARL's code = github.com/katerakelly/oyster, ``rlkit/envs/point_robot.py``
(``SparsePointEnv``) and ``configs/sparse-point-robot.json``):

- Goals: 100 angles evenly spaced on [0, pi] (``np.linspace(0, pi, 100)``, both ends included) at radius 1,
  then shuffled by ``np.random.RandomState(1337)`` as PEARL does (``np.random.seed(1337)``, then
  ``np.random.shuffle``), so task ``i`` here is PEARL's task ``i``. Tasks 0-79 are the training tasks and
  80-99 the held-out ones (PEARL: ``tasks[:n_train_tasks]`` and ``tasks[-n_eval_tasks:]`` with 80 and 20).
- Reward (our issue #8, which is PEARL's ``sparse_reward``): ``1 - d`` when the distance ``d`` to the goal is at
  most 0.2, else 0, after the move. PEARL's ``step`` returns the dense ``-d`` and puts the sparse reward in
  ``info``, its algorithm choosing between them (``sparse_rewards: 1`` in that config); here the reward is
  the sparse one and ``info["dense_reward"]`` holds ``-d``.
- Actions: a Box [-0.1, 0.1]^2 (PEARL's ``action_space``); actions outside it are clipped (PEARL's
  ``NormalizedBoxEnv`` wrapper clips, its ``PointEnv.step`` does not).
- Episodes: start at (0, 0), never terminate (PEARL's ``done`` is always False), truncated after 20 steps
  (``max_path_length: 20``). Observations are the position, float32 (PEARL), in a Box of the reachable
  positions, ``max_steps * 0.1 + 0.01`` either way (PEARL: unbounded).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from metalab.envs.tasks import check_action, check_options, choose_task

POINT_ROBOT_SPARSE_ID = "metalab/PointRobotSparse-v0"

Split = Literal["train", "val", "test"]

N_TASKS = 100
N_TRAIN_TASKS = 80
GOAL_RADIUS = 0.2
"""Reward is non-zero within this distance of the goal."""
MAX_ACTION = 0.1
"""Each action coordinate is clipped to [-MAX_ACTION, MAX_ACTION]."""


def _goals() -> np.ndarray:
    angles = np.linspace(0.0, np.pi, num=N_TASKS)
    goals = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (100, 2)
    # The legacy RandomState, seeded 1337, shuffles exactly like PEARL's np.random.seed(1337); np.random.shuffle.
    np.random.RandomState(1337).shuffle(goals)
    goals.setflags(write=False)
    return goals


GOALS = _goals()
"""``(100, 2)`` goal of each task, in PEARL's task order."""

N_VAL_TASKS = 20


def _val_goals() -> np.ndarray:
    # Midpoints between neighbouring task angles: on the same arc, never a training or test goal; 20 of the 99,
    # chosen once by a fixed generator, so PEARL's training and test tasks stay exactly PEARL's.
    step = np.pi / (N_TASKS - 1)
    chosen = np.sort(np.random.RandomState(2019).choice(N_TASKS - 1, N_VAL_TASKS, replace=False))
    angles = (chosen + 0.5) * step
    goals = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (20, 2)
    goals.setflags(write=False)
    return goals


VAL_GOALS = _val_goals()
"""``(20, 2)`` goals of the val tasks (ids 100-119): metalab's, not PEARL's, for learning curves and choices
made without the 20 test goals."""
_ALL_GOALS = np.concatenate([GOALS, VAL_GOALS])


def tasks(split: Split) -> list[int]:
    """Task ids of ``split``: ``"train"`` (0-79), ``"test"`` (80-99, PEARL's eval tasks) or ``"val"`` (100-119,
    :data:`VAL_GOALS`)."""
    if split == "train":
        return list(range(N_TRAIN_TASKS))
    if split == "val":
        return list(range(N_TASKS, N_TASKS + N_VAL_TASKS))
    if split == "test":
        return list(range(N_TRAIN_TASKS, N_TASKS))
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def sparse_reward(distance: np.ndarray | float) -> np.ndarray:
    """``1 - d`` where the distance ``d`` to the goal is <= 0.2, else 0; elementwise over any shape."""
    d = np.asarray(distance, dtype=np.float64)
    return np.where(d <= GOAL_RADIUS, 1.0 - d, 0.0)


_RENDER_PX = 50  # pixels per unit
_RENDER_X, _RENDER_Y = (-1.5, 1.5), (-0.5, 1.5)  # world window


class PointRobotSparse(gym.Env):
    """PEARL's sparse point robot (ICML 2019): find a hidden goal on the unit half circle from (0, 0).

    ``reset(options=...)`` keys: ``task`` (int in [0, 100); default: drawn from ``split``) and ``split``
    (``"train"`` or ``"test"``; default ``"train"``).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 10}
    _OPTIONS: ClassVar[frozenset[str]] = frozenset({"task", "split"})

    def __init__(self, max_steps: int = 20, render_mode: str | None = None):
        if max_steps < 1:
            raise ValueError(f"PointRobotSparse needs max_steps >= 1, got {max_steps}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"PointRobotSparse renders only as 'rgb_array', got render_mode={render_mode!r}")
        self.max_steps = max_steps
        self.render_mode = render_mode
        # Reachable positions plus a rounding margin (PEARL: unbounded; the gymnasium checker warns on infinite bounds).
        bound = max_steps * MAX_ACTION + 0.01
        self.observation_space = spaces.Box(-bound, bound, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-MAX_ACTION, MAX_ACTION, shape=(2,), dtype=np.float32)
        self.task = 0
        """The hidden task of the current episode (privileged: not in the observation)."""
        self._pos = np.zeros(2)
        self._steps = 0

    @staticmethod
    def tasks(split: Split) -> list[int]:
        """Task ids of ``split`` (``"train"``: 80, ``"test"``: 20); see :func:`tasks`."""
        return tasks(split)

    @property
    def goal(self) -> np.ndarray:
        """The current task's goal ``(2,)``."""
        return _ALL_GOALS[self.task]

    @property
    def position(self) -> np.ndarray:
        """The point's position ``(2,)`` (a copy)."""
        return self._pos.copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = check_options(options, self._OPTIONS)
        self.task = choose_task(options, len(_ALL_GOALS), tasks, self.np_random)
        self._pos = np.zeros(2)
        self._steps = 0
        return self._pos.astype(np.float32), {"task": self.task}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = check_action(action, 2)
        self._pos = self._pos + np.clip(a, -MAX_ACTION, MAX_ACTION)
        self._steps += 1
        distance = float(np.linalg.norm(self._pos - self.goal))
        reward = float(sparse_reward(distance))
        info = {
            "task": self.task,
            "distance": distance,
            "dense_reward": -distance,
            "is_success": distance <= GOAL_RADIUS,
        }
        return self._pos.astype(np.float32), reward, False, self._steps >= self.max_steps, info

    def render(self) -> np.ndarray | None:
        """``(100, 150, 3)`` uint8 of the window [-1.5, 1.5] x [-0.5, 1.5]: goals, goal disk, point."""
        if self.render_mode != "rgb_array":
            return None
        width = round((_RENDER_X[1] - _RENDER_X[0]) * _RENDER_PX)
        height = round((_RENDER_Y[1] - _RENDER_Y[0]) * _RENDER_PX)
        img = np.full((height, width, 3), 255, dtype=np.uint8)  # (H, W, 3)
        cols = _RENDER_X[0] + (np.arange(width) + 0.5) / _RENDER_PX  # (W,) world x of each pixel column
        rows = _RENDER_Y[1] - (np.arange(height) + 0.5) / _RENDER_PX  # (H,) world y, upwards on screen
        xx, yy = np.meshgrid(cols, rows)  # (H, W)

        def disk(center: np.ndarray, radius: float, color: tuple[int, int, int]) -> None:
            img[(xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2] = color

        disk(self.goal, GOAL_RADIUS, (190, 240, 190))
        for i, g in enumerate(GOALS):
            disk(g, 0.02, (150, 150, 150) if i < N_TRAIN_TASKS else (120, 120, 230))
        disk(self.goal, 0.03, (0, 150, 0))
        disk(self._pos, 0.04, (220, 0, 0))
        return img


def posterior_sampling_success(
    episodes: int = 10, trials: int = 20_000, max_steps: int = 20, seed: int = 0, angles: int = 1801
) -> tuple[np.ndarray, np.ndarray]:
    """Success of an ideal posterior-sampling explorer in each episode of a trial on the held-out goals: a
    reference for PEARL, calculated by Monte Carlo, not learned.

    The explorer believes the goal uniform on the arc (``angles`` evenly spaced points on [0, pi]); in each
    episode it samples a goal from its exact posterior, moves straight to it at full speed and stays there.
    Without reward on the way, the posterior drops every angle within 0.2 of a visited position; after any reward
    it knows the goal (optimistic: one reward pins it to at most two points) and ends every later episode on it.
    As PEARL's policy, it cannot react to reward within an episode (its ``z`` is fixed per episode). Returns the
    success rate of episode ``k`` (after ``k`` earlier ones) for ``k < episodes``, ``(episodes,)``, and the
    95% half-widths.
    """
    rng = np.random.default_rng(seed)
    theta = np.linspace(0.0, np.pi, angles)
    arc = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # (A, 2) the believed goals
    # the straight line to each angle, the larger coordinate moving 0.1 a step
    paths = np.zeros((angles, max_steps, 2))
    pos = np.zeros((angles, 2))
    for t in range(max_steps):
        gap = arc - pos
        pos = pos + gap * np.minimum(1.0, MAX_ACTION / np.maximum(np.abs(gap).max(1, keepdims=True), 1e-12))
        paths[:, t] = pos
    # excluded[j, a]: angle a is within 0.2 of the path to angle j (so a reward-free episode rules it out)
    excluded = np.zeros((angles, angles), dtype=bool)
    for t in range(max_steps):
        excluded |= np.linalg.norm(paths[:, t, None] - arc[None], axis=2) <= GOAL_RADIUS
    # hits[g, j, t]: step t of the path to angle j is within 0.2 of held-out goal g
    hits = np.linalg.norm(paths[None] - GOALS[tasks("test"), None, None], axis=3) <= GOAL_RADIUS
    success = np.zeros((trials, episodes))
    for i in range(trials):
        gap = hits[i % len(hits)]  # (A, T)
        alive = np.ones(angles, dtype=bool)
        for e in range(episodes):
            j = rng.choice(np.flatnonzero(alive))
            success[i, e] = float(gap[j, -1])
            if gap[j].any():  # a reward on the way: the goal is known from here on
                success[i, e + 1 :] = 1.0
                break
            alive &= ~excluded[j]
            if not alive.any():  # every grid angle ruled out (a goal between grid points): a miss
                break
    return success.mean(0), 1.96 * success.std(0, ddof=1) / np.sqrt(trials)
