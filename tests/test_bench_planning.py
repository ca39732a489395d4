"""The planner ablations of benchmarks.planning end to end on a tiny budget: one trained model, every planner
tested on the same episodes, and the records they leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import common, planning
from benchmarks import mbrl as mbrl_bench
from metalab.experiment import RunConfig

# 5-step episodes; 6 random steps, then a fit of 4 updates and 6 MPC steps (16 trainer steps); a 2-member
# ensemble of 8 units, 2 particles; CEM of 2 rounds of 10 sequences of 3 actions (the planners' overrides follow
# these, so random shooting draws its 1,000 and gradient planning takes its 20 Adam steps).
TINY = ["train.steps=16", "train.eval_every=16", "train.checkpoint_every=8", "train.eval_episodes=1",
        "train.log_every=1", "eval.episodes=2", "eval.batch=2", "env.max_episode_steps=5", "mbrl.members=2",
        "mbrl.random_steps=6", "mbrl.fit_updates=4", "mbrl.refit_every=6", "mbrl.hidden=[8]", "mbrl.particles=2",
        "mbrl.planner.horizon=3", "mbrl.planner.candidates=10", "mbrl.planner.elites=2",
        "mbrl.planner.iterations=2"]  # fmt: skip


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    original = mbrl_bench.run_config

    def small(name: str, seed: int, overrides: list[str]) -> RunConfig:
        return original(name, seed, [*TINY, *overrides])

    monkeypatch.setattr(mbrl_bench, "run_config", small)
    for name, setup in planning.ABLATIONS.items():
        monkeypatch.setitem(planning.ABLATIONS, name, setup._replace(episodes=3))


@pytest.mark.parametrize(("name", "task", "env_id"), [("ablation-pendulum", "pendulum-pets-model", "Pendulum-v1"),
                                                      ("ablation-reacher", "reacher-pets-model", "Reacher-v5")])  # fmt: skip
def test_tiny_ablation_records_every_planner(
    tiny: None, tmp_path: Path, name: str, task: str, env_id: str
) -> None:
    if env_id == "Reacher-v5":
        pytest.importorskip("mujoco")
    setup = planning.ABLATIONS[name]
    args = ["--only", name, "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")]
    planning.main(args)
    checkpoint = tmp_path / "runs" / f"{setup.setup}-s0" / "checkpoint.pt"  # the model was trained there
    trained = checkpoint.stat().st_mtime_ns
    records = json.loads((tmp_path / "res" / "planning.json").read_text())
    assert {r["task"] for r in records} == {task}
    assert {(r["method"], r["metric"]) for r in records} == {
        (m, k) for m in ("random", "cem", "mppi", "gradient") for k in ("test_return", "seconds_per_env_step")
    }
    for r in records:
        assert r["env"] == env_id and r["test_episodes"] == 3 and r["env_steps"] == 3 * 5, r
        assert r["model_steps"] == 16 and r["commit"] == "abc1234" and r["protocol"] == common.PROTOCOL
        assert r["config"] == f"configs/{mbrl_bench.SETUPS[setup.setup].config}"
        assert r["overrides"] == list(setup.planners[r["method"]])
    returns = {r["method"]: r for r in records if r["metric"] == "test_return"}
    # 5 steps, every reward in (-2.5, 0] on Reacher (distance < 0.5, |a|^2 <= 2), > -16.3 on Pendulum
    low = -5 * 2.5 if env_id == "Reacher-v5" else -5 * 16.3
    for r in returns.values():
        assert low < r["value"] <= 0 and r["ci95"] is not None and r["unit"] == "return", r
    speeds = [r for r in records if r["metric"] == "seconds_per_env_step"]
    assert all(r["value"] > 0 and r["unit"] == "s" for r in speeds)
    planning.main(args)  # again: the finished model is reloaded, not retrained, and the records replaced
    assert checkpoint.stat().st_mtime_ns == trained
    again = json.loads((tmp_path / "res" / "planning.json").read_text())
    assert len(again) == len(records) and all(r["model_steps"] == 16 for r in again)


def test_every_ablation_plans_about_equal_sequences_per_step() -> None:
    """Random shooting's candidates equal CEM's and MPPI's rounds x candidates; gradient planning adds its Adam
    steps (one sequence each) to CEM's plan; all from the configuration's shipped config."""
    for name, setup in planning.ABLATIONS.items():
        cfg = {
            m: mbrl_bench.run_config(setup.setup, 0, list(o)).params.planner
            for m, o in setup.planners.items()
        }
        budget = cfg["cem"].iterations * cfg["cem"].candidates
        assert cfg["cem"].method == "cem" and cfg["random"].candidates == budget, name
        assert (cfg["mppi"].method, cfg["mppi"].iterations * cfg["mppi"].candidates) == ("mppi", budget), name
        grad = cfg["gradient"]
        assert (grad.method, grad.grad_init) == ("gradient", "cem"), name
        assert grad.iterations * grad.candidates == budget, name
        assert 0 < grad.grad_steps <= 0.1 * budget, name
        assert len({c.horizon for c in cfg.values()}) == 1, name
