"""Multi-task model-based RL on the point-mass goal family: the env (dynamics, reward, goal sets), the reward
model and its embedding inference, the loop end to end with exact resume, a CLI smoke run of the shipped
config, and config errors."""

from __future__ import annotations

import copy
import json
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import REPO
from gymnasium.utils.env_checker import check_env

from metalab.cli import main
from metalab.config import merge
from metalab.envs import point_mass
from metalab.envs.config import EnvConfig, make_env
from metalab.errors import ConfigError
from metalab.experiment import RunConfig, load_run_config, run_config_from_dict
from metalab.rl import multitask_mbrl as mt
from metalab.train.checkpoint import load_checkpoint
from metalab.train.logger import read_metrics
from metalab.train.loop import CHECKPOINT, Learner, fit
from metalab.utils import seed_everything

CONFIG = REPO / "configs" / "mt_mbrl_point_mass.yaml"
# 8-step episodes; 10 random steps, then cycles of 4 updates of both models and 6 MPC steps: steps 10-13 fit,
# 14-19 act, 20-23 fit, ...; random actions are held for 2 steps; every second episode (1, 3, ...) plans against
# the learned reward.
TINY: dict[str, Any] = {
    "algo": "mt_mbrl",
    "seed": 0,
    "env": {"id": point_mass.POINT_MASS_ID, "max_episode_steps": 8},
    "train": {"steps": 40, "lr": 0.003, "log_every": 1, "eval_every": 20, "checkpoint_every": 10,
              "eval_episodes": 2, "device": "cpu"},
    "eval": {"episodes": 3, "batch": 2},
    "mt_mbrl": {"embed_dim": 2, "reward_hidden": [8], "reward_batch": 4, "context_transitions": 3,
                "infer_steps": 5, "learned_every": 2, "random_hold": 2,
                "mbrl": {"members": 2, "hidden": [8], "particles": 2, "batch_size": 4, "buffer_size": 20,
                         "random_steps": 10, "refit_every": 6, "fit_updates": 4,
                         "planner": {"horizon": 3, "candidates": 8, "iterations": 2, "elites": 2}}},
}  # fmt: skip
METRICS = {f"{k}{ci}" for m in mt.MODES for k in (f"return_{m}", f"success_{m}") for ci in ("", "_ci95")}


def tiny(**sections: Any) -> RunConfig:
    return run_config_from_dict(merge(copy.deepcopy(TINY), sections))


def make(run: RunConfig) -> Learner:
    seed_everything(run.seed)
    return mt.build(run, Path("unused"), torch.device("cpu"))


def test_env_passes_the_checker_and_is_registered() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports soft problems as warnings: fail on them too
        check_env(gym.make(point_mass.POINT_MASS_ID).unwrapped)
    env = make_env(EnvConfig(id=point_mass.POINT_MASS_ID))
    assert EnvConfig(id=point_mass.POINT_MASS_ID).name == "pointmassgoal"
    obs, info = env.reset(seed=0, options={"task": 55})
    assert np.array_equal(obs, np.zeros(4, np.float32)) and info["task"] == 55
    assert np.array_equal(env.unwrapped.goal, point_mass.GOALS["test"][5])
    for t in range(point_mass.MAX_STEPS):
        *_, truncated, _ = env.step(env.action_space.sample())
        assert truncated == (t == point_mass.MAX_STEPS - 1)


def test_semi_implicit_euler_with_damping() -> None:
    env = point_mass.PointMassGoal()
    env.reset(options={"task": 0})
    obs, *_ = env.step(np.array([1.0, -3.0]))  # the second force is clipped to -1
    np.testing.assert_allclose(obs, [0.01, -0.01, 0.1, -0.1], rtol=1e-6)
    obs, *_ = env.step(np.zeros(2))  # v' = v (1 - 0.05), p' = p + 0.1 v'
    np.testing.assert_allclose(obs, [0.01 + 0.0095, -0.01 - 0.0095, 0.095, -0.095], rtol=1e-6)


def test_goal_sets_are_disjoint_deterministic_and_in_the_annulus() -> None:
    sizes = {split: len(g) for split, g in point_mass.GOALS.items()}
    assert sizes == {"train": 40, "val": 10, "test": 20}
    every = np.concatenate(list(point_mass.GOALS.values()))
    assert len({tuple(g) for g in every}) == 70  # no goal in two sets
    np.testing.assert_array_equal(every, point_mass._goals())  # the same draw every time
    radius = np.linalg.norm(every, axis=1)
    assert radius.min() >= 0.3 and radius.max() <= 1.0
    ids = [point_mass.tasks(s) for s in ("train", "val", "test")]
    assert ids == [list(range(40)), list(range(40, 50)), list(range(50, 70))]
    with pytest.raises(ValueError, match="split"):
        point_mass.tasks("trainval")  # type: ignore[arg-type]


