"""BitFlip: the gymnasium checker, rewards and episode ends, batched compute_reward, registration."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import metalab.envs
from metalab.envs import BITFLIP_ID, BitFlip, EnvConfig, make_env
from metalab.errors import ConfigError


@pytest.mark.parametrize("n", [1, 4, 25])
def test_passes_the_gymnasium_env_checker(n: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports soft problems as warnings: fail on them too
        check_env(gym.make(BITFLIP_ID, n=n).unwrapped, skip_render_check=False)
        check_env(gym.make(BITFLIP_ID, n=n, render_mode="ansi").unwrapped, skip_render_check=False)


def test_registered_on_import_with_n_keyword() -> None:
    assert BITFLIP_ID in gym.registry
    env = gym.make(BITFLIP_ID, n=7)
    assert env.unwrapped.n == 7 and env.action_space == gym.spaces.Discrete(7)
    assert gym.make(BITFLIP_ID).unwrapped.n == 10
    import importlib

    importlib.reload(metalab.envs)  # registering again is a no-op, not an error or a warning
    assert gym.make(BITFLIP_ID, n=3).unwrapped.n == 3


def test_reset_draws_a_goal_different_from_the_state() -> None:
    env = BitFlip(2)
    starts = set()
    for seed in range(200):
        obs, info = env.reset(seed=seed)
        assert not np.array_equal(obs["achieved_goal"], obs["desired_goal"])
        assert np.array_equal(obs["observation"], obs["achieved_goal"])
        assert info == {"is_success": False}
        starts.add((*obs["observation"], *obs["desired_goal"]))
    assert len(starts) == 12  # every (state, goal) pair with goal != state, for n = 2
    a, _ = env.reset(seed=5)
    b, _ = env.reset(seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_flipping_to_the_goal_gives_reward_zero_and_terminates() -> None:
    env = BitFlip(6)
    obs, _ = env.reset(seed=3)
    wrong = np.flatnonzero(obs["observation"] != obs["desired_goal"])
    for i, bit in enumerate(wrong):
        obs, reward, terminated, truncated, info = env.step(int(bit))
        last = i == len(wrong) - 1
        assert reward == (0.0 if last else -1.0)
        assert (terminated, truncated, info["is_success"]) == (last, False, last)
    assert np.array_equal(obs["achieved_goal"], obs["desired_goal"])


def test_truncated_after_n_steps_without_success() -> None:
    env = BitFlip(4)
    obs, _ = env.reset(seed=0)
    right = int(np.flatnonzero(obs["observation"] == obs["desired_goal"])[0])  # a bit that is already right
    ends = [env.step(right)[2:4] for _ in range(4)]  # flipping it back and forth never succeeds
    assert ends == [(False, False)] * 3 + [(False, True)]
    with pytest.raises(ValueError, match=r"bit index"):
        env.step(4)


def test_compute_reward_is_vectorized() -> None:
    env = BitFlip(3)
    achieved = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=np.int8)
    desired = np.array([[0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=np.int8)
    assert env.compute_reward(achieved, desired, [{}] * 3).tolist() == [0.0, -1.0, 0.0]
    assert env.compute_terminated(achieved, desired, None).tolist() == [True, False, True]
    batch = np.stack([achieved, desired])  # (2, 3, 3): any leading shape works
    assert env.compute_reward(batch, desired[None], None).shape == (2, 3)
    assert float(env.compute_reward(achieved[0], desired[1], {})) == -1.0  # a single goal pair


def test_env_config_names_and_errors() -> None:
    assert EnvConfig().name == "bitflip10"
    assert EnvConfig(n=25).name == "bitflip25"
    assert EnvConfig(id="CartPole-v1").name == "cartpole"
    with pytest.raises(ConfigError, match=r"'env.n': only applies"):
        make_env(EnvConfig(id="CartPole-v1", n=3))
    with pytest.raises(ConfigError, match=r"'n': must be >= 1"):
        EnvConfig(n=0)
    with pytest.raises(ConfigError, match=r"Did you mean"):
        make_env(EnvConfig(id="CartPol-v1"))
    env = make_env(EnvConfig(n=5, max_episode_steps=3))
    assert env.unwrapped.n == 5 and env.spec.max_episode_steps == 3
