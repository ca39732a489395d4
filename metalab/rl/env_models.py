"""What planning must know of an environment besides its dynamics: its reward and its termination, as batched
torch functions of a transition ``(obs, action, next_obs)``, one :class:`EnvModel` per gymnasium env id.

Each function is written from the env's own definition (gymnasium 1.x source) and tested against the env's
reward and ``terminated`` on random transitions (``tests/test_rl_env_models.py``). All work elementwise over
any leading dimensions, so a planner scores every particle of every candidate sequence in one call.

- ``Pendulum-v1``: ``-(theta^2 + 0.1 thetadot^2 + 0.001 u^2)``, from the observation before the step; never
  terminates (only the 200-step limit ends it).
- ``InvertedPendulum-v5`` (MuJoCo): 1 per step while the pole stands, 0 on the step where it falls; it falls
  (``terminated``) when the hinge angle, observation entry 1, leaves ``[-0.2, 0.2]`` or the observation is not
  finite. Observation ``(cart x, pole angle, cart velocity, pole angular velocity)``.
- ``HalfCheetah-v5`` (MuJoCo): ``(x' - x) / dt - 0.1 |a|^2``, the root's forward displacement over the step
  (``dt`` = 0.05 s, 5 substeps) minus a control cost; never terminates. The default observation leaves the
  root's x position out, and its root x-velocity entry (index 8, ``qvel[0]``) is the velocity at the end of
  the step, not the step's mean: under random actions it differs from the reward's velocity by 0.27 RMS (the
  forward term's own spread is 0.65). So the planner's env is wrapped (:class:`ForwardVelocity`) to append the
  env's own ``info["x_velocity"]`` (exactly ``(x' - x) / dt``) as observation entry 17: the model learns to
  predict it like any other state entry and the reward reads it from ``next_obs``, exactly. (PETS's own
  half-cheetah did the same with its observation's first entry.)
- ``Reacher-v5`` (MuJoCo): ``-|fingertip - target| - |a|^2``, after the step. Observation entries 8 and 9 are
  the fingertip's offset from the target in the plane (both bodies sit at the same height, so the planar
  distance is the distance); never terminates (the 50-step limit ends it). The target is part of the
  observation, so one model serves every goal.
- ``metalab/CartPoleSwingUp-v0`` (PETS's cart-pole swing-up, :mod:`metalab.envs.cartpole_swingup`):
  ``exp(-|tip - (0, L)|^2 / L^2) - 0.01 a^2`` after the step, the tip at ``(x + L sin theta, L cos theta)``
  read from the observation ``[x, x', cos theta, sin theta, theta']`` and ``a`` the action clipped to
  ``[-1, 1]``; never terminates (the 200-step limit ends it).

The MuJoCo envs need the ``mujoco`` extra (``pip install -e ".[mujoco]"``, the ``mujoco`` wheel; CPU only).
Rewards use the envs' default weights (``forward_reward_weight``, ``ctrl_cost_weight``, ...): the env config
cannot change them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from metalab.envs import cartpole_swingup
from metalab.envs.config import EnvConfig, make_env
from metalab.errors import ConfigError
from metalab.rl.planners import DoneFn, RewardFn

INVERTED_PENDULUM_MAX_ANGLE = 0.2
"""InvertedPendulum-v5 terminates once ``|pole angle|`` exceeds this (radians)."""
HALF_CHEETAH_CTRL_COST = 0.1
"""HalfCheetah-v5's default ``ctrl_cost_weight``."""
HALF_CHEETAH_ROOT_VX = 8
"""Index of the root's x-velocity ``qvel[0]`` in HalfCheetah-v5's default observation."""
HALF_CHEETAH_FORWARD = 17
"""Index of the step's forward velocity in the observation of the wrapped HalfCheetah-v5
(:class:`ForwardVelocity`)."""
REACHER_OFFSET = slice(8, 10)
"""Reacher-v5's observation entries ``(fingertip - target)[:2]``."""


