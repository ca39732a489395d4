"""CityGrid with the official action set (ezliu/dream ``envs/grid.py``, ``envs/city.py``, ``main.py``): action
numbering, ``end_episode`` and its charge, exploration ending at a hidden goal, no-op pickup/drop, the checker,
and the six-action ids pinned to their recorded behaviour."""

from __future__ import annotations

import hashlib
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from test_env_citygrid import _plan, _walk

from metalab.envs import (
    CITYGRID5X5_ID,
    CITYGRID5X5_OFFICIAL_ID,
    CITYGRID5X5_PLAIN_ID,
    CITYGRID_ID,
    CITYGRID_OFFICIAL_ID,
    CityGrid,
    EnvConfig,
)
from metalab.envs.citygrid import (
    DOWN,
    DROP,
    END_EPISODE,
    LEFT,
    NOOP,
    OFFICIAL_ACTIONS,
    PICKUP,
    RIDE,
    UP,
)

OFFICIAL_IDS = [CITYGRID_OFFICIAL_ID, CITYGRID5X5_OFFICIAL_ID]


def test_action_numbering_is_the_official_list() -> None:
    # official envs/grid.py: class Action(enum.IntEnum), in this order from 0
    official = ["left", "up", "right", "down", "noop", "ride_bus", "end_episode", "pickup", "drop"]
    assert [name.replace("ride", "ride_bus") for name in OFFICIAL_ACTIONS] == official
    assert (NOOP, RIDE, END_EPISODE, PICKUP, DROP) == (4, 5, 6, 7, 8)
    for env_id, size in ((CITYGRID_OFFICIAL_ID, 9), (CITYGRID5X5_OFFICIAL_ID, 5)):
        env = gym.make(env_id).unwrapped
        assert env.action_space == gym.spaces.Discrete(9) and env.layout.size == size
        assert env.actions == "official" and env.distractors
    assert EnvConfig(id=CITYGRID_OFFICIAL_ID).name == "citygridofficial"
    assert EnvConfig(id=CITYGRID5X5_OFFICIAL_ID).name == "citygrid5x5official"
    with pytest.raises(ValueError, match=r"actions must be one of six, official"):
        CityGrid(actions="nine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"not one of 0..8 = left, up, right, down, noop, ride, end_episode"):
        CityGrid(actions="official").step(9)


@pytest.mark.parametrize("env_id", OFFICIAL_IDS)
def test_passes_the_gymnasium_env_checker(env_id: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(env_id).unwrapped, skip_render_check=False)
        check_env(gym.make(env_id, render_mode="rgb_array").unwrapped, skip_render_check=False)


@pytest.mark.parametrize(("size", "penalty"), [(9, 0.1), (5, 0.3)])
@pytest.mark.parametrize("end_at", [1, 4, None])  # None: the last step
def test_end_episode_ends_exploitation_with_the_remaining_penalties(
    size: int, penalty: float, end_at: int | None
) -> None:
    """Official InstructionWrapper._reward: -0.1 for the step, minus 0.1 per step remaining, so ending at step t
    costs exactly what waiting until the truncation would (on 5x5 with its 0.3 penalty)."""
    env = CityGrid(size, actions="official")
    horizon = env.max_steps
    t = horizon if end_at is None else end_at
    env.reset(options={"problem": 5, "goal": 0})
    for _ in range(t - 1):
        assert env.step(NOOP)[1:4] == (-penalty, False, False)
    obs, reward, terminated, truncated, info = env.step(END_EPISODE)
    assert terminated and not truncated and not info["is_success"]
    assert reward == pytest.approx(-penalty * (1 + horizon - t)) and info["goal_reward"] == reward
    assert (obs[0], obs[1]) == env.layout.start  # ends where the agent stands
    env.reset(options={"problem": 5, "goal": 0})
    waited = sum(env.step(NOOP)[1] for _ in range(horizon))
    assert (t - 1) * -penalty + reward == pytest.approx(waited)


@pytest.mark.parametrize("size", [9, 5])
def test_end_episode_ends_exploration_unpaid_and_reports_the_official_charge(size: int) -> None:
    env = CityGrid(size, actions="official")
    obs, info = env.reset(options={"problem": 7, "explore": True})
    assert obs[3:].tolist() == [0, 0, 0, 0] and info["explore"] and env.goal is not None  # hidden goal
    assert env.step(UP)[1:4] == (0.0, False, False)
    obs, reward, terminated, truncated, info = env.step(END_EPISODE)
    penalty = env.layout.step_penalty
    assert (reward, terminated, truncated, info["is_success"]) == (0.0, True, False, False)
    # what the official env would pay for it (official DREAM relabels exploration rewards and ignores it)
    assert info["goal_reward"] == pytest.approx(-penalty * (1 + env.max_steps - 2))


def test_stepping_on_the_hidden_goal_ends_exploration_and_other_corners_do_not() -> None:
    env = CityGrid(9, actions="official")
    env.reset(options={"problem": 0, "explore": True, "goal": 0})  # hidden goal (0, 0)
    path = _walk((4, 4), (0, 0))
    results = [env.step(a) for a in path]
    assert [r[1:4] for r in results] == [(0.0, False, False)] * 7 + [(0.0, True, False)]
    obs, _, _, _, info = results[-1]
    assert env.position == (0, 0) and obs[3:].tolist() == [0, 0, 0, 0]
    assert not info["is_success"] and info["goal_reward"] == 1.0  # the official wrapper's +1, unpaid here
    assert [r[4]["goal_reward"] for r in results[:-1]] == [-0.1] * 7

    # hidden goal (8, 8): (0, 0) is just a corner now
    env.reset(options={"problem": 0, "explore": True, "goal": 1})
    steps = [env.step(a) for a in path] + [env.step(NOOP) for _ in range(12)]
    assert [s[1:4] for s in steps] == [(0.0, False, False)] * 19 + [(0.0, False, True)]


def test_5x5_ride_onto_the_hidden_goal_ends_exploration() -> None:
    env = CityGrid(5, actions="official")
    env.reset(options={"problem": 0, "explore": True, "goal": 0})  # bus (2, 1) goes to the corner (0, 0)
    env.step(DOWN)
    _, reward, terminated, _, info = env.step(RIDE)
    assert env.position == (0, 0) and (reward, terminated, info["is_success"]) == (0.0, True, False)
    env.reset(options={"problem": 0, "explore": True, "goal": 1})
    env.step(DOWN)
    assert env.step(RIDE)[2:4] == (False, False)  # the same ride, another hidden goal: exploration goes on


def test_the_hidden_exploration_goal_is_drawn_by_the_seeded_rng_and_never_observed() -> None:
    env = CityGrid(9, actions="official")

    def hidden_goals() -> list[int | None]:
        goals = []
        for seed in range(40):
            obs, _ = env.reset(seed=seed, options={"problem": 3, "explore": True})
            assert obs[3:].tolist() == [0, 0, 0, 0]
            goals.append(env.goal)
        return goals

    goals = hidden_goals()
    assert set(goals) == {0, 1, 2, 3} and hidden_goals() == goals
    with pytest.raises(ValueError, match=r"goal must be a corner index"):
        env.reset(options={"explore": True, "goal": 4})


def test_pickup_and_drop_are_paid_no_ops() -> None:
    env = CityGrid(9, actions="official")
    env.reset(options={"problem": 0, "goal": 2})
    env.step(UP)  # onto the bus stop (4, 5)
    before = env.step(NOOP)[0]
    for action in (PICKUP, DROP, PICKUP, DROP):
        obs, reward, terminated, truncated, _ = env.step(action)
        assert np.array_equal(obs, before) and (reward, terminated, truncated) == (-0.1, False, False)
    env.step(RIDE)
    assert env.position == env.bus_routes(0)[(4, 5)]  # the bus still works after pickup and drop


@pytest.mark.parametrize(("size", "optimal"), [(9, 0.8), (5, 0.7)])
def test_optimal_returns_are_those_of_the_six_action_grid(size: int, optimal: float) -> None:
    env = CityGrid(size, actions="official")
    for problem in (0, 11, 300):
        for goal_index, goal in enumerate(env.layout.goals):
            env.reset(options={"problem": problem, "goal": goal_index})
            plan = _plan(env.layout, env.bus_routes(problem), goal)
            assert sum(env.step(a)[1] for a in plan) == pytest.approx(optimal)  # type: ignore[union-attr]


def _digest(env: gym.Env) -> str:
    """A hash of 60 seeded episodes (exploration and exploitation) of random actions: observations, rewards,
    flags and infos."""
    h = hashlib.sha256()
    rng = np.random.default_rng(0)
    for i in range(60):
        options = {"explore": True} if i % 2 else {"split": "test"} if i % 3 else None
        obs, info = env.reset(seed=i, options=options)
        h.update(obs.tobytes() + repr(sorted(info.items())).encode())
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(int(rng.integers(6)))
            h.update(obs.tobytes() + np.float64(reward).tobytes() + bytes([terminated, truncated]))
            h.update(repr(sorted(info.items())).encode())
            done = terminated or truncated
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    ("env_id", "expected"),
    [(CITYGRID_ID, "b94310b82296959b"), (CITYGRID5X5_ID, "edc824a3a6bc28aa"),
     (CITYGRID5X5_PLAIN_ID, "923be85951d284da")],
)  # fmt: skip
def test_six_action_ids_behave_as_when_their_benchmarks_were_recorded(env_id: str, expected: str) -> None:
    """The digests were computed with CityGrid as it was before the official action set existed."""
    env = gym.make(env_id).unwrapped
    assert env.action_space == gym.spaces.Discrete(6) and env.actions == "six"
    assert _digest(env) == expected
    env.reset(options={"problem": 0, "explore": True})
    assert env.goal is None
    assert "goal_reward" not in env.step(LEFT)[4]
