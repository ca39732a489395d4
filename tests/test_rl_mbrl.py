"""Model-based RL with MPC: the step schedule, a CLI smoke run of the shipped PETS config, exact resume, every
planner and propagation in the loop, the loop on the MuJoCo envs (termination, a wrapped observation) and on the
cart-pole swing-up, the shipped configs of the benchmark, and config errors. The env reward functions:
tests/test_rl_env_models.py."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO

from benchmarks import mbrl as bench
from metalab.cli import main
from metalab.config import merge
from metalab.envs import CARTPOLE_SWINGUP_ID
from metalab.errors import ConfigError
from metalab.experiment import RunConfig, load_run_config, run_config_from_dict
from metalab.rl import mbrl
from metalab.train.checkpoint import load_checkpoint
from metalab.train.logger import read_metrics
from metalab.train.loop import CHECKPOINT, Learner, fit
from metalab.utils import seed_everything

CONFIG = REPO / "configs" / "mbrl_pendulum.yaml"
CARTPOLE_CONFIG = REPO / "configs" / "mbrl_cartpole_swingup.yaml"
REACHER_CONFIG = REPO / "configs" / "mbrl_reacher.yaml"
# 8-step Pendulum episodes; 10 random steps, then cycles of 4 model updates and 6 MPC steps: steps 10-13 fit,
# 14-19 act, 20-23 fit, ...; a 2-member ensemble of 8 units, 2 particles, CEM of 2 rounds of 8 sequences of 3.
TINY: dict[str, Any] = {
    "algo": "mbrl",
    "seed": 0,
    "env": {"id": "Pendulum-v1", "max_episode_steps": 8},
    "train": {"steps": 40, "lr": 0.003, "log_every": 1, "eval_every": 20, "checkpoint_every": 10,
              "eval_episodes": 2, "device": "cpu"},
    "eval": {"episodes": 2, "batch": 2},
    "mbrl": {"members": 2, "hidden": [8], "particles": 2, "batch_size": 4, "buffer_size": 20, "random_steps": 10,
             "refit_every": 6, "fit_updates": 4,
             "planner": {"horizon": 3, "candidates": 8, "iterations": 2, "elites": 2}},
}  # fmt: skip


def tiny(**sections: Any) -> RunConfig:
    return run_config_from_dict(merge(copy.deepcopy(TINY), sections))


def make(run: RunConfig) -> Learner:
    seed_everything(run.seed)
    return mbrl.build(run, Path("unused"), torch.device("cpu"))


def test_step_schedule() -> None:
    cfg = tiny().params
    kinds = "".join(mbrl.phase(s, cfg).kind[0] for s in range(34))
    assert kinds == "r" * 10 + "ffff" + "a" * 6 + "ffff" + "a" * 6 + "ffff"
    assert mbrl.phase(12, cfg) == mbrl.Phase("fit", 10, 0, 2)
    assert mbrl.phase(15, cfg) == mbrl.Phase("act", 11, 1, 0)
    assert mbrl.phase(21, cfg) == mbrl.Phase("fit", 16, 1, 1)
    assert mbrl.phase(29, cfg) == mbrl.Phase("act", 21, 2, 0)


def test_shipped_config_is_pets() -> None:
    run = load_run_config(CONFIG)
    cfg = run.params
    assert run.algo == "mbrl" and run.env.id == "Pendulum-v1"
    assert (cfg.probabilistic, cfg.propagation, cfg.planner.method) == (True, "tsinf", "cem")
    assert cfg.members > 1 and cfg.particles % cfg.members == 0
    cycles, rest = divmod(run.train.steps - cfg.random_steps, cfg.fit_updates + cfg.refit_every)
    assert rest == 0 and cycles >= 1  # training ends after a whole MPC episode


def test_cli_smoke_run_of_the_shipped_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = ["train.steps=16", "train.eval_every=16", "train.checkpoint_every=8", "train.eval_episodes=1", "train.log_every=1",
                 "eval.episodes=2", "eval.batch=2", "env.max_episode_steps=5", "mbrl.random_steps=6",
                 "mbrl.fit_updates=4", "mbrl.refit_every=6", "mbrl.hidden=[8]", "mbrl.particles=5",
                 "mbrl.planner.horizon=3", "mbrl.planner.candidates=10", "mbrl.planner.elites=2",
                 "mbrl.planner.iterations=2", "train.device=cpu"]  # fmt: skip
    args = ["train", str(CONFIG), "--runs-dir", str(tmp_path)]
    assert main(args + [f"--set={o}" for o in overrides]) == 0
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("mbrl-pendulum-s0-")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 16 and -5 * 17 < result["test/return"] <= 0  # 5 steps of at most ~16.3 cost
    keys = {k for _, k, _ in read_metrics(run_dir / "metrics.csv")}
    assert {"train/loss", "train/model_nll", "train/env_steps", "val/return", "val/return_ci95"} <= keys
    assert "test/return" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0


def test_resume_is_exact(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a fit and of an episode, with the buffer wrapped; a fresh learner resumes to the
    same weights, normaliser, buffer, warm start and logs as a run that never stopped."""
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
    assert saved["recorder"]["actions"] is not None  # mid-episode: the env state is replayed
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
    assert ref_state["recorder"]["seed"] == res_state["recorder"]["seed"]

    def logged(run_dir: Path) -> list[tuple[int, str, float]]:
        return [r for r in read_metrics(run_dir / "metrics.csv") if not r[1].startswith("time/")]

    assert logged(tmp_path / "run") == logged(tmp_path / "ref")


