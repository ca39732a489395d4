"""The ``env`` section of an RL run's config, and the environment it makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from metalab.config import require, require_between
from metalab.errors import ConfigError

BITFLIP_ID = "metalab/BitFlip-v0"
MAX_BITS = 1_024
"""Most BitFlip bits (inputs, actions and replay rows all grow with them)."""
MAX_EPISODE_STEPS = 100_000
"""Longest step limit (meta-RL stores whole episodes per replay row)."""


@dataclass(frozen=True)
class EnvConfig:
    """Which gymnasium environment an RL algorithm trains and is evaluated on."""

    id: str = BITFLIP_ID
    """Gymnasium id: ``metalab/BitFlip-v0``, ``CartPole-v1``, ``Pendulum-v1``, or any registered id."""
    n: int | None = None
    """BitFlip only: the number of bits (also its step limit); null: the registered default, 10."""
    max_episode_steps: int | None = None
    """Step limit for an episode (a TimeLimit wrapper); null: the environment's own limit."""

    def __post_init__(self) -> None:
        require(bool(self.id), "id", "must name a gymnasium environment id")
        if self.n is not None:
            require_between(self.n, "n", 1, MAX_BITS, " or null")
        if self.max_episode_steps is not None:
            require_between(self.max_episode_steps, "max_episode_steps", 1, MAX_EPISODE_STEPS, " or null")

    @property
    def name(self) -> str:
        """Short tag for run names: ``bitflip10``, ``cartpole``, ``pendulum``."""
        if self.id == BITFLIP_ID:
            return f"bitflip{self.n or 10}"
        return self.id.split("/")[-1].split("-v")[0].lower()


def make_env(cfg: EnvConfig) -> gym.Env:
    """A fresh environment for ``cfg``; an unknown id raises ConfigError naming ``env.id``."""
    import metalab.envs  # noqa: F401  (registers metalab's ids)

    kwargs: dict[str, Any] = {}
    if cfg.n is not None:
        kwargs["n"] = cfg.n
    if cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    try:
        spec = gym.spec(cfg.id)
        if cfg.n is not None and spec.id != BITFLIP_ID:
            raise ConfigError(
                "env.n", f"only applies to {BITFLIP_ID}, not {cfg.id}; remove it or set it to null"
            )
        return gym.make(spec, **kwargs)
    except gym.error.Error as e:  # unknown id / namespace / version, or a missing optional dependency
        raise ConfigError("env.id", f"cannot make {cfg.id!r}: {e}") from None
