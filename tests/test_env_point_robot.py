"""Sparse point robot (PEARL): checker, task goals and split, sparse reward, clipping, truncation, render, and
the calculated posterior-sampling reference."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from metalab.envs import POINT_ROBOT_SPARSE_ID, EnvConfig, PointRobotSparse, make_env
from metalab.envs.point_robot import GOALS, VAL_GOALS, posterior_sampling_success, sparse_reward, tasks


def test_passes_the_gymnasium_env_checker() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports soft problems as warnings: fail on them too
        check_env(gym.make(POINT_ROBOT_SPARSE_ID).unwrapped, skip_render_check=False)
        check_env(gym.make(POINT_ROBOT_SPARSE_ID, render_mode="rgb_array").unwrapped, skip_render_check=False)


def test_registered_and_env_config() -> None:
    env = make_env(EnvConfig(id=POINT_ROBOT_SPARSE_ID))
    assert env.action_space == gym.spaces.Box(-0.1, 0.1, (2,), np.float32)
    assert EnvConfig(id=POINT_ROBOT_SPARSE_ID).name == "pointrobotsparse"


def test_100_goals_on_the_half_circle_in_pearls_order_split_80_20() -> None:
    assert GOALS.shape == (100, 2)
    np.testing.assert_allclose(np.linalg.norm(GOALS, axis=1), 1.0)
    angles = np.sort(np.arctan2(GOALS[:, 1], GOALS[:, 0]))
    np.testing.assert_allclose(angles, np.linspace(0, np.pi, 100), atol=1e-12)  # evenly spaced, ends included
    # PEARL's shuffle (seed 1337): task 0 is angle index 2 (2 * pi / 99 rad)
    np.testing.assert_allclose(GOALS[0], [np.cos(2 * np.pi / 99), np.sin(2 * np.pi / 99)])
    train, test = PointRobotSparse.tasks("train"), PointRobotSparse.tasks("test")
    assert (train, test) == (list(range(80)), list(range(80, 100)))
    assert not set(train) & set(test)
    with pytest.raises(ValueError, match=r"'train' or 'test'"):
        PointRobotSparse.tasks("eval")  # type: ignore[arg-type]


def test_sparse_reward_inside_and_outside_the_goal_radius() -> None:
    distances = np.array([0.0, 0.1, 0.2, 0.2001, 1.0])
    np.testing.assert_allclose(sparse_reward(distances), [1.0, 0.9, 0.8, 0.0, 0.0])
    env = PointRobotSparse()
    env.reset(options={"task": 5})
    step = (0.1 * env.goal).astype(np.float32)  # straight at the goal, 0.1 per step: distance |1 - 0.1 k|
    results = [env.step(step) for _ in range(20)]
    for _, reward, terminated, _, info in results:
        d = info["distance"]
        assert not terminated  # reaching the goal does not end the episode (PEARL)
        assert info["dense_reward"] == pytest.approx(-d)
        assert reward == (pytest.approx(1.0 - d) if d <= 0.2 else 0.0)
        assert info["is_success"] == (d <= 0.2)
    rewards = [r for _, r, *_ in results]
    assert rewards[:7] == [0.0] * 7 and rewards[12:] == [0.0] * 8  # distance >= 0.3: nothing
    assert rewards[8:11] == pytest.approx([0.9, 1.0, 0.9], abs=1e-6)  # steps 9-11: 0.1, 0, 0.1 from the goal


def test_actions_are_clipped_and_checked() -> None:
    env = PointRobotSparse()
    obs, info = env.reset(options={"task": 0})
    assert obs.tolist() == [0.0, 0.0] and obs.dtype == np.float32 and info == {"task": 0}
    obs, *_ = env.step(np.array([1.0, -1.0]))
    np.testing.assert_allclose(obs, [0.1, -0.1], rtol=1e-6)
    obs, *_ = env.step(np.array([0.05, 0.3]))
    np.testing.assert_allclose(obs, [0.15, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"2 finite numbers"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match=r"2 finite numbers"):
        env.step(np.array([np.nan, 0.0]))


def test_truncated_after_20_steps_and_tasks_drawn_from_the_seeded_rng() -> None:
    env = PointRobotSparse()
    env.reset(seed=0)
    ends = [env.step(np.zeros(2, dtype=np.float32))[2:4] for _ in range(20)]
    assert ends == [(False, False)] * 19 + [(False, True)]
    drawn = [env.reset(seed=s)[1]["task"] for s in range(30)]
    assert set(drawn) <= set(range(80)) and len(set(drawn)) > 10
    assert drawn == [env.reset(seed=s)[1]["task"] for s in range(30)]
    assert {env.reset(seed=s, options={"split": "test"})[1]["task"] for s in range(30)} <= set(range(80, 100))
    assert {env.reset(seed=s, options={"split": "val"})[1]["task"] for s in range(30)} <= set(range(100, 120))
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 120\)"):
        env.reset(options={"task": 120})


def test_val_goals_lie_on_the_arc_between_task_goals() -> None:
    """The 20 val goals are on the unit half circle, each halfway between two neighbouring task angles: never a
    training or test goal, and no closer than half a step to any of them."""
    assert VAL_GOALS.shape == (20, 2) and tasks("val") == list(range(100, 120))
    np.testing.assert_allclose(np.linalg.norm(VAL_GOALS, axis=1), 1.0)
    step = np.pi / 99
    val_angles = np.arctan2(VAL_GOALS[:, 1], VAL_GOALS[:, 0])
    task_angles = np.arctan2(GOALS[:, 1], GOALS[:, 0])
    gaps = np.abs(val_angles[:, None] - task_angles[None]).min(1)
    np.testing.assert_allclose(gaps, step / 2, atol=1e-9)
    env = PointRobotSparse()
    env.reset(seed=0, options={"task": 105})
    np.testing.assert_array_equal(env.unwrapped.goal, VAL_GOALS[5])
    with pytest.raises(ValueError, match=r"unknown reset option"):
        env.reset(options={"problem": 1})


def test_render_rgb_array() -> None:
    env = PointRobotSparse(render_mode="rgb_array")
    env.reset(options={"task": 0})
    img = env.render()
    assert img.shape == (100, 150, 3) and img.dtype == np.uint8
    # The point at (0, 0) is 1.5 units (75 px) from the left and 0.5 (25 px) from the bottom.
    assert img[75, 75].tolist() == [220, 0, 0]
    env.step(np.array([0.1, 0.1], dtype=np.float32))
    assert not np.array_equal(env.render(), img)
    assert PointRobotSparse().render() is None


def test_posterior_sampling_reference_first_episode_matches_the_closed_form() -> None:
    # Episode 0 ends on an angle drawn uniformly from [0, pi]: success iff within chord 0.2 of the goal, i.e.
    # within 2 asin(0.1) radians of its angle (cut at the ends of the arc).
    mean, ci95 = posterior_sampling_success(episodes=1, trials=20_000, seed=1)
    width = 2 * np.arcsin(0.1)
    goal_angles = np.arctan2(GOALS[tasks("test"), 1], GOALS[tasks("test"), 0])
    covered = np.minimum(goal_angles + width, np.pi) - np.maximum(goal_angles - width, 0.0)
    assert abs(mean[0] - covered.mean() / np.pi) < 2 * ci95[0]


def test_posterior_sampling_reference_rules_out_what_it_visited() -> None:
    # An explorer that forgot its failures would hit in about 12% of the episodes before its first reward, so
    # about 8% of its trials (0.88^20) would still miss in episode 20; ruling out every visited angle (up to 0.4
    # of the pi radians per miss) has found every goal by then.
    mean, _ = posterior_sampling_success(episodes=20, trials=2_000, seed=2)
    assert np.all(np.diff(mean) >= 0)
    assert mean[-1] == 1.0
    assert mean[1] > 1.8 * mean[0]
    again, _ = posterior_sampling_success(episodes=20, trials=2_000, seed=2)
    np.testing.assert_array_equal(mean, again)
