"""MAML-RL and MAML's 2D navigation: the inner policy gradient against the exact gradient of a tabular MDP, the
baseline and log-density against closed forms, the meta-gradient through the inner step (second order, first
order, ProMP's LVC term, finite differences), the env, reproducibility and exact resume, config errors, a CLI
smoke run, and learning to adapt on held-out goals (slow)."""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torch.distributions import Independent, Normal
from torch.func import functional_call, vmap

from metalab.cli import main
from metalab.config import merge
from metalab.envs import HALF_CHEETAH_DIR_ID, EnvConfig, make_env
from metalab.envs.navigation import GOALS, HORIZON, NAVIGATION_2D_ID, Navigation2D, tasks
from metalab.errors import ConfigError
from metalab.experiment import RunConfig, load_run_config, run_config_from_dict
from metalab.meta.adapt import hvp
from metalab.rl import maml_rl
from metalab.rl import policy_gradient as pg
from metalab.rl.sac import sub_params
from metalab.train.checkpoint import load_checkpoint
from metalab.train.logger import read_metrics
from metalab.train.loop import Learner, fit
from metalab.utils import seed_everything

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "maml_rl_navigation.yaml"

# 3 tasks x 2 episodes of 100 steps, an 8-unit policy, 2 evaluation trials of 2 inner steps: every moving part
# in about a second per run.
TINY: dict[str, Any] = {
    "algo": "maml_rl",
    "seed": 0,
    "env": {"id": NAVIGATION_2D_ID},
    "train": {"steps": 6, "meta_batch": 3, "lr": 0.01, "log_every": 1, "eval_every": 3, "checkpoint_every": 2,
              "eval_episodes": 2, "device": "cpu"},
    "eval": {"episodes": 2, "batch": 2},
    "maml_rl": {"trajectories": 2, "hidden": [8], "eval_inner_steps": 2},
}  # fmt: skip


def tiny(**sections: Any) -> RunConfig:
    return run_config_from_dict(merge(copy.deepcopy(TINY), sections))


def make(run: RunConfig) -> Learner:
    seed_everything(run.seed)
    return maml_rl.build(run, Path("unused"), torch.device("cpu"))


# --- the inner policy gradient on a tabular MDP -----------------------------------------------------------------

# Two states, two actions, 3 steps from state 0; the action is the next state; rewards r[s, a].
REWARD = torch.tensor([[1.0, -0.5], [0.2, 2.0]], dtype=torch.float64)
STEPS = 3


