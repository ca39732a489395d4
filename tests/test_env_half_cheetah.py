"""MAML's half-cheetah task families: rewards against HalfCheetah-v5's own, tasks and splits, the horizon, seeding
and reset options. Needs the mujoco extra (skipped without it)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from metalab.envs import HALF_CHEETAH_DIR_ID, HALF_CHEETAH_VEL_ID, HALF_CHEETAH_VEL_PEARL_ID
from metalab.envs.config import EnvConfig, make_env, mujoco_warning
from metalab.envs.half_cheetah import (
    CTRL_COST,
    GOAL_VELOCITIES,
    HORIZON,
    PEARL_GOAL_VELOCITIES,
    HalfCheetahTasks,
    _pearl_goal_velocities,
    tasks,
)

pytest.importorskip("mujoco")


def test_passes_the_gymnasium_checker_and_is_registered() -> None:
    check_env(HalfCheetahTasks("direction"), skip_render_check=True)
    for env_id, family in ((HALF_CHEETAH_DIR_ID, "direction"), (HALF_CHEETAH_VEL_ID, "velocity")):
        assert gym.make(env_id).unwrapped.family == family


@pytest.mark.parametrize("task", [0, 1])
def test_direction_reward_is_the_signed_velocity_minus_the_papers_control_cost(task: int) -> None:
    env, ref = HalfCheetahTasks("direction"), gym.make("HalfCheetah-v5").unwrapped
    env.reset(seed=3, options={"task": task})
    ref.reset(seed=0)
    rng = np.random.default_rng(0)
    sign = 1.0 if task == 0 else -1.0
    for _ in range(30):
        ref.set_state(
            env._env.data.qpos.copy(), env._env.data.qvel.copy()
        )  # the same state in gymnasium's env
        action = rng.uniform(-1.5, 1.5, 6).astype(
            np.float32
        )  # beyond the box too: the cost is on the clipped one
        _, reward, terminated, _, info = env.step(action)
        _, r_ref, *_ = ref.step(np.clip(action, -1, 1))
        square = float((np.clip(action, -1, 1) ** 2).sum())
        assert (
            reward == pytest.approx(sign * info["x_velocity"] - CTRL_COST * square, abs=1e-6)
            and not terminated
        )
        # gymnasium's reward is v - 0.1 |a|^2 for the same step: forward, ours adds back half the control cost
        if task == 0:
            assert reward == pytest.approx(r_ref + CTRL_COST * square, abs=1e-6)


def test_velocity_reward_and_splits() -> None:
    env = HalfCheetahTasks("velocity")
    env.reset(seed=0, options={"task": 1100})
    _, reward, _, _, info = env.step(np.zeros(6, np.float32))
    assert reward == pytest.approx(-abs(info["x_velocity"] - GOAL_VELOCITIES[1100]))
    parts = [set(tasks("velocity", s)) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1000, 100, 100] and not (
        parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]
    )
    assert 0.0 <= GOAL_VELOCITIES.min() and GOAL_VELOCITIES.max() <= 2.0
    assert tasks("direction", "test") == [0, 1]


def test_horizon_seeding_and_options() -> None:
    env = HalfCheetahTasks("direction")
    first, info = env.reset(seed=7, options={"split": "test"})
    again, info2 = env.reset(seed=7, options={"split": "test"})
    assert np.array_equal(first, again) and info == info2 and first.dtype == np.float32
    other, _ = env.reset(seed=8)
    assert not np.array_equal(first, other)
    for t in range(HORIZON):
        *_, truncated, _ = env.step(np.zeros(6, np.float32))
        assert truncated == (t == HORIZON - 1)
    with pytest.raises(ValueError, match=r"unknown reset option"):
        env.reset(options={"goal": 1})
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 2\)"):
        env.reset(options={"task": 2})
    with pytest.raises(ValueError, match="family"):
        HalfCheetahTasks("sideways")  # type: ignore[arg-type]


def test_pearl_velocity_tasks_are_the_official_ones_with_the_official_split() -> None:
    # oyster rlkit/envs/half_cheetah_vel.py: np.random.seed(1337); np.random.uniform(0.0, 3.0, size=(130,))
    saved = np.random.get_state()  # the official code seeds numpy's global generator; leave it as it was
    try:
        np.random.seed(1337)
        official = np.random.uniform(0.0, 3.0, size=(130,))
    finally:
        np.random.set_state(saved)
    np.testing.assert_array_equal(PEARL_GOAL_VELOCITIES[:130], official)
    # launch_experiment.py: tasks[:n_train_tasks] (100) and tasks[-n_eval_tasks:] (30); val: metalab's own 30
    train, test, val = (tasks("pearl_velocity", s) for s in ("train", "test", "val"))
    assert (train, test, val) == (list(range(100)), list(range(100, 130)), list(range(130, 160)))
    assert not (set(train) & set(test) or set(train) & set(val) or set(test) & set(val))
    assert not set(PEARL_GOAL_VELOCITIES[val]) & set(official)  # val goals are no official goal
    np.testing.assert_array_equal(_pearl_goal_velocities(), PEARL_GOAL_VELOCITIES)  # deterministic
    assert 0.0 <= PEARL_GOAL_VELOCITIES.min() and PEARL_GOAL_VELOCITIES.max() < 3.0
    assert GOAL_VELOCITIES.max() <= 2.0 and len(GOAL_VELOCITIES) == 1200  # MAML's family is untouched


def test_pearl_velocity_env_passes_the_checker_with_the_official_observation_and_reward() -> None:
    check_env(HalfCheetahTasks("pearl_velocity"), skip_render_check=True)
    env = gym.make(HALF_CHEETAH_VEL_PEARL_ID).unwrapped
    assert env.family == "pearl_velocity" and env.tasks("test") == list(range(100, 130))
    obs, info = env.reset(seed=0, options={"task": 100})
    assert obs.shape == (20,) and obs.dtype == np.float32 and info["task"] == 100
    # oyster's _get_obs: qpos[1:], qvel, then the torso's centre of mass
    np.testing.assert_allclose(obs[17:], env._env.get_body_com("torso"), rtol=1e-6)
    obs, reward, terminated, truncated, info = env.step(np.full(6, 0.5, np.float32))
    assert reward == pytest.approx(
        -abs(info["x_velocity"] - PEARL_GOAL_VELOCITIES[100]) - CTRL_COST * 6 * 0.25
    )
    assert not terminated and not truncated and obs.shape == (20,)
    assert HalfCheetahTasks("velocity").observation_space.shape == (17,)  # MAML's keeps gymnasium's


def test_mujocos_deprecation_of_gymnasiums_own_model_is_silenced_and_other_warnings_printed(
    capfd: pytest.CaptureFixture[str],
) -> None:
    HalfCheetahTasks("direction")  # MuJoCo 4 warns about HalfCheetah-v5's XML (settotalmass) at each compile
    make_env(EnvConfig(id="HalfCheetah-v5"))
    assert "settotalmass" not in capfd.readouterr().err
    mujoco_warning("a warning of the user's own model")
    assert "WARNING: a warning of the user's own model" in capfd.readouterr().err