def test_reward_fn_matches_the_env_on_random_transitions() -> None:
    env = point_mass.PointMassGoal()
    rng = np.random.default_rng(0)
    for _ in range(200):
        task = int(rng.integers(70))
        env.reset(options={"task": task})
        env._state = rng.uniform(-2, 2, size=4)  # anywhere, at any speed
        obs = env._state.astype(np.float32)
        action = rng.uniform(-1.5, 1.5, size=2).astype(np.float32)  # beyond the bounds too: the env clips
        next_obs, r, _, _, info = env.step(action)
        reward = point_mass.reward_fn(point_mass.ALL_GOALS[task])
        mine = reward(*(torch.from_numpy(x)[None] for x in (obs, action, next_obs)))
        assert mine.item() == pytest.approx(r, abs=1e-5)
        assert info["is_success"] == (info["distance"] < point_mass.SUCCESS_RADIUS)


def test_reward_fn_broadcasts_over_planning_shapes() -> None:
    obs, action = torch.randn(2, 5, 4, 3, 4), torch.randn(2, 5, 1, 3, 2)  # (S, N, P, H, D), (S, N, 1, H, A)
    assert point_mass.reward_fn(np.array([0.5, 0.5]))(obs, action, obs).shape == (2, 5, 4, 3)


def test_predict_reward_broadcasts_and_the_loss_is_standardised() -> None:
    model = mt.RewardModel(4, 2, tasks=3, embed_dim=5, hidden=(16,))
    obs, action, z = torch.randn(2, 7, 4), torch.randn(2, 1, 2), torch.randn(2, 1, 5)
    out = mt.predict_reward(model.net_params(), model.normalizer(), obs, action, obs, z)
    assert out.shape == (2, 7)
    rows = mt.RewardRows(obs.reshape(14, 4), torch.randn(14, 2), obs.reshape(14, 4), 3 * torch.randn(14))
    norm = mt.fit_reward_normalizer(rows)
    model.set_normalizer(norm)
    assert norm.out_std.item() == pytest.approx(rows.reward.std(unbiased=False).item(), rel=1e-5)
    loss, metrics = mt.reward_loss(model.net_params(), model.normalizer(), rows, torch.zeros(14, 5))
    assert loss.item() == pytest.approx(metrics["train/reward_mse"] / norm.out_std.item() ** 2, rel=1e-5)


