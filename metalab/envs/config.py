"""The ``env`` section of an RL run's config, and the environment it makes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym

from metalab.config import require, require_between
from metalab.errors import ConfigError

BITFLIP_ID = "metalab/BitFlip-v0"
MAX_BITS = 1_024
"""Most BitFlip bits (inputs, actions and replay rows all grow with them)."""
MAX_ENVS = 1_024
"""Most envs stepped together (``async`` starts a process for each)."""
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
    vector: Literal["loop", "sync", "async"] = "loop"
    """How an algorithm that collects several episodes at a time runs them (REINFORCE, PEARL): ``loop``, a
    list of envs stepped in lockstep in this process; ``sync``, gymnasium's ``SyncVectorEnv`` (the same,
    through the vector API); ``async``, gymnasium's ``AsyncVectorEnv``, one subprocess per env, for envs whose
    step is expensive. With the same ``num_envs``, all three give the same episodes for the same seeds."""
    num_envs: int | None = None
    """Envs stepped together; null: REINFORCE's episodes per update, PEARL's tasks per collection round
    (``loop``: as many as it collects on at once)."""

    def __post_init__(self) -> None:
        require(
            self.vector in ("loop", "sync", "async"),
            "vector",
            f"must be loop, sync or async, got {self.vector!r}",
        )
        if self.num_envs is not None:
            require_between(self.num_envs, "num_envs", 1, MAX_ENVS, " or null")
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
        if "mujoco" in str(spec.entry_point):
            quiet_mujoco()
        return gym.make(spec, **kwargs)
    except gym.error.Error as e:  # unknown id / namespace / version, or a missing optional dependency
        raise ConfigError("env.id", f"cannot make {cfg.id!r}: {e}") from None


SILENCED_MUJOCO_WARNINGS = ("compiler attribute 'settotalmass' is deprecated",)
"""MuJoCo warnings about gymnasium's own model files, not the user's: MuJoCo 4 deprecates ``settotalmass``,
which HalfCheetah-v5's XML uses, and prints the warning each time a model compiles (40 lines for 40 envs)."""


def mujoco_warning(message: str) -> None:
    """MuJoCo's warning handler while metalab makes MuJoCo envs: :data:`SILENCED_MUJOCO_WARNINGS` are dropped,
    every other warning is printed as MuJoCo prints it."""
    if not message.startswith(SILENCED_MUJOCO_WARNINGS):
        print(f"WARNING: {message}", file=sys.stderr)


def quiet_mujoco() -> None:
    """Install :func:`mujoco_warning` as MuJoCo's warning handler, unless the user installed their own (or MuJoCo
    is not installed: the error then comes from ``gym.make``)."""
    try:
        import mujoco
    except ImportError:
        return
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(mujoco_warning)


class PerEnvOptions(gym.Wrapper):
    """Env ``index`` of a vector env: reset with ``options={"per_env": [options_0, options_1, ...]}`` passes it
    its own ``options_<index>`` (gymnasium's vector envs give every env the same options; a multi-task env
    needs a task each)."""

    def __init__(self, env: gym.Env, index: int):
        super().__init__(env)
        self.index = index

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        if options is not None and "per_env" in options:
            options = options["per_env"][self.index]
        return self.env.reset(seed=seed, options=options)


def make_vector_env(cfg: EnvConfig, num_envs: int) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``cfg``'s env behind gymnasium's vector API (``cfg.vector``: ``sync`` or
    ``async``), each wrapped in :class:`PerEnvOptions`; episodes end and restart per env (its default
    next-step autoreset)."""
    make_env(cfg).close()  # a bad id fails here, with its one-line ConfigError, not inside a subprocess
    fns = [lambda i=i: PerEnvOptions(make_env(cfg), i) for i in range(num_envs)]
    if cfg.vector == "async":
        return gym.vector.AsyncVectorEnv(fns)
    return gym.vector.SyncVectorEnv(fns)