def tabular_paths(actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States ``(K, H)`` visited and rewards ``(K, H)`` earned by action sequences ``(K, H)``."""
    states = torch.cat([torch.zeros(len(actions), 1, dtype=torch.long), actions[:, :-1]], 1)
    return states, REWARD[states, actions]


def tabular_log_prob(logits: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1)[states, actions]  # (K, H)


def expected_return(logits: torch.Tensor) -> torch.Tensor:
    """``J = sum_tau p(tau) R(tau)`` over all 2^3 action sequences: exact."""
    actions = torch.tensor(list(itertools.product([0, 1], repeat=STEPS)))
    states, rewards = tabular_paths(actions)
    return (tabular_log_prob(logits, states, actions).sum(1).exp() * rewards.sum(1)).sum()


def estimated_gradient(logits: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The inner step's estimate of ``grad J`` from episodes ``(K, H)`` with ``maml_rl``'s advantages (discounted
    rewards-to-go with gamma 1 minus the linear feature baseline of one-hot states) and surrogate, each episode's
    advantages scaled by ``K * weights`` (``weights`` 1/K: the plain estimate)."""
    states, rewards = tabular_paths(actions)
    k = len(actions)
    mask = torch.ones(1, k, STEPS, dtype=torch.float64)
    rollouts = pg.Rollouts(torch.nn.functional.one_hot(states, 2).double()[None], actions[None, ..., None],
                           rewards[None], mask, np.zeros((1, k)), None)  # fmt: skip
    adv = pg.advantages(rollouts, gamma=1.0, reg=1e-5, normalize=False)[0] * (k * weights[:, None])  # (K, H)
    params = logits.clone().requires_grad_(True)
    logp = tabular_log_prob(params, states, actions)
    surrogate = pg.pg_surrogate(logp.flatten(), adv.flatten(), mask.flatten(), logp.detach().flatten(), False)
    # the surrogate is a mean over K * H steps; times H, the mean over episodes of sum_t grad log pi_t A_t
    return -torch.autograd.grad(surrogate, params)[0] * STEPS


def test_inner_policy_gradient_is_the_exact_gradient_in_expectation() -> None:
    """Weighting each of the 8 possible episodes by its probability, the estimator's expectation equals the exact
    gradient of the enumerated expected return (to float64 precision): the baseline, a fitted function of state
    and time, adds no bias."""
    logits = torch.tensor([[0.3, -0.2], [-0.4, 0.5]], dtype=torch.float64)
    exact = torch.func.grad(expected_return)(logits)
    actions = torch.tensor(list(itertools.product([0, 1], repeat=STEPS)))
    states, _ = tabular_paths(actions)
    probs = tabular_log_prob(logits, states, actions).sum(1).exp()
    expectation = estimated_gradient(logits, actions, probs)
    assert exact.abs().max() > 0.1  # a gradient worth matching
    torch.testing.assert_close(expectation, exact, rtol=1e-9, atol=1e-9)


def test_inner_policy_gradient_estimate_from_sampled_episodes() -> None:
    """From 20000 sampled episodes (the baseline fitted on them), the estimate is within 0.02 of the exact
    gradient in every coordinate (its entries are 0.15-0.6; the standard error is about 0.005)."""
    logits = torch.tensor([[0.3, -0.2], [-0.4, 0.5]], dtype=torch.float64)
    exact = torch.func.grad(expected_return)(logits)
    gen = torch.Generator().manual_seed(0)
    k = 20_000
    actions = torch.zeros(k, STEPS, dtype=torch.long)
    state = torch.zeros(k, dtype=torch.long)
    for t in range(STEPS):
        actions[:, t] = torch.multinomial(torch.softmax(logits, -1)[state], 1, generator=gen)[:, 0]
        state = actions[:, t]
    estimate = estimated_gradient(logits, actions, torch.full((k,), 1.0 / k, dtype=torch.float64))
    assert (estimate - exact).abs().max() < 0.02, (estimate, exact)


# --- pieces against closed forms --------------------------------------------------------------------------------


def test_log_prob_is_the_diagonal_gaussian() -> None:
    torch.manual_seed(0)
    policy = pg.GaussianPolicy(obs_dim=2, hidden=(5,), act_dim=3, init_log_std=-0.3)
    params = dict(policy.named_parameters())
    obs, action = torch.randn(7, 2), torch.randn(7, 3)
    expected = Independent(Normal(policy.mean(obs), params["log_std"].exp()), 1).log_prob(action)
    torch.testing.assert_close(pg.log_prob(params, obs, action), expected)


def test_discounted_returns_and_baseline_fit() -> None:
    reward = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    torch.testing.assert_close(pg.discounted_returns(reward, 0.5),
                               torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]]))  # fmt: skip
    obs = torch.randn(2, 4, 3)  # (K, H, obs_dim)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    features = pg.baseline_features(obs, mask)
    assert features.shape == (2, 4, 3 + 3 + 4) and (features[1, 2:] == 0).all()
    torch.testing.assert_close(
        features[0, 3, 6:], torch.tensor([0.03, 0.03**2, 0.03**3, 1.0])
    )  # t = step / 100
    x, y = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    expected = np.linalg.solve(x.T.numpy() @ x.numpy() + 1e-5 * np.eye(6), x.T.numpy() @ y.numpy())
    np.testing.assert_allclose(pg.fit_linear_baseline(x, y, 1e-5).numpy(), expected, rtol=1e-8)


