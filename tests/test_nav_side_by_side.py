"""2D navigation side by side (issue 32): the discrete-action navigation env, PEARL and RL² running on the
navigation tasks, the side-by-side benchmark's env-step budgets, and the benchmark end to end on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import metalab.envs  # noqa: F401  (registers the ids)
from benchmarks import common
from benchmarks import nav_side_by_side as nav
from metalab.envs.navigation import (
    DISCRETE_MOVES,
    GOALS,
    HORIZON,
    NAVIGATION_2D_DISCRETE_ID,
    Navigation2DDiscrete,
    tasks,
)
from metalab.errors import ConfigError
from metalab.experiment import load_run_config
from metalab.rl import pearl, rl2
from metalab.train.logger import read_metrics
from metalab.train.loop import fit
from metalab.utils import seed_everything

REPO = Path(__file__).resolve().parents[1]


# --- the discrete-action env -------------------------------------------------------------------------------------


def test_discrete_actions_move_the_point_as_stated() -> None:
    env = gym.make(NAVIGATION_2D_DISCRETE_ID)
    assert env.action_space == gym.spaces.Discrete(9)
    compass = {0: (0, 0), 1: (0, 1), 2: (1, 1), 3: (1, 0), 4: (1, -1), 5: (0, -1), 6: (-1, -1), 7: (-1, 0),
               8: (-1, 1)}  # stay, N, NE, E, SE, S, SW, W, NW  # fmt: skip
    goal = GOALS[1100]
    for action, (dx, dy) in compass.items():
        obs, info = env.reset(seed=0, options={"problem": 1100})  # RL²'s name for the task
        assert info["task"] == 1100 and np.array_equal(obs, [0.0, 0.0])
        obs, reward, terminated, truncated, info = env.step(action)
        np.testing.assert_allclose(obs, [0.1 * dx, 0.1 * dy], atol=1e-7)
        np.testing.assert_allclose(DISCRETE_MOVES[action], [0.1 * dx, 0.1 * dy])
        assert reward == pytest.approx(-np.linalg.norm(np.array([0.1 * dx, 0.1 * dy]) - goal))
        assert info["distance"] == pytest.approx(-reward) and not terminated and not truncated
    # moves add up: three steps NE then one W
    env.reset(seed=0, options={"task": 1100})
    for action in (2, 2, 2, 7):
        obs = env.step(action)[0]
    np.testing.assert_allclose(obs, [0.2, 0.3], atol=1e-6)


def test_discrete_env_keeps_the_continuous_tasks_and_horizon() -> None:
    env = Navigation2DDiscrete()
    for split in ("train", "val", "test"):
        assert env.problems(split) == env.tasks(split) == tasks(split)
    env.reset(seed=1, options={"task": 1150})
    np.testing.assert_allclose(env.goal, GOALS[1150])
    steps = 0
    while True:
        steps += 1
        if env.step(0)[3]:  # staying never reaches a goal off the origin
            break
    assert steps == HORIZON
    with pytest.raises(ValueError, match="int in"):
        env.step(9)
    with pytest.raises(ValueError, match="int in"):
        env.step(np.array([0.1, 0.0]))
    with pytest.raises(ValueError, match="not both"):
        env.reset(options={"task": 1, "problem": 2})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"explore": True})
    check_env(Navigation2DDiscrete(), skip_render_check=True)


# --- PEARL and RL² on navigation ----------------------------------------------------------------------------------

TINY_TRAIN = ["train.device=cpu", "train.steps=2", "train.log_every=1", "train.eval_every=2",
              "train.checkpoint_every=2", "train.eval_episodes=2", "eval.episodes=2"]  # fmt: skip


def test_pearl_accepts_navigation_and_trains(tmp_path: Path) -> None:
    """The navigation config, its episodes cut to 5 steps (1000 training goals: the first collection is one
    episode on each), tiny networks: two steps, then the test metrics after 0, 1 and 2 episodes."""
    sets = [*TINY_TRAIN, "env.max_episode_steps=5", "env.num_envs=50", "train.meta_batch=2",
            "pearl.encoder_hidden=[8]", "pearl.sac.hidden=[8]", "pearl.context_batch=4", "pearl.batch_size=4",
            "pearl.initial_steps=5",
            "pearl.prior_steps=5", "pearl.posterior_steps=5", "pearl.extra_posterior_steps=5"]  # fmt: skip
    run = load_run_config(REPO / "configs" / "pearl_navigation.yaml", sets)
    assert run.env.id == "metalab/Navigation2D-v0" and run.params.rl_reward is None
    seed_everything(0)
    learner = pearl.build(run, Path("unused"), torch.device("cpu"))
    result = fit(learner, run.train, tmp_path)
    assert result.step == 2
    logged = {k: v for _, k, v in read_metrics(tmp_path / "metrics.csv")}
    # 1000 goals x 5 steps, then a round on 4 goals (prior, posterior, extra: 5 steps each); an episode that
    # reaches its goal early is followed by another, so a few more
    assert 1000 * 5 + 4 * 15 <= logged["train/env_steps"] < 1000 * 5 + 4 * 15 + 50
    test = learner.evaluate("test", 2)
    assert {f"test/return_after{k}" for k in range(3)} <= set(test)
    assert all(-5 * 2.0 < test[f"test/return_after{k}"] <= 0 for k in range(3))


def test_pearl_still_refuses_discrete_navigation() -> None:
    run = load_run_config(REPO / "configs" / "pearl_navigation.yaml", [f"env.id={NAVIGATION_2D_DISCRETE_ID}"])
    with pytest.raises(ConfigError, match="continuous"):
        pearl.build(run, Path("unused"), torch.device("cpu"))


def test_rl2_plays_trials_of_three_rewarded_episodes_on_discrete_navigation(tmp_path: Path) -> None:
    sets = [*TINY_TRAIN, "rl2.learning_starts=1", "rl2.batch_size=2", "rl2.hidden=8", "rl2.buffer_size=4"]
    run = load_run_config(REPO / "configs" / "rl2_navigation.yaml", sets)
    assert run.env.id == NAVIGATION_2D_DISCRETE_ID and run.params.trial_episodes == 3
    seed_everything(0)
    learner = rl2.build(run, Path("unused"), torch.device("cpu"))
    assert learner.figures is None  # the navigation env does not render
    result = fit(learner, run.train, tmp_path)
    assert result.step == 2
    logged = [(s, k, v) for s, k, v in read_metrics(tmp_path / "metrics.csv")]
    assert ("train/q" in {k for _, k, _ in logged}) and max(
        v for _, k, v in logged if k == "train/env_steps"
    ) == 600
    stored = learner.state()["buffer"]["columns"]  # two trials of 3 x 100 steps, one history each
    assert stored["mask"].shape == (2, 300) and bool(stored["mask"].all())
    first = stored["inputs"][:, :-1, -1]  # the "first step of an episode" flag
    assert [torch.nonzero(f).flatten().tolist() for f in first] == [[0, 100, 200]] * 2
    assert bool((stored["reward"] < 0).all())  # every episode is rewarded (no reward-free exploration)
    assert stored["terminal"].sum(1).tolist() == [1, 1]
    test = learner.evaluate("test", 2)
    assert {"test/return", *(f"test/return_after{k}" for k in range(3))} <= set(test)
    assert test["test/return"] == test["test/return_after2"]


def test_rl2_trial_episodes_is_checked() -> None:
    with pytest.raises(ConfigError, match="trial_episodes"):
        load_run_config(REPO / "configs" / "rl2_navigation.yaml", ["rl2.trial_episodes=-1"])


# --- the benchmark ------------------------------------------------------------------------------------------------


def test_budgets_in_trainer_steps() -> None:
    """2M env steps: 25 MAML-RL meta-iterations (80,000 each), PEARL's first collection (one episode per training
    goal) then rounds of 1600 every 50 gradient steps, RL² trials of 300 steps."""
    runs = {m: nav.run_config(m, 0, nav.ENV_STEPS, []) for m in nav.METHODS}
    assert nav.trainer_steps(runs["maml-rl"], nav.ENV_STEPS) == 25
    assert nav.trainer_steps(runs["pearl"], nav.ENV_STEPS) == (2_000_000 - 100_000) // 1600 * 50
    assert nav.trainer_steps(runs["rl2"], nav.ENV_STEPS) == 2_000_000 // 300
    for run in runs.values():
        steps, cfg = run.train.steps, run.train
        assert steps % cfg.log_every == 0 and cfg.eval_every % cfg.log_every == 0
        assert steps <= nav.trainer_steps(run, nav.ENV_STEPS) and steps // cfg.eval_every in range(8, 13)
    assert runs["pearl"].train.steps == 59_300  # rounded down to a logging step (every 593)
    assert runs["maml-rl"].train.keep_best is None and runs["maml-rl"].params.eval_inner_steps == 2
    assert nav.split_overrides(["a=1", "pearl:b=2", "rl2:c=3"], "pearl") == ["a=1", "b=2"]
    with pytest.raises(SystemExit, match="unknown method"):
        nav.split_overrides(["dream:x=1"], "pearl")


def test_benchmark_end_to_end_on_a_tiny_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """4000 env steps with 2-step episodes: MAML-RL 2 meta-iterations of 20 goals x 20 episodes x 2, PEARL one
    episode on each of the 1000 goals and one round, RL² 666 trials (its updates only at the end)."""
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    sets = ["env.max_episode_steps=2", "train.eval_episodes=2", "eval.episodes=2", "maml-rl:maml_rl.hidden=[8]",
            "pearl:env.num_envs=50", "pearl:pearl.initial_steps=2", "pearl:pearl.collect_every=2",
            "pearl:pearl.encoder_hidden=[8]", "pearl:pearl.sac.hidden=[8]", "rl2:rl2.learning_starts=660",
            "rl2:rl2.batch_size=2", "rl2:rl2.hidden=8", "rl2:rl2.buffer_size=700"]  # fmt: skip
    res = tmp_path / "res"
    nav.main(["--env-steps", "4000", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(res),
              *(f"--set={s}" for s in sets)])  # fmt: skip
    records = json.loads((res / "nav_side_by_side.json").read_text())
    by = {(r["method"], r["metric"]): r for r in records}
    required = {"benchmark", "task", "method", "metric", "value", "ci95", "unit", "steps", "seconds", "device",
                "torch", "commit", "protocol"}  # fmt: skip
    for method in nav.METHODS:
        for k in (0, 1, 2):
            r = by[method, f"test_return_after{k}_s0"]
            assert (
                required <= set(r) and r["benchmark"] == "nav_side_by_side" and r["task"] == "navigation-2d"
            )
            assert r["value"] is not None and r["value"] <= 0 and r["unit"] == "return"
            assert r["env_step_budget"] == 4000 and 0 < r["env_steps"] <= 4000
            assert r["curve_metric"] == f"val/return_after{k}" and r["curve"]
            assert r["curve"][-1][0] == r["steps"] and r["curve"][-1][1] == r["env_steps"]
            assert by[method, f"test_return_after{k}"]["per_seed"] == [r["value"]]  # the aggregate
        assert by[method, "test_return_after1_s0"]["episodes_seen"] == (20 if method == "maml-rl" else 1)
    assert by["rl2", "test_return_after0_s0"]["action_space"].startswith("discrete")
    assert (
        by["maml-rl", "test_return_after0_s0"]["steps"] == 2
        and by["pearl", "test_return_after0_s0"]["steps"] == 2
    )
    assert by["rl2", "test_return_after0_s0"]["steps"] == 666
    table = (res / "nav_side_by_side.md").read_text()
    assert all(f"| {m} |" in table for m in nav.METHODS)
    assert (res / "nav_side_by_side.png").stat().st_size > 0
