"""CityGrid (DREAM's distracting bus): checker, problem split, bus rides, rewards, and planned returns."""

from __future__ import annotations

import importlib
import itertools
import warnings
from collections import deque

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import metalab.envs
from metalab.envs import CITYGRID5X5_ID, CITYGRID5X5_PLAIN_ID, CITYGRID_ID, CityGrid, EnvConfig, make_env
from metalab.envs.citygrid import DOWN, LAYOUTS, LEFT, MOVES, NOOP, RIDE, RIGHT, UP, Cell, CityLayout


@pytest.mark.parametrize("env_id", [CITYGRID_ID, CITYGRID5X5_ID, CITYGRID5X5_PLAIN_ID])
def test_passes_the_gymnasium_env_checker(env_id: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports soft problems as warnings: fail on them too
        check_env(gym.make(env_id).unwrapped, skip_render_check=False)
        check_env(gym.make(env_id, render_mode="rgb_array").unwrapped, skip_render_check=False)


def test_registered_sizes_and_env_config() -> None:
    assert gym.make(CITYGRID_ID).unwrapped.layout.size == 9
    assert gym.make(CITYGRID5X5_ID).unwrapped.layout.size == 5
    importlib.reload(metalab.envs)  # registering again is a no-op
    assert gym.make(CITYGRID_ID).action_space == gym.spaces.Discrete(6)
    assert EnvConfig(id=CITYGRID_ID).name == "citygrid"
    assert EnvConfig(id=CITYGRID5X5_ID).name == "citygrid5x5"
    env = make_env(EnvConfig(id=CITYGRID5X5_ID, max_episode_steps=4))
    assert env.unwrapped.layout.size == 5 and env.spec.max_episode_steps == 4
    with pytest.raises(ValueError, match=r"size must be one of \[5, 9\]"):
        CityGrid(size=7)


def test_576_problems_split_53_train_523_heldout_100_val_423_test() -> None:
    train, heldout = CityGrid.problems("train"), CityGrid.problems("heldout")
    val, test = CityGrid.problems("val"), CityGrid.problems("test")
    assert (len(train), len(heldout), len(val), len(test)) == (53, 523, 100, 423)
    assert train[:4] == [0, 11, 22, 33] and train[-1] == 572
    assert heldout[:11] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]
    assert not set(train) & set(heldout) and sorted(train + heldout) == list(range(576))
    assert (
        not set(val) & set(test) and sorted(val + test) == heldout
    )  # val and test partition the held-out ids
    assert val[:3] == [1, 6, 12] and test[:3] == [2, 3, 4]
    assert (CityGrid.problems("train"), CityGrid.problems("val")) == (train, val)  # deterministic
    assert {p % 24 for p in train} == set(range(24))  # every useful-bus permutation is seen in training
    with pytest.raises(ValueError, match=r"one of train, val, test, heldout"):
        CityGrid.problems("valid")  # type: ignore[arg-type]


def test_walking_return_is_what_walking_earns() -> None:
    for env_id, size in (("metalab/CityGrid-v0", 9), ("metalab/CityGrid5x5-v0", 5)):
        env = gym.make(env_id)
        env.reset(seed=0, options={"problem": 1, "goal": 0})
        total, done = 0.0, False
        while not done:  # walk left, then down, to corner 0 = (0, 0)
            x, _ = env.unwrapped.position
            action = LEFT if x > 0 else DOWN
            _, reward, terminated, truncated, _ = env.step(action)
            total, done = total + reward, terminated or truncated
        assert terminated and np.isclose(total, env.unwrapped.walking_return), (size, total)


