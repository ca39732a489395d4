"""Episode recording: seeded episodes, lockstep batches equal one-by-one runs, env state restored by replay."""

from __future__ import annotations

import io

import numpy as np
import torch

from metalab.envs import EnvConfig, make_env
from metalab.rl.rollout import Recorder, derive_seed, dims, run_episodes, split_obs


def test_split_obs_and_dims() -> None:
    bitflip, cartpole = make_env(EnvConfig(n=4)), make_env(EnvConfig(id="CartPole-v1"))
    assert dims(bitflip) == (4, 4) and dims(cartpole) == (4, 0)
    obs, achieved, goal = split_obs(bitflip.reset(seed=0)[0])
    assert obs.dtype == np.float32 and np.array_equal(obs, achieved) and goal.shape == (4,)
    assert [a.shape for a in split_obs(cartpole.reset(seed=0)[0])] == [(4,), (0,), (0,)]
    assert derive_seed(0, 1) != derive_seed(1, 0) and derive_seed(3, 4) == derive_seed(3, 4)


def test_lockstep_batches_equal_one_episode_at_a_time() -> None:
    # a fixed policy of (state, goal) bits
    def act(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
        code = (obs.astype(int) @ [1, 2, 4, 8]) * 3 + goal.astype(int) @ [1, 2, 4, 8]
        return code % 4

    seeds = [derive_seed(7, i) for i in range(7)]
    batched = run_episodes([make_env(EnvConfig(n=4)) for _ in range(3)], act, seeds)
    single = run_episodes([make_env(EnvConfig(n=4))], act, seeds)
    assert len(batched) == 7
    for a, b in zip(batched, single, strict=True):
        assert a.ret == b.ret and (a.success == b.success)
        assert all(np.array_equal(x, y) for x, y in zip(a.experience, b.experience, strict=True))
        ep = a.experience
        assert np.array_equal(ep.obs[1:], ep.next_obs[:-1])  # consecutive transitions chain up
        assert ep.terminated[-1] == bool(a.success) and not ep.terminated[:-1].any()


def test_replaying_the_saved_actions_restores_the_env() -> None:
    env = make_env(EnvConfig(id="Pendulum-v1"))
    recorder = Recorder(env)
    recorder.reset(123)
    for t in range(15):
        assert recorder.step(np.array([np.sin(t)], dtype=np.float32)) is None
    blob = io.BytesIO()
    torch.save(recorder.state(), blob)
    blob.seek(0)
    other = Recorder(make_env(EnvConfig(id="Pendulum-v1")))
    other.load_state(torch.load(blob, weights_only=True))
    assert np.array_equal(other.obs, recorder.obs)
    action = np.array([0.5], dtype=np.float32)
    for _ in range(200 - 15):  # and the rest of the episode is identical
        a, b = recorder.step(action), other.step(action)
        assert np.array_equal(recorder.obs, other.obs)
    assert a is not None and b is not None and a.ret == b.ret
    assert a.experience.rows == 200
