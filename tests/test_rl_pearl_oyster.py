"""PEARL's official-code (oyster) evaluation: prior trajectories before posterior ones, the logged metric against
a hand computation, the trial metrics left as they were, and PEARL on the half-cheetah velocity task."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_rl_pearl import make

from metalab.config import merge
from metalab.experiment import RunConfig, load_run_config, run_config_from_dict
from metalab.rl import pearl
from metalab.train.loop import Learner, fit

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "algo": "pearl",
    "seed": 0,
    "env": {"id": "metalab/PointRobotSparse-v0"},
    "train": {"steps": 4, "meta_batch": 2, "lr": 0.001, "log_every": 1, "eval_every": 4, "checkpoint_every": 4,
              "eval_episodes": 2, "device": "cpu"},
    "eval": {"episodes": 4, "batch": 2},
    "pearl": {"latent_dim": 2, "encoder_hidden": [8], "context_batch": 8, "batch_size": 8, "buffer_size": 50,
              "initial_steps": 20, "collect_every": 5, "tasks_per_collect": 1, "prior_steps": 20,
              "posterior_steps": 20, "extra_posterior_steps": 0, "sac": {"hidden": [8]},
              # 50 transitions in whole 20-step trajectories: 3 per run, the first 2 with z from the prior
              "oyster_num_evals": 2, "oyster_exp_traj": 2, "oyster_steps_per_eval": 50},
}  # fmt: skip


def tiny(**sections: Any) -> RunConfig:
    return run_config_from_dict(merge(copy.deepcopy(TINY), sections))


def state_of(learner: Learner) -> pearl.PEARL:
    return learner.evaluate.args[0]  # type: ignore[attr-defined]  # evaluate = partial(evaluate, pearl)


def test_oyster_runs_use_the_prior_for_the_first_trajectories_then_the_runs_posterior(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    learner = make(tiny())
    learner.loss(0)  # one step of training: an encoder whose posterior is not the prior
    seen: list[tuple[bool, list[int]]] = []
    rows: list[int] = []
    real_z, real_posterior = pearl.trial_z, pearl.posterior

    def trial_z(p: pearl.PEARL, encoder: Any, contexts: Any, prior: bool, generator: Any) -> torch.Tensor:
        seen.append((prior, [len(c) for c in contexts]))
        return real_z(p, encoder, contexts, prior, generator)

    def posterior(encoder: Any, context: torch.Tensor, latent: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows.append(context.shape[0])
        return real_posterior(encoder, context, latent)

    monkeypatch.setattr(pearl, "trial_z", trial_z)
    monkeypatch.setattr(pearl, "posterior", posterior)
    runs = pearl.oyster_runs(state_of(learner), "test")
    assert runs.tasks == [t for t in range(80, 100) for _ in range(2)]  # every test goal, num_evals runs each
    assert all(len(r) == 3 for r in runs.returns)  # whole trajectories until >= 50 transitions
    # eval.batch 2: 20 lockstep pairs of runs; trajectories 0 and 1 from the prior, 2 from the posterior of both
    assert seen == [(True, [0, 0]), (True, [1, 1]), (False, [2, 2])] * 20
    assert rows == [40] * 40  # one posterior per run, of its 2 trajectories' 40 transitions


def test_oyster_metric_is_the_last_trajectory_averaged_over_runs_then_tasks() -> None:
    runs = pearl.OysterRuns(
        tasks=[7, 7, 9],
        returns=[[1.0, 2.0, 3.0], [0.0, 4.0, 5.0, 6.0], [10.0, 20.0, 30.0]],
        successes=[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0]],
    )
    m = pearl.oyster_metrics(runs, "test")
    assert m["test/oyster_return"] == pytest.approx(((3 + 6) / 2 + 30) / 2)  # task 7: 4.5, task 9: 30
    assert m["test/oyster_return_ci95"] > 0
    # the official online returns: trajectory k, mean over a task's runs then over tasks, up to the fewest (3)
    assert m["test/oyster_return_traj0"] == pytest.approx((0.5 + 10) / 2)
    assert m["test/oyster_return_traj2"] == pytest.approx((4 + 30) / 2)
    assert "test/oyster_return_traj3" not in m
    assert m["test/oyster_success"] == pytest.approx((0.5 + 1) / 2)  # the last trajectory's
    unreported = runs._replace(successes=[[math.nan] * len(r) for r in runs.returns])
    assert "test/oyster_success" not in pearl.oyster_metrics(unreported, "test")


def test_evaluate_adds_the_oyster_metrics_and_leaves_the_trial_metrics_alone() -> None:
    learner = make(tiny())
    learner.loss(0)
    state = state_of(learner)
    with_oyster = learner.evaluate("test", 4)
    expected = pearl.oyster_metrics(pearl.oyster_runs(state, "test"), "test")
    assert {k: v for k, v in with_oyster.items() if "oyster" in k} == expected
    state.cfg = dataclasses.replace(state.cfg, oyster_num_evals=0)
    without = learner.evaluate("test", 4)
    assert not any("oyster" in k for k in without)
    assert without == {k: v for k, v in with_oyster.items() if "oyster" not in k}


def test_point_robot_configs_carry_the_official_evaluation() -> None:
    for name in ("pearl_point_robot.yaml", "pearl_point_robot_small.yaml"):
        cfg = load_run_config(REPO / "configs" / name).params
        # sparse-point-robot.json: num_exp_traj_eval 5, num_steps_per_eval 400; default.py: num_evals 2
        assert (cfg.oyster_exp_traj, cfg.oyster_steps_per_eval, cfg.oyster_num_evals) == (5, 400, 2)


def test_pearl_runs_on_the_half_cheetah_velocity_task(tmp_path: Path) -> None:
    """A few gradient steps of configs/pearl_half_cheetah_vel.yaml made tiny, then both evaluations (a few s)."""
    pytest.importorskip("mujoco")
    sets = ["train.steps=3", "train.eval_every=3", "train.checkpoint_every=3", "train.device=cpu",
            "train.meta_batch=2", "pearl.encoder_hidden=[8]", "pearl.sac.hidden=[8]", "pearl.initial_steps=1",
            "pearl.batch_size=8", "pearl.context_batch=8", "pearl.tasks_per_collect=1", "pearl.prior_steps=1",
            "pearl.extra_posterior_steps=1", "eval.episodes=2", "train.eval_episodes=2"]  # fmt: skip
    run = load_run_config(REPO / "configs" / "pearl_half_cheetah_vel.yaml", sets)
    assert run.env.id == "metalab/HalfCheetahVelPEARL-v0"
    learner = make(run)
    fit(learner, run.train, tmp_path)
    m = learner.evaluate("test", 2)
    assert not any("success" in k for k in m)  # the half-cheetah reports no success
    # 30 test goals, 1 run each, 3 trajectories of 200 steps; the reward is at most 0 a step
    assert {f"test/oyster_return_traj{k}" for k in range(3)} <= set(m) and "test/oyster_return_traj3" not in m
    assert -200 * 10 < m["test/oyster_return"] <= 0 and np.isfinite(m["test/return_after2"])
    assert m["test/oyster_return"] == pytest.approx(
        m["test/oyster_return_traj2"]
    )  # one run per task: its last trajectory
