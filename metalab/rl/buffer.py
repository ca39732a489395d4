"""A circular replay buffer over preallocated NumPy arrays (Lin 1992; Mnih et al. 2015).

Rows go in as :class:`Experience` (NumPy, one row per transition, as recorded from episodes or relabeled by
:mod:`metalab.rl.her`) and come out as :class:`Transitions` (torch tensors, a sampled minibatch). Once full,
new rows overwrite the oldest ones.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch


class Experience(NamedTuple):
    """Transitions as NumPy arrays, one row each (``T`` rows); goal fields are ``(T, 0)`` for plain envs."""

    obs: np.ndarray  # (T, obs_dim) float32
    achieved_goal: np.ndarray  # (T, goal_dim) goal achieved in obs
    desired_goal: np.ndarray  # (T, goal_dim) goal pursued
    action: np.ndarray  # (T,) int64 for discrete actions, (T, act_dim) float32 for continuous
    reward: np.ndarray  # (T,) float32
    next_obs: np.ndarray  # (T, obs_dim)
    next_achieved_goal: np.ndarray  # (T, goal_dim) goal achieved in next_obs: what the reward depends on
    terminated: np.ndarray  # (T,) bool: next_obs is terminal (no bootstrapping); time limits are not

    @property
    def rows(self) -> int:
        """Number of transitions (``len()`` of a NamedTuple counts its fields)."""
        return int(self.reward.shape[0])


class Transitions(NamedTuple):
    """A minibatch for a TD update (torch tensors, ``B`` rows)."""

    obs: torch.Tensor  # (B, obs_dim)
    goal: torch.Tensor  # (B, goal_dim) the desired goal the transition is replayed with
    action: torch.Tensor  # (B,) int64 or (B, act_dim)
    reward: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, obs_dim)
    done: torch.Tensor  # (B,) float 1.0 where next_obs is terminal

    def to(self, device: torch.device | str) -> Transitions:
        return Transitions(*(t.to(device) for t in self))


class ReplayBuffer:
    """Holds the last ``capacity`` rows of each :class:`Experience` field; arrays are allocated on first add."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.pos = 0
        """Row the next add writes to."""
        self.size = 0
        """Rows filled so far (at most ``capacity``)."""
        self._data: Experience | None = None

    def __len__(self) -> int:
        return self.size

    def add(self, rows: Experience) -> None:
        """Append ``rows``, wrapping around and overwriting the oldest rows when full."""
        if self._data is None:
            self._data = Experience(
                *(np.zeros((self.capacity, *column.shape[1:]), dtype=column.dtype) for column in rows)
            )
        n = rows.rows
        if n > self.capacity:  # only the newest `capacity` rows would survive anyway
            rows, n = Experience(*(column[-self.capacity :] for column in rows)), self.capacity
        index = (self.pos + np.arange(n)) % self.capacity  # (n,) slots, wrapping past the end
        for store, column in zip(self._data, rows, strict=True):
            store[index] = column
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch: int, rng: np.random.Generator) -> Transitions:
        """``batch`` rows drawn uniformly with replacement."""
        if self._data is None or self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        index = rng.integers(0, self.size, size=batch)  # (B,)
        d = self._data
        return Transitions(
            obs=torch.from_numpy(d.obs[index]),
            goal=torch.from_numpy(d.desired_goal[index]),
            action=torch.from_numpy(d.action[index]),
            reward=torch.from_numpy(d.reward[index]),
            next_obs=torch.from_numpy(d.next_obs[index]),
            done=torch.from_numpy(d.terminated[index].astype(np.float32)),
        )

    def filled(self) -> Experience:
        """The filled rows (a view, in storage order, not age order)."""
        if self._data is None:
            raise ValueError("the replay buffer is empty")
        return Experience(*(column[: self.size] for column in self._data))

    def state(self) -> dict[str, Any]:
        """Filled rows and write position as tensors and ints (loadable with ``weights_only=True``)."""
        columns = (
            {}
            if self._data is None
            else {k: torch.from_numpy(v.copy()) for k, v in self.filled()._asdict().items()}
        )
        return {"capacity": self.capacity, "pos": self.pos, "size": self.size, "columns": columns}

    def load_state(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"checkpointed buffer holds {state['capacity']} rows, this one {self.capacity}")
        self._data = None
        if state["columns"]:
            filled = Experience(**{k: v.numpy() for k, v in state["columns"].items()})
            self._data = Experience(
                *(np.zeros((self.capacity, *column.shape[1:]), dtype=column.dtype) for column in filled)
            )
            for store, column in zip(self._data, filled, strict=True):
                store[: state["size"]] = column
        self.pos, self.size = int(state["pos"]), int(state["size"])