def test_normalized_advantages_are_standardized_per_task_and_zero_on_padding() -> None:
    torch.manual_seed(0)
    mask = torch.ones(2, 3, 5)
    mask[0, 1, 3:] = 0
    rollouts = pg.Rollouts(torch.randn(2, 3, 5, 2), torch.randn(2, 3, 5, 2), torch.randn(2, 3, 5) * mask, mask,
                           np.zeros((2, 3)), None)  # fmt: skip
    adv = pg.advantages(rollouts, 0.99, 1e-5, normalize=True)
    assert (adv[mask == 0] == 0).all()
    for t in range(2):
        valid = adv[t][mask[t] == 1]
        assert abs(valid.mean().item()) < 1e-5 and abs(valid.std(unbiased=False).item() - 1) < 1e-4


# --- the meta-gradient through the inner step -------------------------------------------------------------------


def meta_problem(
    seed: int = 0, hidden: tuple[int, ...] = (6,)
) -> tuple[pg.GaussianPolicy, pg.Batch, pg.Batch]:
    """A float64 policy and fixed pre- and post-update batches of 2 tasks (random data: the meta-gradient is a
    function of them alone)."""
    torch.manual_seed(seed)
    policy = pg.GaussianPolicy(obs_dim=2, hidden=hidden, act_dim=2, init_log_std=-0.2).double()
    params = pg.expand(dict(policy.named_parameters()), 2)

    def batch(p: dict[str, torch.Tensor]) -> pg.Batch:
        obs, action = torch.randn(2, 9, 2, dtype=torch.float64), torch.randn(2, 9, 2, dtype=torch.float64)
        mask = torch.ones(2, 9, dtype=torch.float64)
        mask[1, 7:] = 0
        with torch.no_grad():
            old = vmap(pg.log_prob)(p, obs, action)  # the parameters that "sampled" them
        return pg.Batch(obs, action, torch.randn(2, 9, dtype=torch.float64) * mask, mask, old)

    pre = batch(params)
    with torch.no_grad():
        adapted = pg.inner_steps(params, pre, 0.3, "maml")
    return policy, pre, batch(adapted)


def meta_gradient(policy: torch.nn.Module, pre: pg.Batch, post: pg.Batch, **kw: Any) -> dict:
    params = dict(policy.named_parameters())
    adapted = pg.inner_steps(pg.expand(params, 2), pre, 0.3, **{"objective": "maml", **kw})
    return dict(zip(params, torch.autograd.grad(pg.outer_loss(adapted, post), list(params.values())),
                    strict=True))  # fmt: skip


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def test_meta_gradient_matches_finite_differences_and_holds_the_second_order_term() -> None:
    policy, pre, post = meta_problem()
    params = {k: v.detach() for k, v in policy.named_parameters()}
    full, first = (
        flat(meta_gradient(policy, pre, post)),
        flat(meta_gradient(policy, pre, post, first_order=True)),
    )

    def objective(p: dict[str, torch.Tensor]) -> float:
        adapted = pg.inner_steps(pg.expand(p, 2), pre, 0.3, "maml")
        return pg.outer_loss(adapted, post).item()

    torch.manual_seed(1)
    for _ in range(3):  # directional derivatives along random directions, central differences in float64
        direction = {k: torch.randn_like(v) for k, v in params.items()}
        eps = 1e-5
        fd = (objective({k: v + eps * direction[k] for k, v in params.items()})
              - objective({k: v - eps * direction[k] for k, v in params.items()})) / (2 * eps)  # fmt: skip
        assert fd == pytest.approx(float(full @ flat(direction)), rel=1e-6, abs=1e-9)
        assert abs(fd - float(first @ flat(direction))) > 1e-4  # the first-order gradient misses a real term

    # First order: exactly the outer gradient at the adapted parameters, summed over tasks.
    adapted = {k: v.detach().requires_grad_(True) for k, v in
               pg.inner_steps(pg.expand(params, 2), pre, 0.3, "maml").items()}  # fmt: skip
    at_adapted = torch.autograd.grad(pg.outer_loss(adapted, post), list(adapted.values()))
    torch.testing.assert_close(first, torch.cat([g.sum(0).flatten() for g in at_adapted]))
    # Second order: full = first - lr * sum_i H_i g_i, H_i the Hessian of task i's inner surrogate.
    second = torch.zeros_like(full)
    for i in range(2):
        g = {k: v[i] for k, v in zip(adapted, at_adapted, strict=True)}
        task = [x[i] for x in pre]

        def inner(p: dict[str, torch.Tensor], *data: torch.Tensor) -> torch.Tensor:
            return pg.policy_surrogate(p, *data, ratio=False)

        second -= 0.3 * flat(hvp(inner, params, g, *task))
    assert second.abs().max() > 1e-3
    torch.testing.assert_close(full, first + second)