@pytest.mark.parametrize(
    "variant",
    [
        {"planner": {"method": "random"}, "members": 1, "particles": 1, "probabilistic": False},  # Nagabandi
        {"planner": {"method": "mppi"}, "propagation": "ts1"},
        {"planner": {"method": "gradient", "grad_steps": 2}},
        {"planner": {"method": "gradient", "grad_init": "mean", "grad_steps": 2}, "probabilistic": False},
    ],
)
def test_every_planner_and_model_runs_the_loop(variant: dict) -> None:
    learner = make(tiny(mbrl=variant))
    fits = []
    for step in range(20):  # random steps, a fit, MPC steps
        loss, metrics = learner.loss(step)
        assert (loss is not None) == (10 <= step < 14)
        if loss is not None:
            learner.model.zero_grad()
            loss.backward()
            fits.append(metrics)
    assert metrics["train/env_steps"] == 16 and len(fits) == 4
    assert ("train/model_nll" in fits[-1]) == variant.get("probabilistic", True)
    mean = learner.state()["mean"]
    assert mean.shape == (1, 3, 1) and torch.all(mean.abs() <= 2)
    out = learner.evaluate("val", 1)
    assert set(out) == {"val/return", "val/return_ci95"} and out["val/return"] <= 0


@pytest.mark.parametrize(
    ("env_id", "obs_dim"), [("InvertedPendulum-v5", 4), ("HalfCheetah-v5", 18), ("Reacher-v5", 10)]
)
def test_the_loop_runs_on_the_mujoco_envs(env_id: str, obs_dim: int) -> None:
    pytest.importorskip("mujoco")
    learner = make(tiny(env={"id": env_id, "max_episode_steps": 8}))
    for step in range(20):  # random steps, a fit, MPC steps
        loss, metrics = learner.loss(step)
        if loss is not None:
            learner.model.zero_grad()
            loss.backward()
    assert learner.model.obs_dim == obs_dim  # HalfCheetah: the step's forward velocity appended
    rows = learner.state()["buffer"]["columns"]
    assert rows["obs"].shape[1] == obs_dim and torch.isfinite(rows["next_obs"]).all()
    assert metrics["train/episodes"] >= 1
    if env_id == "InvertedPendulum-v5":  # random torques topple the pole within 8 steps: episodes terminate
        assert 0 <= metrics["train/return"] <= 8
    out = learner.evaluate("val", 1)
    assert np.isfinite(out["val/return"])