def _official_routes(layout: CityLayout, problem: int) -> dict[Cell, Cell]:
    """Stop -> destination the way the official code builds it: permutations of the destination lists."""
    useful = list(itertools.permutations(layout.destinations))[problem % 24]
    distracting = list(itertools.permutations(layout.distractor_destinations))[problem // 24]
    return dict(zip(layout.stops, useful, strict=True)) | dict(
        zip(layout.distractor_stops, distracting, strict=True)
    )


def _walk(start: Cell, target: Cell) -> list[int]:
    """Moves from ``start`` to ``target``: along x first, then y."""
    dx, dy = target[0] - start[0], target[1] - start[1]
    return [RIGHT if dx > 0 else LEFT] * abs(dx) + [UP if dy > 0 else DOWN] * abs(dy)


@pytest.mark.parametrize("size", [9, 5])
@pytest.mark.parametrize("problem", [0, 1, 24, 300, 575])
def test_riding_each_bus_lands_where_the_problem_says_and_back(size: int, problem: int) -> None:
    env = CityGrid(size)
    layout = env.layout
    expected = _official_routes(layout, problem)
    for stop, dest in expected.items():
        env.reset(options={"problem": problem, "explore": True})
        for a in _walk(layout.start, stop):
            env.step(a)
        assert env.position == stop
        obs, *_ = env.step(RIDE)
        assert env.position == dest and (obs[0], obs[1], obs[2]) == (*dest, 1.0)  # a bus stands there too
        env.step(RIDE)
        assert env.position == stop  # the bus back
    assert env.bus_routes(problem) == expected | {d: s for s, d in expected.items()}


def test_hand_checked_rides_in_the_9x9_grid() -> None:
    routes = CityGrid(9).bus_routes
    assert routes(0)[(4, 5)] == (0, 1) and routes(0)[(4, 3)] == (8, 7)  # identity permutation
    assert routes(1)[(3, 4)] == (8, 7) and routes(1)[(4, 3)] == (8, 1)  # useful permutation (0, 1, 3, 2)
    assert routes(24)[(5, 5)] == (0, 4) and routes(24)[(3, 5)] == (4, 8)  # distracting permutation 1
    assert routes(24)[(5, 3)] == (8, 4) and routes(24)[(4, 5)] == (0, 1)
    for problem in (0, 77, 575):  # useful buses end next to a corner, distracting ones mid-edge
        r = routes(problem)
        assert {r[s] for s in LAYOUTS[9].stops} == {(0, 1), (0, 7), (8, 1), (8, 7)}
        assert {r[s] for s in LAYOUTS[9].distractor_stops} == {(0, 4), (4, 0), (8, 4), (4, 8)}


def test_exploitation_rewards_goal_termination_and_truncation() -> None:
    env = CityGrid(9)
    obs, info = env.reset(options={"problem": 0, "goal": 0})  # goal (0, 0); bus (4, 3) -> (8, 7) is useless
    assert info == {"problem": 0, "explore": False, "is_success": False} and env.unwrapped.problem == 0
    assert obs.tolist() == [4, 4, 0, 1, 0, 0, 0]  # x, y, on_bus, goal one-hot
    rewards = []
    for a in [LEFT, LEFT, LEFT, LEFT, DOWN, DOWN, DOWN]:
        obs, r, terminated, truncated, info = env.step(a)
        rewards.append(r)
        assert not terminated and not truncated
    obs, r, terminated, truncated, info = env.step(DOWN)
    assert rewards == [-0.1] * 7 and r == 1.0 and terminated and not truncated and info["is_success"]
    assert sum(rewards) + r == pytest.approx(0.3)

    env.reset(options={"problem": 0, "goal": 3})
    ends = [env.step(RIDE)[1:4] for _ in range(20)]  # riding where there is no bus: stay, pay
    assert env.position == (4, 4)
    assert ends == [(-0.1, False, False)] * 19 + [(-0.1, False, True)]


def test_exploration_episode_has_no_reward_no_goal_and_no_termination() -> None:
    env = CityGrid(5)
    obs, info = env.reset(options={"problem": 7, "explore": True})
    assert obs.tolist() == [2, 2, 0, 0, 0, 0, 0] and info["explore"] and env.goal is None
    steps = [env.step(a) for a in [LEFT, LEFT, DOWN, DOWN]]  # passes through the corner (0, 0)
    assert env.position == (0, 0)
    steps += [env.step(NOOP) for _ in range(6)]
    assert [s[1:4] for s in steps] == [(0.0, False, False)] * 9 + [(0.0, False, True)]


def test_5x5_ends_only_at_its_goal_corner() -> None:
    env = CityGrid(5)
    env.reset(options={"problem": 0, "goal": 1})  # goal (4, 4); bus (2, 1) goes to the corner (0, 0)
    env.step(DOWN)
    _, r, terminated, _, _ = env.step(RIDE)
    assert env.position == (0, 0) and r == -0.3 and not terminated
    env.reset(options={"problem": 0, "goal": 0})
    assert env.step(DOWN)[1] == -0.3
    _, r, terminated, _, info = env.step(RIDE)
    assert r == 1.0 and terminated and info["is_success"]


def test_reset_draws_problems_and_goals_from_the_seeded_rng_and_rejects_bad_options() -> None:
    env = CityGrid(9)
    train, test = set(CityGrid.problems("train")), set(CityGrid.problems("test"))
    drawn = []
    for seed in range(40):
        obs, info = env.reset(seed=seed)
        drawn.append((info["problem"], int(np.argmax(obs[3:]))))
    assert {p for p, _ in drawn} <= train and len({p for p, _ in drawn}) > 20
    assert {g for _, g in drawn} == {0, 1, 2, 3}
    assert [env.reset(seed=s)[1]["problem"] for s in range(40)] == [p for p, _ in drawn]
    assert {env.reset(seed=s, options={"split": "test"})[1]["problem"] for s in range(20)} <= test
    with pytest.raises(ValueError, match=r"problem must be an int in \[0, 576\)"):
        env.reset(options={"problem": 576})
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['task'\]"):
        env.reset(options={"task": 3})
    with pytest.raises(ValueError, match=r"exploration episode has no goal"):
        env.reset(options={"explore": True, "goal": 1})
    with pytest.raises(ValueError, match=r"goal must be a corner index"):
        env.reset(options={"goal": 4})
    with pytest.raises(ValueError, match=r"not one of 0..5"):
        env.step(6)


def _plan(layout: CityLayout, routes: dict[Cell, Cell], goal: Cell) -> list[int] | None:
    """Shortest action sequence from the start to ``goal`` (breadth-first), riding only the given ``routes``."""
    last = layout.size - 1
    parent: dict[Cell, tuple[Cell, int] | None] = {layout.start: None}
    frontier = deque([layout.start])
    while frontier:
        cell = frontier.popleft()
        if cell == goal:
            actions = []
            while parent[cell] is not None:
                cell, a = parent[cell]  # type: ignore[misc]
                actions.append(a)
            return actions[::-1]
        x, y = cell
        nexts = [(min(max(x + dx, 0), last), min(max(y + dy, 0), last)) for dx, dy in MOVES.values()]
        for nxt, a in [*zip(nexts, MOVES, strict=True), (routes.get(cell), RIDE)]:
            if nxt is not None and nxt not in parent:
                parent[nxt] = (cell, a)
                frontier.append(nxt)
    return None


def _planned_return(layout: CityLayout, n_steps: int) -> float:
    return 1.0 - layout.step_penalty * (n_steps - 1)


# size, optimal return, walking return, best return knowing only the distracting buses
RETURNS = [(9, 0.8, 0.3, 0.4), (5, 0.7, 0.1, 0.1)]


@pytest.mark.parametrize(("size", "optimal", "walking", "distractors_only"), RETURNS)
def test_optimal_return_with_known_buses_and_walking_return(
    size: int, optimal: float, walking: float, distractors_only: float
) -> None:
    env = CityGrid(size)
    layout = env.layout
    # The best plan knowing every bus: the same in every problem and for every goal.
    for problem in range(576):
        routes = env.bus_routes(problem)
        lengths = {len(_plan(layout, routes, g)) for g in layout.goals}  # type: ignore[arg-type]
        assert [_planned_return(layout, n) for n in lengths] == pytest.approx([optimal])
    for problem in CityGrid.problems("train")[:10]:  # and the env pays exactly that when the plan is played
        for goal_index, goal in enumerate(layout.goals):
            env.reset(options={"problem": problem, "goal": goal_index})
            plan = _plan(layout, env.bus_routes(problem), goal)
            results = [env.step(a) for a in plan]  # type: ignore[union-attr]
            assert sum(r for _, r, *_ in results) == pytest.approx(optimal)
            assert results[-1][2] and not any(t for _, _, t, *_ in results[:-1])

    walk = {len(_plan(layout, {}, g)) for g in layout.goals}  # type: ignore[arg-type]
    assert [_planned_return(layout, n) for n in walk] == pytest.approx([walking])
    # Knowing only the distracting buses: no help in 5x5, one step saved in the paper's 9x9 geometry.
    best = set()
    for problem in range(0, 576, 24):
        distractors = {c: d for c, d in env.bus_routes(problem).items() if c not in layout.stops}
        distractors = {c: d for c, d in distractors.items() if d not in layout.stops}
        best |= {_planned_return(layout, len(_plan(layout, distractors, g))) for g in layout.goals}  # type: ignore[arg-type]
    assert max(best) == pytest.approx(distractors_only)


def test_5x5_without_distractors_has_only_the_useful_buses_and_the_same_optimum() -> None:
    env = gym.make(CITYGRID5X5_PLAIN_ID).unwrapped
    layout = env.layout
    assert layout.size == 5 and not env.distractors
    for problem in (0, 24, 300, 575):
        routes = env.bus_routes(problem)
        with_distractors = CityGrid(5).bus_routes(problem)
        assert set(routes) == set(layout.stops) | set(layout.destinations)  # 4 stops out, 4 buses back
        assert routes == {c: d for c, d in with_distractors.items() if c in routes}
        assert routes == env.bus_routes(problem % 24)  # the distracting permutation no longer matters
        env.reset(options={"problem": problem, "explore": True})
        for a in _walk(layout.start, layout.distractor_stops[0]):
            env.step(a)
        env.step(RIDE)
        assert env.position == layout.distractor_stops[0]  # no bus there
        for goal_index, goal in enumerate(layout.goals):
            env.reset(options={"problem": problem, "goal": goal_index})
            rewards = [env.step(a)[1] for a in _plan(layout, routes, goal)]  # type: ignore[union-attr]
            assert sum(rewards) == pytest.approx(0.7)


def test_render_rgb_array() -> None:
    env = CityGrid(9, render_mode="rgb_array")
    env.reset(options={"problem": 0, "goal": 0})
    img = env.render()
    assert img.shape == (144, 144, 3) and img.dtype == np.uint8
    assert img[4 * 16 + 8, 4 * 16 + 8].tolist() == [220, 0, 0]  # agent at (4, 4), drawn mid-image
    assert img[8 * 16 + 1, 0 + 1].tolist() == [0, 170, 0]  # goal (0, 0): bottom-left cell's rim
    assert img[3 * 16 + 8, 4 * 16 + 8].tolist() == [0, 0, 255]  # bus stop (4, 5), one row up
    env.step(LEFT)
    moved = env.render()
    assert moved[4 * 16 + 8, 3 * 16 + 8].tolist() == [220, 0, 0] and not np.array_equal(img, moved)
    assert CityGrid(5, render_mode="rgb_array").render() is not None
    assert CityGrid(5).render() is None