def test_promp_adds_the_lvc_term_to_the_curvature_only() -> None:
    """ProMP's LVC: the same inner step (same gradient), and a meta-gradient that differs from MAML's by
    ``lr * sum_i mean_n A_n (grad log pi_n . g_i) grad log pi_n`` (the ratio's Hessian term)."""
    policy, pre, post = meta_problem(seed=2)
    params = {k: v.detach() for k, v in policy.named_parameters()}
    expanded = pg.expand(params, 2)
    for k, v in pg.inner_steps(expanded, pre, 0.3, "promp").items():
        torch.testing.assert_close(v, pg.inner_steps(expanded, pre, 0.3, "maml")[k])
    maml, promp = (
        flat(meta_gradient(policy, pre, post)),
        flat(meta_gradient(policy, pre, post, objective="promp")),
    )
    adapted = {k: v.detach().requires_grad_(True)
               for k, v in pg.inner_steps(expanded, pre, 0.3, "maml").items()}  # fmt: skip
    at_adapted = torch.autograd.grad(pg.outer_loss(adapted, post), list(adapted.values()))
    lvc = torch.zeros_like(maml)
    for i in range(2):
        g = torch.cat([v[i].flatten() for v in at_adapted])
        jac = torch.func.jacrev(lambda p: pg.log_prob(p, pre.obs[i], pre.action[i]))(params)  # noqa: B023
        jac = torch.cat([j.flatten(1) for j in jac.values()], 1)  # (N, P) grad log pi per step
        weights = pre.advantage[i] * pre.mask[i] / pre.mask[i].sum()
        lvc += 0.3 * jac.T @ (weights * (jac @ g))
    assert lvc.abs().max() > 1e-3
    torch.testing.assert_close(promp, maml + lvc)


# --- the env ----------------------------------------------------------------------------------------------------


def test_env_passes_the_gymnasium_checker_and_is_registered() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(NAVIGATION_2D_ID).unwrapped)
    env = make_env(EnvConfig(id=NAVIGATION_2D_ID))
    assert env.action_space == gym.spaces.Box(-0.1, 0.1, (2,), np.float32)
    assert EnvConfig(id=NAVIGATION_2D_ID).name == "navigation2d"


def test_goals_are_in_the_square_and_splits_are_disjoint() -> None:
    assert GOALS.shape == (1200, 2) and np.abs(GOALS).max() <= 0.5 and np.abs(GOALS).max() > 0.49
    train, val, test = tasks("train"), tasks("val"), tasks("test")
    assert (len(train), len(val), len(test)) == (1000, 100, 100)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert len({tuple(g) for g in GOALS}) == 1200  # no goal is shared between splits either
    assert Navigation2D.tasks("val") == val
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        tasks("eval")  # type: ignore[arg-type]