class ForwardVelocity(gym.Wrapper):
    """Appends the root's forward velocity over the last step, the env's ``info["x_velocity"]``, to each
    observation (one more entry, last); after a reset, which has no last step, it appends the root's
    instantaneous x-velocity, observation entry ``at_reset``. The reward and termination are the env's."""

    def __init__(self, env: gym.Env, at_reset: int):
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, spaces.Box) and len(space.shape) == 1, space
        self.at_reset = at_reset
        self.observation_space = spaces.Box(
            np.append(space.low, -np.inf), np.append(space.high, np.inf), dtype=space.dtype
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        return np.append(obs, obs[self.at_reset]), info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return np.append(obs, info["x_velocity"]), reward, terminated, truncated, info


class EnvModel(NamedTuple):
    """An env's reward and termination for planning, and the observation they read."""

    reward: RewardFn
    done: DoneFn | None = None
    """None: the env never terminates (only its time limit ends an episode)."""
    wrapper: Callable[[gym.Env], gym.Env] | None = None
    """Wraps the env so that its observation holds what ``reward`` and ``done`` read; None: the env as it is."""

    def make(self, cfg: EnvConfig) -> gym.Env:
        """``cfg``'s env as the planner sees it (through :attr:`wrapper`)."""
        env = make_env(cfg)
        return env if self.wrapper is None else self.wrapper(env)


def pendulum_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """Pendulum-v1's reward ``-(theta^2 + 0.1 thetadot^2 + 0.001 u^2)`` from its observation ``(cos theta,
    sin theta, thetadot)`` before the step and the torque ``u`` clipped to ``[-2, 2]``, with ``theta`` in
    ``[-pi, pi]`` (``next_obs`` is not used). Shapes ``(..., 3)``, ``(..., 1)`` -> ``(...)``."""
    theta = torch.atan2(obs[..., 1], obs[..., 0])
    torque = action[..., 0].clamp(-2.0, 2.0)
    return -(theta**2 + 0.1 * obs[..., 2] ** 2 + 0.001 * torque**2)


def inverted_pendulum_done(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """InvertedPendulum-v5's ``terminated``: the pole angle after the step beyond 0.2 rad, or a non-finite
    observation. ``(..., 4)`` -> ``(...)`` bool."""
    fell = next_obs[..., 1].abs() > INVERTED_PENDULUM_MAX_ANGLE
    return fell | ~torch.isfinite(next_obs).all(-1)


def inverted_pendulum_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """InvertedPendulum-v5's reward: 1 if the step leaves the pole up, 0 if it falls (:func:`inverted_pendulum_done`).
    ``(..., 4)`` -> ``(...)``."""
    return (~inverted_pendulum_done(obs, action, next_obs)).to(next_obs.dtype)


def half_cheetah_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """HalfCheetah-v5's reward ``(x' - x) / dt - 0.1 |a|^2`` on the :class:`ForwardVelocity` observation, whose
    entry 17 after the step is the step's forward velocity. ``(..., 18)``, ``(..., 6)`` -> ``(...)``."""
    return next_obs[..., HALF_CHEETAH_FORWARD] - HALF_CHEETAH_CTRL_COST * (action**2).sum(-1)


def reacher_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """Reacher-v5's reward ``-|fingertip - target| - |a|^2``, the distance after the step (observation entries 8
    and 9). ``(..., 10)``, ``(..., 2)`` -> ``(...)``."""
    return -torch.linalg.vector_norm(next_obs[..., REACHER_OFFSET], dim=-1) - (action**2).sum(-1)


def cartpole_swingup_reward(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
    """The cart-pole swing-up's reward ``exp(-|tip - (0, L)|^2 / L^2) - 0.01 a^2`` from the observation after the
    step (tip ``(x + L sin theta, L cos theta)``, entries 0, 2 and 3) and the action clipped to ``[-1, 1]``.
    ``(..., 5)``, ``(..., 1)`` -> ``(...)``."""
    length = cartpole_swingup.POLE_LENGTH
    dx = next_obs[..., 0] + length * next_obs[..., 3]
    dy = length * (next_obs[..., 2] - 1.0)
    a = action[..., 0].clamp(-1.0, 1.0)
    return torch.exp(-(dx**2 + dy**2) / length**2) - cartpole_swingup.ACTION_COST * a**2


def _forward_velocity(env: gym.Env) -> gym.Env:
    return ForwardVelocity(env, HALF_CHEETAH_ROOT_VX)


ENV_MODELS: dict[str, EnvModel] = {
    "Pendulum-v1": EnvModel(pendulum_reward),
    "InvertedPendulum-v5": EnvModel(inverted_pendulum_reward, inverted_pendulum_done),
    "HalfCheetah-v5": EnvModel(half_cheetah_reward, wrapper=_forward_velocity),
    "Reacher-v5": EnvModel(reacher_reward),
    cartpole_swingup.CARTPOLE_SWINGUP_ID: EnvModel(cartpole_swingup_reward),
}
"""The reward and termination planning uses, per gymnasium env id."""


def env_model(env_id: str) -> EnvModel:
    """``env_id``'s :class:`EnvModel`; an env without one raises ConfigError naming ``env.id``."""
    if env_id not in ENV_MODELS:
        raise ConfigError(
            "env.id",
            f"mbrl plans with a known reward function, which {env_id} lacks (there is one for: "
            f"{', '.join(ENV_MODELS)})",
        )
    return ENV_MODELS[env_id]
