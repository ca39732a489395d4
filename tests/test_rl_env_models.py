"""The planning rewards and terminations of metalab.rl.env_models against the envs' own, on a few hundred
transitions each (random actions, a little beyond the action bounds, from seeded resets), evaluated in one
batched call on float32 observations as the planner sees them (the cart-pole swing-up's too: metalab's own env).
Tolerances: InvertedPendulum's reward and termination exactly; the others to 1e-5 relative (float32 rounding of
the observations; rewards are O(1-10))."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from metalab.envs import CARTPOLE_SWINGUP_ID
from metalab.envs.config import EnvConfig
from metalab.errors import ConfigError
from metalab.rl import env_models as em
from metalab.rl.planners import RewardFn

TRANSITIONS = 300


def transitions(env: gym.Env, n: int, seed: int = 0, beyond: float = 1.5) -> dict[str, torch.Tensor]:
    """``n`` transitions of random actions (uniform in the bounds scaled by ``beyond``) with the env's reward
    and ``terminated``, a new seeded episode after each end: float32 tensors, as the replay buffer holds them."""
    rng = np.random.default_rng(seed)
    space = env.action_space
    rows = []
    obs, _ = env.reset(seed=seed)
    while len(rows) < n:
        action = (rng.uniform(space.low, space.high) * beyond).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, next_obs, reward, terminated))
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + len(rows))
    obs, action, next_obs, reward, terminated = (np.stack(c) for c in zip(*rows, strict=True))
    return {
        "obs": torch.from_numpy(obs.astype(np.float32)),
        "action": torch.from_numpy(action),
        "next_obs": torch.from_numpy(next_obs.astype(np.float32)),
        "reward": torch.from_numpy(reward.astype(np.float64)),
        "terminated": torch.from_numpy(terminated),
    }


def mujoco_env(env_id: str) -> gym.Env:
    pytest.importorskip("mujoco")
    return em.env_model(env_id).make(EnvConfig(id=env_id))


def test_pendulum_reward_matches_the_env() -> None:
    env = gym.make("Pendulum-v1").unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(TRANSITIONS):
        env.state = np.array([rng.uniform(-3 * np.pi, 3 * np.pi), rng.uniform(-8, 8)])  # any angle, any speed
        obs = env._get_obs()
        action = rng.uniform(-3, 3, size=1).astype(np.float32)  # beyond the torque limit too: the env clips
        next_obs, r, *_ = env.step(action)
        rows.append((obs, action, next_obs, r))
    obs, action, next_obs, r = (torch.from_numpy(np.stack(c)) for c in zip(*rows, strict=True))
    mine = em.pendulum_reward(obs, action, next_obs)
    assert torch.allclose(mine.double(), r.double(), rtol=1e-4, atol=1e-4)
    assert em.env_model("Pendulum-v1") == em.EnvModel(em.pendulum_reward)  # no termination, no wrapper


def test_inverted_pendulum_reward_and_termination_match_the_env() -> None:
    data = transitions(mujoco_env("InvertedPendulum-v5"), TRANSITIONS)
    terminated = data["terminated"]
    assert 10 < int(terminated.sum()) < TRANSITIONS - 10  # random torques topple the pole: both kinds present
    args = data["obs"], data["action"], data["next_obs"]
    assert torch.equal(em.inverted_pendulum_done(*args), terminated)
    assert torch.equal(em.inverted_pendulum_reward(*args).double(), data["reward"])
    known = em.env_model("InvertedPendulum-v5")
    assert (known.reward, known.done) == (em.inverted_pendulum_reward, em.inverted_pendulum_done)


def test_inverted_pendulum_terminates_on_non_finite_states() -> None:
    upright = torch.zeros(3, 4)
    bad = torch.tensor([[0.0, 0.0, float("nan"), 0.0], [float("inf"), 0.0, 0.0, 0.0], [0.0, -0.21, 0.0, 0.0]])
    action = torch.zeros(3, 1)
    assert em.inverted_pendulum_done(upright, action, bad).tolist() == [True, True, True]
    assert em.inverted_pendulum_reward(upright, action, bad).tolist() == [0.0, 0.0, 0.0]
    assert em.inverted_pendulum_reward(upright, action, upright).tolist() == [1.0, 1.0, 1.0]


def test_half_cheetah_reward_matches_the_env() -> None:
    env = mujoco_env("HalfCheetah-v5")
    assert env.observation_space.shape == (18,)
    data = transitions(env, TRANSITIONS)
    mine = em.half_cheetah_reward(data["obs"], data["action"], data["next_obs"])
    assert torch.allclose(mine.double(), data["reward"], rtol=1e-5, atol=1e-5)
    assert em.env_model("HalfCheetah-v5").done is None  # HalfCheetah never terminates


def test_half_cheetah_needs_the_wrapper() -> None:
    """The default observation's root x-velocity (entry 8, the end of the step) is not the reward's velocity
    (the step's mean): the wrapper's entry 17 is; after a reset, entry 17 repeats entry 8."""
    env = mujoco_env("HalfCheetah-v5")
    data = transitions(env, TRANSITIONS)
    forward = data["reward"] + em.HALF_CHEETAH_CTRL_COST * (data["action"].double() ** 2).sum(-1)
    end_velocity = data["next_obs"][:, em.HALF_CHEETAH_ROOT_VX].double()
    assert (end_velocity - forward).pow(2).mean().sqrt() > 0.1  # measured: 0.27, against a spread of 0.65
    obs, _ = env.reset(seed=1)
    assert obs[em.HALF_CHEETAH_FORWARD] == obs[em.HALF_CHEETAH_ROOT_VX]
    raw, _ = env.unwrapped.reset(seed=1)
    assert np.array_equal(obs[:17], raw)


def test_reacher_reward_matches_the_env() -> None:
    data = transitions(mujoco_env("Reacher-v5"), TRANSITIONS)
    mine = em.reacher_reward(data["obs"], data["action"], data["next_obs"])
    assert torch.allclose(mine.double(), data["reward"], rtol=1e-5, atol=1e-5)
    assert em.env_model("Reacher-v5").done is None


def test_cartpole_swingup_reward_matches_the_env() -> None:
    env = em.env_model(CARTPOLE_SWINGUP_ID).make(EnvConfig(id=CARTPOLE_SWINGUP_ID))
    data = transitions(env, TRANSITIONS)
    assert data["next_obs"][:, 2].max() > -0.9  # random forces swing the pole: not all rewards ~exp(-4)
    mine = em.cartpole_swingup_reward(data["obs"], data["action"], data["next_obs"])
    assert torch.allclose(mine.double(), data["reward"], rtol=1e-5, atol=1e-5)
    assert em.env_model(CARTPOLE_SWINGUP_ID) == em.EnvModel(em.cartpole_swingup_reward)  # no termination


@pytest.mark.parametrize(
    ("fn", "obs_dim", "act_dim"),
    [
        (em.pendulum_reward, 3, 1),
        (em.inverted_pendulum_reward, 4, 1),
        (em.inverted_pendulum_done, 4, 1),
        (em.half_cheetah_reward, 18, 6),
        (em.reacher_reward, 10, 2),
        (em.cartpole_swingup_reward, 5, 1),
    ],
)
def test_functions_broadcast_over_particles(fn: RewardFn, obs_dim: int, act_dim: int) -> None:
    obs = torch.randn(2, 5, 4, 7, obs_dim)  # (S, N, P, H, D)
    action = torch.randn(2, 5, 1, 7, act_dim).expand(2, 5, 4, 7, act_dim)  # one sequence for all particles
    assert fn(obs, action, obs).shape == (2, 5, 4, 7)


def test_an_env_without_a_reward_function_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Pendulum-v1") as info:
        em.env_model("CartPole-v1")
    assert info.value.key == "env.id" and "CartPole-v1" in info.value.message