def test_reward_is_minus_the_distance_actions_are_clipped_and_the_horizon_is_100() -> None:
    env = Navigation2D()
    obs, info = env.reset(seed=0, options={"task": 1100})
    assert info["task"] == 1100 and np.array_equal(obs, np.zeros(2, np.float32))
    goal = env.goal
    away = -np.sign(goal).astype(np.float32)  # 10x the largest action, away from the goal
    for t in range(HORIZON):
        obs, reward, terminated, truncated, info = env.step(away)
        np.testing.assert_allclose(obs, 0.1 * (t + 1) * -np.sign(goal), atol=1e-5)  # clipped to 0.1 a step
        assert reward == pytest.approx(-np.linalg.norm(env.position - goal)) == -info["distance"]
        assert not terminated and truncated == (t == HORIZON - 1)
    assert env.observation_space.contains(obs)
    with pytest.raises(ValueError, match="2 finite numbers"):
        env.step(np.array([np.nan, 0.0]))
    env.reset(options={"split": "test"})
    assert env.task in tasks("test")


def test_episode_terminates_at_the_goal() -> None:
    env = Navigation2D()
    env.reset(options={"task": 7})
    goal, steps = env.goal, int(np.ceil(np.abs(env.goal).max() / 0.1))
    for t in range(steps):
        remaining = goal - env.position
        _, reward, terminated, _, info = env.step((remaining / (steps - t)).astype(np.float32))
    assert terminated and info["distance"] < 1e-6 and reward == pytest.approx(0.0, abs=1e-6)


# --- training, evaluation, reproducibility ---------------------------------------------------------------------


def test_training_step_and_evaluation_metrics() -> None:
    learner = make(tiny())
    loss, metrics = learner.loss(0)
    assert loss.requires_grad and np.isfinite(loss.item())
    assert metrics["train/env_steps"] == 2 * 3 * 2 * 100  # pre- and post-update episodes, none reached a goal
    assert {"train/return_after0", "train/return_after1", "train/distance_after1", "loss/outer"} <= set(
        metrics
    )
    torch_state = torch.get_rng_state()
    first = learner.evaluate("test", 3)
    assert torch.equal(torch_state, torch.get_rng_state())  # evaluation draws from its own generator
    assert first == learner.evaluate("test", 3)  # and is repeatable
    keys = {
        f"test/{m}_after{k}{ci}" for m in ("return", "distance") for k in range(3) for ci in ("", "_ci95")
    }
    assert keys | {"test/return", "test/return_ci95", "test/distance", "test/distance_ci95"} == set(first)
    assert first["test/return"] == first["test/return_after1"]
    assert first["test/distance_after0"] > 0 and first["test/return_after0"] < 0
    assert {k.replace("val/", "test/") for k in learner.evaluate("val", 2)} == set(first)


def test_two_inner_steps_sample_at_each_adapted_parameters() -> None:
    learner = make(tiny(maml_rl={"inner_steps": 2, "first_order": True}))
    loss, metrics = learner.loss(0)
    loss.backward()
    assert metrics["train/env_steps"] == 3 * 3 * 2 * 100  # before, after one step, after two
    assert {"train/return_after2", "train/distance_after2"} <= set(metrics)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.model.parameters())


def test_a_family_of_two_tasks_is_also_evaluated_per_task() -> None:
    pytest.importorskip("mujoco")
    learner = make(tiny(env={"id": HALF_CHEETAH_DIR_ID, "max_episode_steps": 5}, train={"meta_batch": 2},
                        maml_rl={"final_info": "x_position"}))  # fmt: skip
    out = learner.evaluate("test", 4)  # trials alternate forward (task 0) and backward (task 1)
    for k in range(3):
        for name in ("return", "x_position"):
            per_task = [out[f"test/task{t}/{name}_after{k}"] for t in (0, 1)]
            assert np.mean(per_task) == pytest.approx(out[f"test/{name}_after{k}"])
    assert out["test/task0/return"] == out["test/task0/return_after1"]
    assert "val/task0/return" not in out and not any("task" in key for key in make(tiny()).evaluate("val", 2))