def test_inferred_embedding_explains_held_out_rewards_better_than_the_mean() -> None:
    """A reward model whose tasks differ only by z: from 20 transitions of a task, the inferred z predicts 200
    other transitions of that task far better than the mean embedding does, and lies nearer the true z."""
    torch.manual_seed(0)
    model = mt.RewardModel(4, 2, tasks=6, embed_dim=3, hidden=(32, 32))
    params = model.net_params()
    embeddings = model.embedding.weight.detach()  # (6, 3)
    true_z = embeddings[:4]  # (G, E) the tasks to recover
    obs, action, next_obs = torch.randn(4, 220, 4), torch.randn(4, 220, 2), torch.randn(4, 220, 4)
    with torch.no_grad():
        reward = mt.predict_reward(
            params, model.normalizer(), obs, action, next_obs, true_z[:, None]
        )  # (G, 220)
    context = mt.RewardRows(obs[:, :20], action[:, :20], next_obs[:, :20], reward[:, :20])
    mean = embeddings.mean(0)
    z = mt.infer_embedding(params, model.normalizer(), mean, context, steps=300, lr=0.05)
    assert z.shape == (4, 3) and not z.requires_grad

    def held_out_mse(zs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pred = mt.predict_reward(params, model.normalizer(), obs[:, 20:], action[:, 20:], next_obs[:, 20:],
                                     zs[:, None])  # fmt: skip
        return ((pred - reward[:, 20:]) ** 2).mean(1)  # (G,)

    inferred, baseline = held_out_mse(z), held_out_mse(mean.expand(4, -1))
    assert torch.all(inferred < 0.05 * baseline), (inferred, baseline)
    assert torch.all((z - true_z).norm(dim=1) < (mean - true_z).norm(dim=1))
    assert torch.equal(
        mt.infer_embedding(params, model.normalizer(), mean, context, 0, 0.05), mean.expand(4, -1)
    )


def test_the_loop_trains_both_models_and_evaluates_both_ways() -> None:
    learner = make(tiny())
    losses = []
    for step in range(30):  # random steps, a fit, MPC steps (episode 1: learned reward), a fit, MPC steps
        loss, metrics = learner.loss(step)
        assert (loss is not None) == (10 <= step < 14 or 20 <= step < 24)
        if loss is not None:
            learner.model.zero_grad()
            loss.backward()
            reward_model: mt.RewardModel = learner.model.reward  # type: ignore[assignment]
            assert reward_model.embedding.weight.grad is not None  # the embeddings learn
            assert learner.model.dynamics.weight0.grad is not None
            losses.append(metrics)
    assert {"train/model_nll", "train/reward_mse"} <= set(losses[-1])
    assert metrics["train/env_steps"] == 22 and metrics["train/episodes"] == 2
    assert {"train/return_random", "train/return_learned"} <= set(metrics)  # episode 0 random, 1 learned
    rows = learner.state()["buffer"]["columns"]  # 22 env steps in 20 rows: rows 0-1 hold env steps 20-21
    assert rows["task"].tolist() == [2] * 2 + [0] * 6 + [1] * 8 + [2] * 4  # the training tasks take turns
    random = rows["action"][2:10]  # env steps 2-7 of episode 0, 0-1 of episode 1: pairs of held actions
    assert torch.equal(random[0::2], random[1::2]) and not torch.equal(random[1:-1:2], random[2::2])
    out = learner.evaluate("val", 3)
    assert set(out) == {f"val/{k}" for k in METRICS} | {"val/reward_rmse", "val/reward_rmse_mean_z"}
    assert all(0 <= out[f"val/success_{m}"] <= 1 and out[f"val/return_{m}"] < 0 for m in mt.MODES)
    assert out == learner.evaluate("val", 3)  # a fixed set of episodes: the same numbers every time


def test_logged_rewards_are_the_env_rewards_of_their_task() -> None:
    learner = make(tiny())
    for step in range(10):
        learner.loss(step)
    rows = {k: v.numpy() for k, v in learner.state()["buffer"]["columns"].items()}
    goals = point_mass.GOALS["train"][rows["task"]]  # (T, 2)
    expected = point_mass.goal_reward(*(torch.from_numpy(x) for x in (rows["obs"], rows["action"],
                                                                       rows["next_obs"], goals)))  # fmt: skip
    np.testing.assert_allclose(rows["reward"], expected.numpy(), atol=1e-5)


def test_resume_is_exact(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a fit and of an episode, with the buffer wrapped; a fresh learner resumes to the
    same weights, normalisers, buffer, warm start and logs as a run that never stopped."""
    run = tiny()
    for name in ("ref", "run"):
        (tmp_path / name).mkdir()
    reference = make(run)
    fit(reference, run.train, tmp_path / "ref")

    interrupted = make(run)
    inner = interrupted.loss

    def loss(step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        if step == 31:  # the second update of the third fit
            os.kill(os.getpid(), signal.SIGINT)
        return inner(step)

    interrupted.loss = loss
    result = fit(interrupted, run.train, tmp_path / "run")
    assert result.interrupted and result.step == 32
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)["learner"]
    assert saved["recorder"]["actions"] is not None and saved["episode"] == 2  # mid-episode
    assert saved["buffer"]["size"] == 20 and saved["buffer"]["pos"] == 2  # 22 env steps: wrapped

    resumed = make(run)
    seed_everything(123)
    out = fit(resumed, run.train, tmp_path / "run", resume=True)
    assert (out.step, out.interrupted) == (40, False)
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    ref_state, res_state = reference.state(), resumed.state()
    for k, v in ref_state["buffer"]["columns"].items():
        assert torch.equal(v, res_state["buffer"]["columns"][k]), k
    assert torch.equal(ref_state["mean"], res_state["mean"]) and ref_state["episode"] == res_state["episode"]
    for kind, recent in ref_state["recent"].items():
        assert torch.equal(recent, res_state["recent"][kind]), kind

    def logged(run_dir: Path) -> list[tuple[int, str, float]]:
        return [r for r in read_metrics(run_dir / "metrics.csv") if not r[1].startswith("time/")]

    assert logged(tmp_path / "run") == logged(tmp_path / "ref")


def test_cli_smoke_run_of_the_shipped_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = ["train.steps=16", "train.eval_every=16", "train.checkpoint_every=8", "train.eval_episodes=2",
                 "train.log_every=1", "eval.episodes=2", "eval.batch=2", "env.max_episode_steps=5",
                 "mt_mbrl.mbrl.random_steps=6", "mt_mbrl.mbrl.fit_updates=4", "mt_mbrl.mbrl.refit_every=6",
                 "mt_mbrl.mbrl.hidden=[8]", "mt_mbrl.reward_hidden=[8]", "mt_mbrl.infer_steps=3",
                 "mt_mbrl.mbrl.planner.horizon=3", "mt_mbrl.mbrl.planner.candidates=10",
                 "mt_mbrl.mbrl.planner.elites=2", "mt_mbrl.mbrl.planner.iterations=2"]  # fmt: skip
    args = ["train", str(CONFIG), "--runs-dir", str(tmp_path)]
    assert main(args + [f"--set={o}" for o in overrides]) == 0
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("mt_mbrl-pointmassgoal-s0-")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 16 and {f"test/{k}" for k in METRICS} <= set(result)
    keys = {k for _, k, _ in read_metrics(run_dir / "metrics.csv")}
    assert {
        "train/loss",
        "train/model_nll",
        "train/reward_mse",
        "val/success_learned",
        "val/reward_rmse",
    } <= keys
    assert "test/success_known" in capsys.readouterr().out


def test_shipped_config() -> None:
    run = load_run_config(CONFIG)
    cfg: mt.Config = run.params
    assert run.algo == "mt_mbrl" and run.env.id == point_mass.POINT_MASS_ID
    assert run.eval.episodes == len(point_mass.GOALS["test"])  # one test episode per held-out goal
    mb = cfg.mbrl
    cycles, rest = divmod(run.train.steps - mb.random_steps, mb.fit_updates + mb.refit_every)
    assert rest == 0 and cycles >= 1
    env_steps = mb.random_steps + cycles * mb.refit_every
    assert env_steps % point_mass.MAX_STEPS == 0 and env_steps // point_mass.MAX_STEPS >= 40  # every task


def test_config_errors_name_the_key() -> None:
    for section, key in (
        ({"embed_dim": 0}, "mt_mbrl.embed_dim"),
        ({"reward_hidden": [0]}, "mt_mbrl.reward_hidden[0]"),
        ({"reward_batch": 0}, "mt_mbrl.reward_batch"),
        ({"context_transitions": 0}, "mt_mbrl.context_transitions"),
        ({"infer_steps": -1}, "mt_mbrl.infer_steps"),
        ({"infer_lr": 0.0}, "mt_mbrl.infer_lr"),
        ({"learned_every": -1}, "mt_mbrl.learned_every"),
        ({"mbrl": {"particles": 3}}, "mt_mbrl.mbrl.particles"),  # not a multiple of the 2 members
        ({"mbrl": {"planner": {"elites": 9}}}, "mt_mbrl.mbrl.planner.elites"),
        ({"context": 5}, "mt_mbrl.context"),  # unknown key
    ):
        with pytest.raises(ConfigError) as info:
            tiny(mt_mbrl=section)
        assert info.value.key == key, section
    with pytest.raises(ConfigError, match=r"'env.id'.*goal family"):
        make(tiny(env={"id": "Pendulum-v1", "max_episode_steps": None}))


def test_in_task_wrapper_sets_the_task_and_appends_the_context() -> None:
    env = mt.InTask(gym.make(point_mass.POINT_MASS_ID))
    env.set_task(61, torch.tensor([1.0, 2.0, 3.0]))
    obs, info = env.reset(seed=0)
    assert info["task"] == 61 and obs.tolist() == [0, 0, 0, 0, 1, 2, 3]
    obs, reward, *_ = env.step(np.zeros(2, np.float32))
    assert obs.shape == (7,) and reward == env.last_reward == pytest.approx(
        -np.linalg.norm(point_mass.ALL_GOALS[61])
    )


def test_random_transitions_hold_actions_within_episodes_and_reset_after_them() -> None:
    env = mt.InTask(point_mass.PointMassGoal(max_steps=4))
    bounds = (-np.ones(2, np.float32), np.ones(2, np.float32))
    obs, action, next_obs, reward = mt.random_transitions(env, 45, 10, seed=3, bounds=bounds, hold=3)
    assert obs.shape == next_obs.shape == (10, 4) and action.shape == (10, 2) and reward.shape == (10,)
    assert env.unwrapped.task == 45
    assert not obs[[0, 4, 8]].any() and np.array_equal(obs[1:4], next_obs[:3])  # a new episode every 4 steps
    for episode in (action[0:4], action[4:8]):  # held for 3 steps, then a new draw
        assert (episode[:3] == episode[0]).all() and (episode[3] != episode[0]).any()
    again = mt.random_transitions(env, 45, 10, seed=3, bounds=bounds, hold=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (obs, action, next_obs, reward), strict=True))
