"""REINFORCE (Williams, Machine Learning 1992) with reward-to-go and a learned state-value baseline.

The policy gradient ``E[sum_t grad log pi(a_t | s_t, g) (G_t - V(s_t, g))]`` uses the reward-to-go ``G_t``
(rewards before ``t`` cannot depend on ``a_t``) and subtracts a learned baseline ``V`` fitted to ``G_t`` by
squared error: both lower the variance without biasing the gradient. Actions are categorical for discrete
action spaces (CartPole) and Gaussian with a state-independent standard deviation for boxes (Pendulum); on
goal envs the policy also sees the desired goal. One trainer step collects ``episodes`` whole episodes and
makes one update of policy and baseline together (``train.lr`` is their Adam learning rate;
``train.meta_batch`` is unused).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal
from torch.func import functional_call

from metalab.config import require, require_between, require_widths
from metalab.envs.config import make_env, make_vector_env
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.models import MLP
from metalab.rl.rollout import Act, EpisodeResult, derive_seed, dims, run_episodes, run_vector_episodes
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.loop import Learner
from metalab.utils import Params


@dataclass(frozen=True)
class Config:
    """REINFORCE hyperparameters (the ``reinforce`` section of a config)."""

    episodes: int = 8
    """Episodes collected per trainer step; their transitions make one update."""
    gamma: float = 0.99
    """Discount factor of the reward-to-go."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the policy and of the baseline (two separate MLPs)."""
    value_coef: float = 0.5
    """Weight of the baseline's squared error in the loss."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (0: plain REINFORCE)."""
    normalize_advantages: bool = True
    """Standardise ``G_t - V`` over the batch (a per-batch step-size normalisation)."""
    init_log_std: float = 0.0
    """Continuous actions: initial log standard deviation of the Gaussian policy."""

    def __post_init__(self) -> None:
        require_between(self.episodes, "episodes", 1, 10_000)
        require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        require(self.value_coef >= 0, "value_coef", "must be >= 0")
        require(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        require_widths(self.hidden, "hidden")


class PolicyValue(nn.Module):
    """Policy MLP (action logits, or a Gaussian mean with a learned ``log_std``) and baseline MLP ``V``."""

    def __init__(
        self, in_features: int, hidden: tuple[int, ...], actions: int, continuous: bool, log_std: float
    ):
        super().__init__()
        self.policy = MLP(in_features, hidden, actions)
        self.value = MLP(in_features, hidden, 1)
        self.log_std = nn.Parameter(torch.full((actions,), log_std)) if continuous else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy output ``(B, A)`` and value ``(B,)`` for inputs ``(B, in_features)``."""
        return self.policy(x), self.value(x).squeeze(-1)


class Batch(NamedTuple):
    """All transitions of a batch of episodes, flattened over episodes and time (``N`` rows)."""

    obs: torch.Tensor  # (N, obs_dim)
    goal: torch.Tensor  # (N, goal_dim)
    action: torch.Tensor  # (N,) int64 or (N, act_dim)
    reward_to_go: torch.Tensor  # (N,) discounted return from each step to the episode's end


def rewards_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """``G_t = sum_{t' >= t} gamma^(t'-t) r_t'`` for one episode's rewards ``(T,)``."""
    out = np.empty(len(rewards), dtype=np.float32)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        out[t] = running
    return out


def distribution(model: PolicyValue, params: Params, policy_out: torch.Tensor) -> Distribution:
    """pi(. | s, g) from the policy output: categorical over logits, or a diagonal Gaussian around the mean."""
    if model.log_std is None:
        return Categorical(logits=policy_out)
    return Independent(Normal(policy_out, params["log_std"].exp()), 1)


def reinforce_loss(
    model: PolicyValue, params: Params, batch: Batch, cfg: Config
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient surrogate plus the baseline's squared error (and an optional entropy bonus)."""
    policy_out, value = functional_call(model, params, (torch.cat([batch.obs, batch.goal], -1),))
    dist = distribution(model, params, policy_out)
    log_prob = dist.log_prob(batch.action)  # (N,)
    advantage = batch.reward_to_go - value.detach()  # the baseline must not receive policy gradients
    if cfg.normalize_advantages and advantage.numel() > 1:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    policy_loss = -(log_prob * advantage).mean()
    value_loss = F.mse_loss(value, batch.reward_to_go)
    entropy = dist.entropy().mean()
    loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
    return loss, {
        "loss/policy": policy_loss.item(),
        "loss/value": value_loss.item(),
        "train/entropy": entropy.item(),
    }


def to_batch(results: list[EpisodeResult], gamma: float, device: torch.device) -> Batch:
    """Concatenate episodes into a :class:`Batch`, computing each episode's rewards-to-go."""
    exps = [r.experience for r in results]

    def cat(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays)).to(device)

    return Batch(obs=cat([e.obs for e in exps]), goal=cat([e.desired_goal for e in exps]),
                 action=cat([e.action for e in exps]),
                 reward_to_go=cat([rewards_to_go(e.reward, gamma) for e in exps]))  # fmt: skip


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """Policy, baseline and the trainer hooks of a REINFORCE run (``data_root`` is unused)."""
    cfg: Config = run.params
    num_envs = run.env.num_envs or cfg.episodes
    envs = [make_env(run.env) for _ in range(num_envs)]
    venv = make_vector_env(run.env, num_envs) if run.env.vector != "loop" else None
    eval_envs = [make_env(run.env) for _ in range(min(run.eval.batch, run.eval.episodes))]
    space = envs[0].action_space
    if isinstance(space, spaces.Discrete):
        continuous, actions = False, int(space.n)
    elif isinstance(space, spaces.Box):
        continuous, actions = True, int(np.prod(space.shape))
    else:
        raise ConfigError("env.id", f"REINFORCE needs Discrete or Box actions; {run.env.id} has {space}")
    obs_dim, goal_dim = dims(envs[0])
    model = PolicyValue(obs_dim + goal_dim, cfg.hidden, actions, continuous, cfg.init_log_std).to(device)

    def params() -> Params:
        return dict(model.named_parameters())

    def policy(deterministic: bool) -> Act:
        def act(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
            x = torch.cat([torch.from_numpy(obs), torch.from_numpy(goal)], -1).to(device)  # (E, in)
            with torch.no_grad():
                out, _ = model(x)
                if deterministic:  # the mode: most likely action, or the Gaussian's mean
                    a = out if continuous else out.argmax(-1)
                else:
                    a = distribution(model, params(), out).sample()  # torch's global RNG: checkpointed
            return a.cpu().numpy()

        return act

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        seeds = [derive_seed(run.seed, step, i) for i in range(cfg.episodes)]
        act = policy(deterministic=False)
        results = run_episodes(envs, act, seeds) if venv is None else run_vector_episodes(venv, act, seeds)
        total, metrics = reinforce_loss(model, params(), to_batch(results, cfg.gamma, device), cfg)
        metrics["train/return"] = float(np.mean([r.ret for r in results]))
        metrics["train/episode_length"] = float(np.mean([r.experience.rows for r in results]))
        if not any(np.isnan(r.success) for r in results):
            metrics["train/success"] = float(np.mean([r.success for r in results]))
        return total, metrics

    def evaluate(part: str, episodes: int) -> dict[str, float]:
        seeds = [derive_seed(run.eval.seed, PART_INDEX[part], i) for i in range(episodes)]
        results = run_episodes(eval_envs, policy(deterministic=True), seeds)
        ret = mean_ci95([r.ret for r in results])
        metrics = {f"{part}/return": ret.mean, f"{part}/return_ci95": ret.ci95}
        if not any(np.isnan(r.success) for r in results):
            success = mean_ci95([r.success for r in results])
            metrics[f"{part}/success"], metrics[f"{part}/success_ci95"] = success.mean, success.ci95
        return metrics

    # Every episode resets from a seed derived from (seed, step, index) and sampling uses torch's global RNG,
    # which the trainer checkpoints: no extra state is needed for an exact resume.
    return Learner(model, loss, evaluate)