def test_no_inner_step_is_the_pretrained_baseline_a_plain_policy_gradient() -> None:
    run = tiny(maml_rl={"inner_steps": 0})
    learner = make(run)
    state = torch.get_rng_state()
    loss, metrics = learner.loss(0)
    grads = torch.autograd.grad(loss, list(learner.model.parameters()))
    assert metrics["train/env_steps"] == 3 * 2 * 100 and "train/return_after1" not in metrics
    # the same episodes again, and REINFORCE's -mean(log pi * A) on them: the same gradient
    torch.set_rng_state(state)
    ml = learner.loss.args[0]
    train_tasks = Navigation2D.tasks("train")
    rng = np.random.default_rng(maml_rl.derive_seed(run.seed, 1, 0))
    tasks = [train_tasks[i] for i in rng.choice(len(train_tasks), 3, replace=False)]
    params = pg.expand(ml.params(), 3)
    rollouts = maml_rl.collect(
        ml, params, tasks, [maml_rl.derive_seed(run.seed, 0, 0, 0, i) for i in range(6)]
    )
    batch = maml_rl.to_batch(ml, rollouts, params)
    reinforce = vmap(partial(pg.policy_surrogate, ratio=False))(params, *batch).mean()
    expected = torch.autograd.grad(reinforce, list(learner.model.parameters()))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", ["maml", "promp"])
def test_seeded_run_is_bit_reproducible(tmp_path: Path, objective: str) -> None:
    weights, logs = [], []
    for i in range(2):
        run = tiny(train={"steps": 3, "eval_every": 3}, maml_rl={"objective": objective})
        learner = make(run)
        fit(learner, run.train, tmp_path / str(i))
        weights.append(learner.model.state_dict())
        logs.append(
            [r for r in read_metrics(tmp_path / str(i) / "metrics.csv") if not r[1].startswith("time/")]
        )
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k
    assert logs[0] == logs[1]


def test_trains_the_same_with_a_vector_env(tmp_path: Path) -> None:
    weights = {}
    for vector in ("loop", "sync"):
        run = tiny(env={"vector": vector, "num_envs": 4}, train={"steps": 2, "eval_every": 10})
        learner = make(run)
        fit(learner, run.train, tmp_path / vector)
        weights[vector] = learner.model.state_dict()
    for k, v in weights["loop"].items():
        assert torch.equal(v, weights["sync"][k]), k


@pytest.mark.parametrize("outer", ["adam", "trpo"])
def test_resume_is_exact(outer: str, tmp_path: Path) -> None:
    """Ctrl-C after step 4 (mid-run, after an evaluation), resume in a fresh learner: the same policy, env-step
    count and logged metrics as a run that never stopped. With ``outer: trpo`` the learner steps itself: every
    logged KL is within the bound and the trainer's Adam never stepped."""
    run = tiny(maml_rl={"outer": outer})
    reference = make(run)
    fit(reference, run.train, tmp_path / "ref")

    interrupted = make(run)
    inner = interrupted.loss

    def loss(step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(step)

    interrupted.loss = loss
    result = fit(interrupted, run.train, tmp_path / "run")
    assert result.interrupted and result.step == 4

    resumed = make(run)
    seed_everything(123)  # the checkpoint's RNG state must win
    out = fit(resumed, run.train, tmp_path / "run", resume=True)
    assert (out.step, out.interrupted) == (6, False)
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert not torch.equal(reference.model.state_dict()["log_std"], make(run).model.state_dict()["log_std"])
    assert reference.state() == resumed.state()

    def logged(run_dir: Path) -> list[tuple[int, str, float]]:
        return [r for r in read_metrics(run_dir / "metrics.csv") if not r[1].startswith("time/")]

    assert logged(tmp_path / "run") == logged(tmp_path / "ref")
    if outer == "trpo":
        kls = [value for _, name, value in logged(tmp_path / "ref") if name == "train/kl"]
        assert len(kls) == 6 and all(0 <= kl <= 0.01 for kl in kls) and max(kls) > 0
        ckpt = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
        assert ckpt["optimizer"]["state"] == {} and ckpt["scheduler"]["last_epoch"] == 0


def test_config_errors() -> None:
    for key, value in (("inner_lr", 0.0), ("trajectories", 0), ("inner_steps", -1), ("objective", "dice"), ("gamma", 1.5),
                       ("eval_inner_steps", -1), ("later_lr_scale", 0.0), ("hidden", [0])):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"maml_rl\.{key}"):
            tiny(maml_rl={key: value})
    with pytest.raises(ConfigError, match=r"'env.id'.*Box"):
        make(tiny(env={"id": "CartPole-v1"}))
    with pytest.raises(ConfigError, match=r"'env.id'.*multi-task"):
        make(tiny(env={"id": "Pendulum-v1"}))
    with pytest.raises(ConfigError, match=r"'train.meta_batch'.*1000 training tasks"):
        make(tiny(train={"meta_batch": 1001}))
    with pytest.raises(ConfigError, match=r"'maml_rl.final_info'.*distance"):
        make(tiny(maml_rl={"final_info": "dist"}))


