"""A circular replay buffer over preallocated NumPy arrays (Lin 1992; Mnih et al. 2015).

Rows go in as :class:`Experience` (NumPy, one row per transition, as recorded from episodes or relabeled by
:mod:`metalab.rl.her`) and come out as :class:`Transitions` (torch tensors, a sampled minibatch). Once full,
new rows overwrite the oldest ones. Any other NamedTuple of NumPy columns can be the row type (meta-RL stores
whole sequences per row); :meth:`ReplayBuffer.sample_rows` then samples it as it is.
"""

from __future__ import annotations

from typing import Any, Generic, NamedTuple, TypeVar

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


Row = TypeVar("Row", bound=tuple)


class ReplayBuffer(Generic[Row]):
    """Holds the last ``capacity`` rows of each field of ``row_type`` (a NamedTuple of NumPy arrays whose first
    axis counts rows; :class:`Experience` by default); arrays are allocated on first add."""

    def __init__(self, capacity: int, row_type: type = Experience):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.row_type = row_type
        self.pos = 0
        """Row the next add writes to."""
        self.size = 0
        """Rows filled so far (at most ``capacity``)."""
        self._data: Row | None = None

    def __len__(self) -> int:
        return self.size

    def _allocate(self, like: Row) -> Row:
        return self.row_type(*(np.zeros((self.capacity, *c.shape[1:]), dtype=c.dtype) for c in like))

    def add(self, rows: Row) -> None:
        """Append ``rows``, wrapping around and overwriting the oldest rows when full."""
        if not isinstance(rows, self.row_type):
            raise TypeError(f"this buffer stores {self.row_type.__name__} rows, not {type(rows).__name__}")
        if self._data is None:
            self._data = self._allocate(rows)
        n = int(rows[0].shape[0])
        if n > self.capacity:  # only the newest `capacity` rows would survive anyway
            rows, n = self.row_type(*(column[-self.capacity :] for column in rows)), self.capacity
        index = (self.pos + np.arange(n)) % self.capacity  # (n,) slots, wrapping past the end
        for store, column in zip(self._data, rows, strict=True):
            store[index] = column
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample_rows(self, batch: int, rng: np.random.Generator) -> Row:
        """``batch`` rows drawn uniformly with replacement, as the row type (NumPy copies)."""
        if self._data is None or self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return self.rows(rng.integers(0, self.size, size=batch))  # (B,) positions

    def rows(self, index: np.ndarray) -> Row:
        """The rows at storage positions ``index`` (NumPy copies)."""
        if self._data is None:
            raise ValueError("the replay buffer is empty")
        if np.any((index < 0) | (index >= self.size)):
            raise IndexError(f"row index out of range for {self.size} filled rows")
        return self.row_type(*(column[index] for column in self._data))

    def sample(self, batch: int, rng: np.random.Generator) -> Transitions:
        """``batch`` :class:`Experience` rows drawn uniformly with replacement, as a TD minibatch."""
        if self.row_type is not Experience:
            raise TypeError("sample() makes Transitions from Experience rows; use sample_rows()")
        d: Experience = self.sample_rows(batch, rng)  # type: ignore[assignment]
        return Transitions(
            obs=torch.from_numpy(d.obs),
            goal=torch.from_numpy(d.desired_goal),
            action=torch.from_numpy(d.action),
            reward=torch.from_numpy(d.reward),
            next_obs=torch.from_numpy(d.next_obs),
            done=torch.from_numpy(d.terminated.astype(np.float32)),
        )

    def filled(self) -> Row:
        """The filled rows (a view, in storage order, not age order)."""
        if self._data is None:
            raise ValueError("the replay buffer is empty")
        return self.row_type(*(column[: self.size] for column in self._data))

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
            filled = self.row_type(**{k: v.numpy() for k, v in state["columns"].items()})
            self._data = self._allocate(filled)
            for store, column in zip(self._data, filled, strict=True):
                store[: state["size"]] = column
        self.pos, self.size = int(state["pos"]), int(state["size"])