def test_the_loop_runs_on_the_cartpole_swingup() -> None:
    learner = make(tiny(env={"id": CARTPOLE_SWINGUP_ID, "max_episode_steps": 8}))
    for step in range(20):  # random steps, a fit, MPC steps
        loss, metrics = learner.loss(step)
        if loss is not None:
            learner.model.zero_grad()
            loss.backward()
    assert learner.model.obs_dim == 5 and metrics["train/episodes"] == 2
    assert 0 < metrics["train/return"] < 8  # at most 1 per step
    out = learner.evaluate("val", 1)
    assert 0 < out["val/return"] < 8


def test_the_cartpole_swingup_config_is_pets_and_every_benchmark_setup_loads() -> None:
    run = load_run_config(CARTPOLE_CONFIG)
    cfg = run.params
    assert run.env.id == CARTPOLE_SWINGUP_ID and cfg.planner.horizon == 25  # 15 never swings up (module docs)
    assert (cfg.probabilistic, cfg.propagation, cfg.planner.method) == (True, "tsinf", "cem")
    cycles, rest = divmod(run.train.steps - cfg.random_steps, cfg.fit_updates + cfg.refit_every)
    assert rest == 0 and cycles == 15 and cfg.refit_every == 200  # 15 whole MPC episodes
    for name in bench.SETUPS:
        assert bench.run_config(name, 1, []).seed == 1, name
    assert bench.SETUPS["pets-cartpole-swingup"].config == CARTPOLE_CONFIG.name


def test_the_reacher_config_is_pets_sized_for_a_cpu() -> None:
    run = load_run_config(REACHER_CONFIG)
    cfg = run.params
    assert run.env.id == "Reacher-v5" and bench.SETUPS["pets-reacher"].config == REACHER_CONFIG.name
    assert (cfg.probabilistic, cfg.propagation, cfg.planner.method) == (True, "tsinf", "cem")
    assert cfg.random_steps == 5 * 50 and cfg.refit_every == 50  # whole 50-step episodes: 5 random, 1 per fit
    cycles, rest = divmod(run.train.steps - cfg.random_steps, cfg.fit_updates + cfg.refit_every)
    assert rest == 0 and cycles == 20  # 20 whole MPC episodes
    assert run.train.eval_every < run.train.steps  # a val evaluation midway, and one at the end
    cheetah = load_run_config(REPO / "configs" / "mbrl_half_cheetah.yaml").params
    assert sum(cfg.hidden) * cfg.members < sum(cheetah.hidden) * cheetah.members  # a smaller ensemble


def test_the_fit_refits_the_normaliser_to_all_data() -> None:
    learner = make(tiny())
    for step in range(11):  # 10 random steps, then the first update of the first fit
        learner.loss(step)
    rows = learner.state()["buffer"]["columns"]
    inputs = torch.cat([rows["obs"], rows["action"]], -1)
    assert torch.allclose(learner.model.in_mean, inputs.mean(0), atol=1e-6)
    assert torch.allclose(learner.model.out_mean, (rows["next_obs"] - rows["obs"]).mean(0), atol=1e-6)


def test_config_errors_name_the_key() -> None:
    for section, key in (
        ({"particles": 3}, "mbrl.particles"),  # not a multiple of the 2 members
        ({"planner": {"elites": 9}}, "mbrl.planner.elites"),  # more than the 8 candidates
        ({"planner": {"horizon": 0}}, "mbrl.planner.horizon"),
        ({"planner": {"method": "ilqr"}}, "mbrl.planner.method"),
        ({"propagation": "ts2"}, "mbrl.propagation"),
        ({"fit_updates": 0}, "mbrl.fit_updates"),
        ({"random_steps": 0}, "mbrl.random_steps"),
        ({"members": 0}, "mbrl.members"),
        ({"bound_reg": -1.0}, "mbrl.bound_reg"),
    ):
        with pytest.raises(ConfigError) as info:
            tiny(mbrl=section)
        assert info.value.key == key, section
    with pytest.raises(ConfigError, match=r"'env.id'.*reward function"):
        make(tiny(env={"id": "CartPole-v1", "max_episode_steps": None}))
