"""BitFlip: the bit-flipping goal environment of Hindsight Experience Replay (Andrychowicz et al., NeurIPS 2017).

The state and the goal are vectors in ``{0,1}^n``; an action flips one bit. The reward is 0 once the state
equals the goal (the episode then terminates) and -1 otherwise, and an episode is truncated after ``n`` steps,
which always suffice. Random exploration almost never reaches the goal for ``n >= 15`` or so: the rewards are
all -1 and carry no signal, which is what hindsight relabeling fixes.

Observations follow the goal-env convention (a ``Dict`` of ``observation``, ``achieved_goal`` and
``desired_goal``) and :meth:`BitFlip.compute_reward` works on batches, so goal-env tooling (HER buffers) works.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class BitFlip(gym.Env):
    """Flip bits of an ``n``-bit state until it equals the goal; reward -1 per step until then, 0 on success."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, n: int = 10, render_mode: str | None = None):
        if n < 1:
            raise ValueError(f"BitFlip needs n >= 1 bits, got {n}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"BitFlip renders only as 'ansi', got render_mode={render_mode!r}")
        self.n = n
        self.render_mode = render_mode
        bits = spaces.MultiBinary(n)
        self.observation_space = spaces.Dict(
            {
                "observation": bits,
                "achieved_goal": spaces.MultiBinary(n),
                "desired_goal": spaces.MultiBinary(n),
            }
        )
        self.action_space = spaces.Discrete(n)
        self._state = np.zeros(n, dtype=np.int8)
        self._goal = np.ones(n, dtype=np.int8)
        self._steps = 0

    def compute_reward(self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any) -> np.ndarray:
        """0 where ``achieved_goal == desired_goal`` (all bits), else -1; over the last axis of ``(..., n)``."""
        reached = np.all(np.asarray(achieved_goal) == np.asarray(desired_goal), axis=-1)
        return reached.astype(np.float32) - 1.0

    def compute_terminated(
        self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any
    ) -> np.ndarray:
        """True where the goal is reached (the episode ends there); over the last axis of ``(..., n)``."""
        return np.all(np.asarray(achieved_goal) == np.asarray(desired_goal), axis=-1)

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "observation": self._state.copy(),
            "achieved_goal": self._state.copy(),
            "desired_goal": self._goal.copy(),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self._state = self.np_random.integers(0, 2, self.n, dtype=np.int8)
        self._goal = self._state
        while np.array_equal(self._goal, self._state):  # a goal already reached would be a zero-step episode
            self._goal = self.np_random.integers(0, 2, self.n, dtype=np.int8)
        self._steps = 0
        return self._obs(), {"is_success": False}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not a bit index in [0, {self.n})")
        self._state[int(action)] ^= 1  # observations are copies, so flipping in place is safe
        self._steps += 1
        success = bool(self.compute_terminated(self._state, self._goal, None))
        reward = float(self.compute_reward(self._state, self._goal, None))
        truncated = not success and self._steps >= self.n
        return self._obs(), reward, success, truncated, {"is_success": success}

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return f"state {''.join(map(str, self._state))} goal {''.join(map(str, self._goal))}"
