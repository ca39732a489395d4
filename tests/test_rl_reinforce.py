"""REINFORCE: rewards-to-go by hand, the baseline gets no policy gradient, tiny runs on each action type,
exact resume, and learning CartPole."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from metalab.config import merge
from metalab.errors import ConfigError
from metalab.experiment import RunConfig, load_run_config, run_config_from_dict
from metalab.rl import reinforce
from metalab.train.loop import Learner, fit
from metalab.utils import seed_everything

REPO = Path(__file__).resolve().parents[1]
TINY: dict[str, Any] = {
    "algo": "reinforce",
    "seed": 0,
    "env": {"id": "CartPole-v1", "max_episode_steps": 50},
    "train": {"steps": 6, "lr": 0.01, "log_every": 1, "eval_every": 3, "checkpoint_every": 2,
              "eval_episodes": 4, "device": "cpu"},
    "eval": {"episodes": 4, "batch": 4},
    "reinforce": {"episodes": 3, "hidden": [16]},
}  # fmt: skip


def tiny(**sections: Any) -> RunConfig:
    return run_config_from_dict(merge(copy.deepcopy(TINY), sections))


def make(run: RunConfig) -> Learner:
    seed_everything(run.seed)
    return reinforce.build(run, Path("unused"), torch.device("cpu"))


def test_rewards_to_go_by_hand() -> None:
    out = reinforce.rewards_to_go(np.array([1.0, 0.0, 2.0]), 0.5)
    assert out.tolist() == [1 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2.0]
    assert reinforce.rewards_to_go(np.ones(4), 1.0).tolist() == [4, 3, 2, 1]


def test_baseline_gets_no_policy_gradient() -> None:
    """With value_coef = 0 only the policy learns; with it the value net is fitted to the rewards-to-go."""
    torch.manual_seed(0)
    model = reinforce.PolicyValue(3, (8,), 2, continuous=False, log_std=0.0)
    batch = reinforce.Batch(
        torch.randn(5, 3), torch.zeros(5, 0), torch.tensor([0, 1, 1, 0, 1]), torch.randn(5)
    )
    loss, metrics = reinforce.reinforce_loss(model, dict(model.named_parameters()), batch,
                                             reinforce.Config(value_coef=0.0))  # fmt: skip
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.value.parameters())
    assert any(p.grad.any() for p in model.policy.parameters())
    assert {"loss/policy", "loss/value", "train/entropy"} <= set(metrics)


def test_policy_gradient_matches_hand_formula() -> None:
    """Without normalisation the surrogate's gradient is -mean(grad log pi(a|s) * (G - V(s)))."""
    torch.manual_seed(1)
    model = reinforce.PolicyValue(2, (4,), 3, continuous=False, log_std=0.0)
    batch = reinforce.Batch(torch.randn(4, 2), torch.zeros(4, 0), torch.tensor([0, 2, 1, 2]), torch.randn(4))
    cfg = reinforce.Config(value_coef=0.0, normalize_advantages=False)
    loss, _ = reinforce.reinforce_loss(model, dict(model.named_parameters()), batch, cfg)
    logits, value = model(batch.obs)
    log_prob = torch.log_softmax(logits, -1)[torch.arange(4), batch.action]
    expected = -(log_prob * (batch.reward_to_go - value.detach())).mean()
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    ("env", "keys"),
    [
        ({"id": "CartPole-v1"}, {"val/return", "val/return_ci95"}),
        ({"id": "Pendulum-v1", "max_episode_steps": 20}, {"val/return", "val/return_ci95"}),
        (
            {"id": "metalab/BitFlip-v0", "n": 3, "max_episode_steps": None},
            {"val/return", "val/return_ci95", "val/success", "val/success_ci95"},
        ),
    ],
)
def test_tiny_runs(env: dict, keys: set[str], tmp_path: Path) -> None:
    learner = make(tiny(env=env))
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    result = fit(learner, tiny(env=env).train, tmp_path)
    assert set(result.metrics) == keys
    assert any(not torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
    assert ("log_std" in before) == (env["id"] == "Pendulum-v1")


def test_resume_is_exact(tmp_path: Path) -> None:
    run = tiny()
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    reference = make(run)
    fit(reference, run.train, tmp_path / "ref")
    interrupted = make(run)
    inner = interrupted.loss

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(step)

    interrupted.loss = loss
    assert fit(interrupted, run.train, tmp_path / "run").step == 3
    resumed = make(run)
    seed_everything(99)
    fit(resumed, run.train, tmp_path / "run", resume=True)
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_rejects_bad_config_and_unsupported_spaces() -> None:
    with pytest.raises(ConfigError, match=r"reinforce.episodes"):
        tiny(reinforce={"episodes": 0})
    with pytest.raises(ConfigError, match=r"'env.id'.*observations must be"):
        make(tiny(env={"id": "Blackjack-v1"}))


@pytest.mark.slow
def test_reinforce_learns_cartpole(tmp_path: Path) -> None:
    """40 updates of 8 episodes: the greedy policy balances the pole for >= 475 of 500 steps on average."""
    run = load_run_config(REPO / "configs" / "reinforce_cartpole.yaml",
                          ["train.steps=40", "train.eval_every=40", "train.device=cpu"])  # fmt: skip
    learner = make(run)
    fit(learner, run.train, tmp_path)
    metrics = learner.evaluate("test", 50)
    print(f"measured: reinforce cartpole return {metrics['test/return']:.1f}")
    assert metrics["test/return"] >= 475, metrics  # measured 500 (the maximum) at seed 0
