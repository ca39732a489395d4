"""PEARL and SAC: posterior and KL against closed forms and torch.distributions, the tanh-Gaussian density,
where each loss's gradients go, exact resume, a CLI smoke run, and learning the sparse point robot (slow)."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution, kl_divergence
from torch.distributions.transforms import TanhTransform

from metalab.cli import main
from metalab.config import merge
from metalab.envs import EnvConfig, make_env
from metalab.envs.config import make_vector_env
from metalab.errors import ConfigError
from metalab.experiment import RunConfig, load_run_config, run_config_from_dict
from metalab.rl import pearl, sac
from metalab.rl.rollout import derive_seed
from metalab.train.checkpoint import load_checkpoint
from metalab.train.logger import read_metrics
from metalab.train.loop import CHECKPOINT, Learner, fit
from metalab.utils import seed_everything

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pearl_point_robot.yaml"

# Tiny networks and buffers (50 rows per task: they wrap), a collection round every 5 steps on 2 tasks with all
# three phases, and a learned temperature: every moving part, in well under a second per run.
TINY: dict[str, Any] = {
    "algo": "pearl",
    "seed": 0,
    "env": {"id": "metalab/PointRobotSparse-v0"},
    "train": {"steps": 12, "meta_batch": 4, "lr": 0.001, "log_every": 1, "eval_every": 6, "checkpoint_every": 3,
              "eval_episodes": 4, "device": "cpu"},
    "eval": {"episodes": 4, "batch": 2},
    "pearl": {"latent_dim": 2, "encoder_hidden": [8], "context_batch": 8, "batch_size": 8, "buffer_size": 50,
              "initial_steps": 20, "collect_every": 5, "tasks_per_collect": 2, "prior_steps": 20,
              "posterior_steps": 20, "extra_posterior_steps": 20, "rl_reward": "dense_reward",
              "sac": {"hidden": [8], "auto_alpha": True, "policy_reg": 0.001}},
}  # fmt: skip


def tiny(**sections: Any) -> RunConfig:
    return run_config_from_dict(merge(copy.deepcopy(TINY), sections))


def make(run: RunConfig) -> Learner:
    seed_everything(run.seed)
    return pearl.build(run, Path("unused"), torch.device("cpu"))


# --- task inference ---------------------------------------------------------------------------------------


def test_product_of_gaussians_is_the_closed_form() -> None:
    torch.manual_seed(0)
    mu, var = torch.randn(3, 7, 4), torch.rand(3, 7, 4) + 0.1  # (tasks, factors, latent)
    post_mu, post_var = pearl.product_of_gaussians(mu, var)
    assert post_mu.shape == post_var.shape == (3, 4)
    # Precisions add; the mean is the precision-weighted mean of the factors' means.
    assert torch.allclose(1 / post_var, (1 / var).sum(1))
    assert torch.allclose(post_mu, (mu / var).sum(1) / (1 / var).sum(1))
    # The normalised product of densities, evaluated pointwise: log N(x; post) - sum_n log N(x; factor n)
    # is the same constant (the normaliser) for every x.
    x = torch.randn(5, 1, 4)  # (points, 1, latent)
    gap = Normal(post_mu[0], post_var[0].sqrt()).log_prob(x[:, 0]) - Normal(mu[0], var[0].sqrt()).log_prob(
        x
    ).sum(1)
    assert torch.allclose(gap, gap[:1].expand_as(gap), atol=1e-4)
    # One transition: the posterior is its own factor.
    one_mu, one_var = pearl.product_of_gaussians(mu[:, :1], var[:, :1])
    assert torch.allclose(one_mu, mu[:, 0]) and torch.allclose(one_var, var[:, 0])
    # Two identical factors: same mean, half the variance.
    two_mu, two_var = pearl.product_of_gaussians(mu[:, :1].repeat(1, 2, 1), var[:, :1].repeat(1, 2, 1))
    assert torch.allclose(two_mu, mu[:, 0]) and torch.allclose(two_var, var[:, 0] / 2)


def test_posterior_is_permutation_invariant_and_floors_variances() -> None:
    torch.manual_seed(1)
    encoder = dict(pearl.MLP(5, (8,), 6).named_parameters())
    context = torch.randn(2, 9, 5)
    mu, var = pearl.posterior(encoder, context, 3)
    mu_p, var_p = pearl.posterior(encoder, context[:, torch.randperm(9)], 3)
    assert torch.allclose(mu, mu_p, atol=1e-6) and torch.allclose(var, var_p, atol=1e-6)
    _, tiny_var = pearl.product_of_gaussians(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1))
    assert torch.allclose(tiny_var, torch.tensor([[pearl.MIN_VARIANCE / 2]]))


def test_kl_to_standard_normal_matches_torch_distributions() -> None:
    torch.manual_seed(0)
    mu, var = torch.randn(6, 5), torch.rand(6, 5) * 3 + 0.01
    expected = kl_divergence(Normal(mu, var.sqrt()), Normal(torch.zeros(5), torch.ones(5))).sum(-1)
    assert torch.allclose(pearl.kl_to_standard_normal(mu, var), expected, atol=1e-5)
    assert pearl.kl_to_standard_normal(torch.zeros(2, 5), torch.ones(2, 5)).abs().max() == 0


# --- SAC pieces -------------------------------------------------------------------------------------------


def test_tanh_gaussian_log_prob_is_the_change_of_variables() -> None:
    torch.manual_seed(0)  # float64: TransformedDistribution inverts tanh, which float32 cannot near +-1
    mean, log_std = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64) * 0.5
    noise = torch.randn(64, 3, dtype=torch.float64)
    action, log_prob = sac.tanh_gaussian_sample(mean, log_std, noise)
    pre_tanh = mean + log_std.exp() * noise
    assert torch.equal(action, torch.tanh(pre_tanh)) and log_prob.shape == (64,)
    squashed = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    assert torch.allclose(log_prob, squashed.log_prob(action).sum(-1), atol=1e-6)
    # By hand: log N(u) - log |d tanh(u) / du| with the derivative 1 - tanh(u)^2.
    by_hand = (Normal(mean, log_std.exp()).log_prob(pre_tanh) - torch.log(1 - torch.tanh(pre_tanh) ** 2)).sum(
        -1
    )
    assert torch.allclose(log_prob, by_hand, atol=1e-6)
    # Far in the tails, where tanh rounds to 1 and the naive form is infinite, it stays finite.
    far = sac.tanh_gaussian_log_prob(torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), 30.0))
    assert torch.isfinite(far).all()


def test_polyak_update_and_soft_target_by_hand() -> None:
    target = {"q1.w": torch.tensor([1.0, 2.0])}
    online = {"q1.w": torch.tensor([3.0, -2.0], requires_grad=True)}
    out = sac.polyak_update(target, online, 0.005)
    assert torch.allclose(out["q1.w"], 0.995 * target["q1.w"] + 0.005 * online["q1.w"].detach())
    assert not out["q1.w"].requires_grad
    y = sac.soft_target(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 5.0]),
                        torch.tensor([3.0, 5.0]), torch.tensor([-1.0, 0.0]), gamma=0.9, alpha=0.5,
                        reward_scale=10.0)  # fmt: skip
    assert y.tolist() == pytest.approx(
        [10 + 0.9 * (2.0 + 0.5), 10.0]
    )  # min of the critics; no bootstrap if done


def _losses(
    kl_lambda: float = 1.0, auto_alpha: bool = True
) -> tuple[pearl.PEARLNets, sac.Losses, torch.Tensor]:
    torch.manual_seed(0)
    cfg = pearl.Config(latent_dim=3, encoder_hidden=(8,), sac=sac.Config(hidden=(8,), auto_alpha=auto_alpha),
                       kl_lambda=kl_lambda)  # fmt: skip
    nets = pearl.PEARLNets(obs_dim=2, act_dim=2, context_dim=5, cfg=cfg)
    target = {k: v.detach() + 0.01 for k, v in nets.agent.critic_params().items()}
    tasks, rows = 3, 6
    batch = pearl.TaskBatch(torch.randn(tasks, rows, 2), torch.rand(tasks, rows, 2) * 2 - 1,
                            torch.randn(tasks, rows), torch.randn(tasks, rows, 2), torch.zeros(tasks, rows))  # fmt: skip
    losses, kl, _ = pearl.pearl_losses(dict(nets.named_parameters()), target, torch.randn(tasks, 10, 5), batch,
                                       cfg, act_dim=2)  # fmt: skip
    return nets, losses, kl


def _grads(loss: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True))


def _reaches(grads: list[torch.Tensor | None]) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_each_loss_reaches_only_its_own_parameters() -> None:
    nets, losses, kl = _losses()
    agent = nets.agent
    # The critic loss trains the critics and the encoder (through z), not the actor or the temperature.
    assert _reaches(_grads(losses.critic, nets.encoder))
    assert _reaches(_grads(losses.critic, agent.q1)) and _reaches(_grads(losses.critic, agent.q2))
    assert not _reaches(_grads(losses.critic, agent.policy))
    assert (
        torch.autograd.grad(losses.critic, agent.log_alpha, retain_graph=True, allow_unused=True)[0] is None
    )
    # The actor loss trains only the policy: critics and encoder are left alone (z and Q are detached).
    assert _reaches(_grads(losses.actor, agent.policy))
    for module in (nets.encoder, agent.q1, agent.q2):
        assert not _reaches(_grads(losses.actor, module))
    assert torch.autograd.grad(losses.actor, agent.log_alpha, retain_graph=True, allow_unused=True)[0] is None
    # The temperature loss trains only log alpha; the KL only the encoder.
    for module in (nets.encoder, agent.policy, agent.q1, agent.q2):
        assert not _reaches(_grads(losses.temperature, module))
    assert torch.autograd.grad(losses.temperature, agent.log_alpha, retain_graph=True)[0] != 0
    assert _reaches(_grads(kl, nets.encoder))
    for module in (agent.policy, agent.q1, agent.q2):
        assert not _reaches(_grads(kl, module))


def test_fixed_temperature_has_no_temperature_loss() -> None:
    _, losses, _ = _losses(auto_alpha=False)
    assert losses.temperature.item() == 0 and not losses.temperature.requires_grad


# --- episodes and evaluation ------------------------------------------------------------------------------


def position_policy(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
    """A fixed policy of the position, in [-1, 1]."""
    return np.tanh(np.stack([np.cos(3 * obs[:, 1] + 1), np.sin(5 * obs[:, 0] + 2)], -1)).astype(np.float32)


def test_lockstep_episodes_equal_one_at_a_time() -> None:
    tasks, seeds = [0, 5, 17, 80], [derive_seed(3, i) for i in range(4)]
    envs = [make_env(EnvConfig(id="metalab/PointRobotSparse-v0")) for _ in range(4)]
    batched = pearl.run_tasks(envs, tasks, seeds, position_policy, "dense_reward")
    for i, task in enumerate(tasks):
        (single,) = pearl.run_tasks(envs[:1], [task], [seeds[i]], position_policy, "dense_reward")
        assert all(
            np.array_equal(x, y) for x, y in zip(single.experience, batched[i].experience, strict=True)
        )
        assert np.array_equal(single.info, batched[i].info)
    ep = batched[0].experience
    assert ep.rows == 20 and not ep.terminated.any() and np.abs(ep.action).max() <= 1
    assert np.allclose(ep.next_obs - ep.obs, ep.action * 0.1, atol=1e-6)  # [-1, 1] actions drive a 0.1 box
    critic = pearl.critic_reward(batched[0])
    assert (critic < 0).all() and batched[0].ret == ep.reward.sum()  # dense for the critic only
    assert (ep.reward >= 0).all() and not np.array_equal(critic, ep.reward)


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_vector_env_runs_the_same_task_episodes(vector: str) -> None:
    """Through a gymnasium vector env of 3 (each env reset on its own task), 5 episodes on 5 tasks: the loop's
    transitions, critic rewards and successes."""
    cfg = EnvConfig(id="metalab/PointRobotSparse-v0", vector=vector)  # type: ignore[arg-type]
    tasks, seeds = [3, 0, 41, 17, 80], [derive_seed(5, i) for i in range(5)]
    looped = pearl.run_tasks([make_env(cfg) for _ in range(3)], tasks, seeds, position_policy, "dense_reward")
    venv = make_vector_env(cfg, 3)
    try:
        vectored = pearl.run_tasks(venv, tasks, seeds, position_policy, "dense_reward")
    finally:
        venv.close()
    for a, b in zip(looped, vectored, strict=True):
        assert a.ret == b.ret and a.success == b.success and np.array_equal(a.info, b.info)
        assert all(np.array_equal(x, y) for x, y in zip(a.experience, b.experience, strict=True))
    # different tasks really were run: the same path (a policy of the position) earns a different dense reward
    assert len({float(pearl.critic_reward(r).sum()) for r in looped}) == 5


def test_pearl_trains_the_same_with_a_vector_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """env.vector sync with 3 envs (the initial collection on 80 tasks takes 27 chunks) collects the episodes
    of 3 looped envs: the same weights after 12 steps (3 collection rounds)."""
    vector_calls = []
    real = pearl.run_vector_episodes
    monkeypatch.setattr(pearl, "run_vector_episodes", lambda *a: vector_calls.append(1) or real(*a))
    weights = {}
    for vector in ("loop", "sync"):
        run = tiny(env={"vector": vector, "num_envs": 3})
        learner = make(run)
        fit(learner, run.train, tmp_path / vector)
        assert bool(vector_calls) == (vector == "sync")  # collection went through the vector env
        weights[vector] = learner.model.state_dict()
    for k, v in weights["loop"].items():
        assert torch.equal(v, weights["sync"][k]), k


def test_training_step_and_evaluation_metrics() -> None:
    learner = make(tiny())
    loss, metrics = learner.loss(0)
    assert loss.requires_grad and math.isfinite(loss.item())
    assert metrics["train/env_steps"] == 80 * 20 + 2 * 3 * 20  # initial on every task, then 3 phases on 2
    assert {"loss/critic", "loss/actor", "loss/kl", "loss/alpha", "train/return_posterior",
            "train/success_extra"} <= set(metrics)  # fmt: skip
    torch_state = torch.get_rng_state()
    first = learner.evaluate("test", 4)
    assert torch.equal(torch_state, torch.get_rng_state())  # evaluation draws from its own generator
    assert first == learner.evaluate("test", 4)  # and is repeatable
    keys = {f"test/{m}_after{k}{ci}" for m in ("return", "success") for k in range(3) for ci in ("", "_ci95")}
    assert keys | {"test/return", "test/success", "test/return_ci95", "test/success_ci95"} == set(first)
    assert first["test/success"] == first["test/success_after2"]
    assert first["test/return_ci95"] == first["test/return_after2_ci95"]
    assert {k.replace("val/", "test/") for k in learner.evaluate("val", 3)} == set(first)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"pearl.sac.tau"):
        tiny(pearl={"sac": {"tau": 0.0}})
    with pytest.raises(ConfigError, match=r"pearl.posterior_steps"):
        tiny(pearl={"prior_steps": 0, "posterior_steps": 0})
    with pytest.raises(ConfigError, match=r"'env.id'.*Box"):
        make(tiny(env={"id": "CartPole-v1"}))
    with pytest.raises(ConfigError, match=r"'env.id'.*multi-task"):
        make(tiny(env={"id": "Pendulum-v1"}))
    with pytest.raises(ConfigError, match=r"'pearl.rl_reward'.*dense_reward"):
        make(tiny(pearl={"rl_reward": "shaped"})).loss(0)


# --- the trainer ------------------------------------------------------------------------------------------


def test_resume_is_exact(tmp_path: Path) -> None:
    """Ctrl-C after step 8 (between collection rounds, buffers wrapped), resume in a fresh learner: the same
    networks, targets, buffers, generator and logged metrics as a run that never stopped."""
    run = tiny()
    reference = make(run)
    fit(reference, run.train, tmp_path / "ref")

    interrupted = make(run)
    inner = interrupted.loss

    def loss(step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(step)

    interrupted.loss = loss
    result = fit(interrupted, run.train, tmp_path / "run")
    assert result.interrupted and result.step == 8
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)["learner"]
    assert max(b["size"] for b in saved["replay"]) == 50  # some task's replay buffer has wrapped

    resumed = make(run)
    seed_everything(123)  # the checkpoint's RNG state must win
    out = fit(resumed, run.train, tmp_path / "run", resume=True)
    assert (out.step, out.interrupted) == (12, False)
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    ref_state, res_state = reference.state(), resumed.state()
    for k, v in ref_state["target"].items():
        assert torch.equal(v, res_state["target"][k]), k
    for key in ("replay", "encoder_data"):
        for a, b in zip(ref_state[key], res_state[key], strict=True):
            assert (a["pos"], a["size"]) == (b["pos"], b["size"])
            assert all(torch.equal(v, b["columns"][c]) for c, v in a["columns"].items())
    assert ref_state["rng"] == res_state["rng"]
    assert (ref_state["episodes"], ref_state["env_steps"]) == (res_state["episodes"], res_state["env_steps"])

    def logged(run_dir: Path) -> list[tuple[int, str, float]]:
        return [r for r in read_metrics(run_dir / "metrics.csv") if not r[1].startswith("time/")]

    assert logged(tmp_path / "run") == logged(tmp_path / "ref")


TINY_CLI = ["train.steps=4", "train.meta_batch=2", "train.eval_every=4", "train.checkpoint_every=2",
            "train.eval_episodes=2", "eval.episodes=2", "eval.batch=2", "pearl.encoder_hidden=[8]",
            "pearl.sac.hidden=[8]", "pearl.context_batch=8", "pearl.batch_size=8", "pearl.initial_steps=20",
            "pearl.tasks_per_collect=1", "pearl.prior_steps=20", "pearl.posterior_steps=20", "pearl.buffer_size=100",
            "train.device=cpu"]  # fmt: skip


def test_cli_smoke_run_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", str(CONFIG), "--runs-dir", str(tmp_path)] + [f"--set={o}" for o in TINY_CLI]
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("pearl-pointrobotsparse-s0-")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 4 and 0 <= result["test/success_after2"] <= 1
    assert "test/success_after1" in capsys.readouterr().out
    assert main(["train", "--resume", str(run_dir), "--set", "train.steps=6"]) == 0
    assert json.loads((run_dir / "result.json").read_text())["step"] == 6
    assert main(["eval", str(run_dir), "--episodes", "3"]) == 0
    assert "test/return_after2" in capsys.readouterr().out


def test_point_robot_config_is_pearls() -> None:
    run = load_run_config(CONFIG)
    cfg = run.params
    assert (run.algo, run.env.id, run.train.meta_batch, run.train.lr) == ("pearl", "metalab/PointRobotSparse-v0",
                                                                          16, 3e-4)  # fmt: skip
    assert (cfg.latent_dim, cfg.kl_lambda, cfg.context_batch, cfg.rl_reward) == (5, 1.0, 1024, "dense_reward")
    assert (cfg.sac.gamma, cfg.sac.reward_scale, cfg.sac.auto_alpha, cfg.sac.hidden) == (0.9, 100.0, False,
                                                                                       (300, 300, 300))  # fmt: skip


# --- learning ---------------------------------------------------------------------------------------------


def random_policy(tasks: list[int], episodes: int = 5) -> tuple[float, float]:
    """Mean return and success of uniformly random actions on ``tasks``: the baseline PEARL must beat."""
    rng = np.random.default_rng(0)
    envs = [make_env(EnvConfig(id="metalab/PointRobotSparse-v0")) for _ in tasks]
    results = []
    for e in range(episodes):
        seeds = [derive_seed(e, i) for i in range(len(tasks))]
        results += pearl.run_tasks(envs, tasks, seeds,
                                   lambda obs, goal, live: rng.uniform(-1, 1, (len(live), 2)).astype(np.float32))  # fmt: skip
    return float(np.mean([r.ret for r in results])), float(np.mean([r.success for r in results]))


@pytest.mark.slow
def test_pearl_learns_the_sparse_point_robot(tmp_path: Path) -> None:
    """PEARL with small networks, 20k gradient steps (about 4 minutes on one busy CPU core): on held-out goals
    its third episode (z from the posterior of the first two) earns sparse reward and ends in the goal disk where
    a random policy never does (the goals are 1 away, the disk has radius 0.2), and far more than its first."""
    overrides = ["train.steps=20000", "train.eval_every=20000", "train.checkpoint_every=20000", "train.device=cpu",
                 "pearl.eval_adapt_episodes=2"]  # fmt: skip
    run = load_run_config(CONFIG.with_name("pearl_point_robot_small.yaml"), overrides)
    learner = make(run)
    fit(learner, run.train, tmp_path)
    metrics = learner.evaluate("test", 100)
    random_return, random_success = random_policy(list(range(80, 100)))
    print(
        f"measured: pearl return_after0 {metrics['test/return_after0']:.3f} after2 "
        f"{metrics['test/return_after2']:.3f} success_after2 {metrics['test/success_after2']:.3f}"
    )
    assert random_return == 0 and random_success == 0
    # measured at seed 0: return 0.512 -> 0.991, success 0.11 after two episodes
    assert metrics["test/return_after2"] >= 0.85 and metrics["test/success_after2"] >= 0.08, metrics
    assert metrics["test/return_after2"] >= metrics["test/return_after0"] + 0.3, metrics