def test_cli_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = ["train.steps=2", "train.meta_batch=2", "train.eval_every=2", "train.eval_episodes=2",
                 "eval.episodes=2", "eval.batch=2", "maml_rl.trajectories=2", "maml_rl.hidden=[8]",
                 "train.device=cpu"]  # fmt: skip
    assert main(["train", str(CONFIG), "--runs-dir", str(tmp_path)] + [f"--set={o}" for o in overrides]) == 0
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("maml_rl-navigation2d-s0-")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 2 and result["test/return_after3"] < 0 and result["test/distance_after3"] > 0
    assert "test/return_after1" in capsys.readouterr().out


def test_navigation_config_is_the_papers_where_stated() -> None:
    run = load_run_config(CONFIG)
    cfg = run.params
    assert (run.algo, run.env.id, run.train.meta_batch) == ("maml_rl", NAVIGATION_2D_ID, 20)
    paper = {"trajectories": 20, "inner_lr": 0.1, "inner_steps": 1, "hidden": (100, 100), "gamma": 0.99,
             "first_order": False, "objective": "maml", "eval_inner_steps": 3, "later_lr_scale": 0.5}  # fmt: skip
    assert {key: getattr(cfg, key) for key in paper} == paper


def test_learner_parameters_are_the_policy(tmp_path: Path) -> None:
    learner = make(tiny())
    names = [n for n, _ in learner.model.named_parameters()]
    assert names[0] == "log_std" and all(n.startswith("mean.") for n in names[1:])
    out = functional_call(learner.model.mean, sub_params(dict(learner.model.named_parameters()), "mean"),
                          (torch.zeros(1, 2),))  # fmt: skip
    assert out.shape == (1, 2)


# --- learning ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_maml_rl_learns_to_adapt_on_held_out_goals(tmp_path: Path) -> None:
    """100 meta-iterations of the navigation config (4-6 minutes on one CPU core beside a busy one): on 40 val
    goals, one inner step on 20 episodes raises the return by more than 10 over the unadapted policy's (measured:
    -41.4 to -18.2) and brings the final position much closer to the goal (0.41 to 0.16)."""
    overrides = [
        "train.steps=100",
        "train.eval_every=1000",
        "train.checkpoint_every=1000",
        "train.keep_best=null",
    ]
    run = load_run_config(CONFIG, overrides)
    learner = make(run)
    fit(learner, run.train, tmp_path)
    metrics = learner.evaluate("val", 40)
    print(
        f"measured: return_after0 {metrics['val/return_after0']:.2f} after1 {metrics['val/return_after1']:.2f}, "
        f"distance_after0 {metrics['val/distance_after0']:.3f} after1 {metrics['val/distance_after1']:.3f}"
    )
    assert metrics["val/return_after1"] >= metrics["val/return_after0"] + 10, metrics
    assert metrics["val/distance_after1"] <= 0.6 * metrics["val/distance_after0"], metrics
