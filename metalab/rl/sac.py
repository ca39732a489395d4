"""Soft actor-critic (Haarnoja, Zhou, Abbeel, Levine, ICML 2018; twin critics, target critics and the learned
temperature of Haarnoja et al., "Soft Actor-Critic Algorithms and Applications", arXiv 1812.05905), as pure
functions over a parameter dict.

The policy is a tanh-squashed Gaussian: ``a = tanh(u)``, ``u ~ N(mean(s), std(s))``, with actions in
``[-1, 1]^A`` (an algorithm rescales them to the env's box). Its log-density carries the change-of-variables
term ``- sum log(1 - tanh(u)^2)``. Two critics ``Q1, Q2`` regress on the soft Bellman target
``scale * r + gamma (1 - done) (min_j Qtarget_j(s', a') - alpha log pi(a' | s'))``, ``a' ~ pi(. | s')``, with
target critics that follow the online ones by Polyak averaging (:func:`polyak_update`). The actor minimises
``alpha log pi(a | s) - min_j Q_j(s, a)`` for reparameterised ``a``; ``alpha`` is fixed, or learned to hold the
policy's entropy near ``target_entropy``.

:func:`sac_losses` returns the critic, actor and temperature losses, built so that each loss reaches only its
own parameters (the actor sees detached critic parameters, the temperature loss detached
log-probabilities): one backward pass and one Adam over all parameters then equal three Adams with one learning
rate, except that the actor is differentiated through the critics as they were before this update (PEARL's code
steps the critics first). Observations handed to :func:`sac_losses` may carry gradient into an upstream
network (PEARL's context encoder); only the critic loss backpropagates into them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metalab.config import require, require_widths
from metalab.models import MLP
from metalab.models.mlp import mlp_forward
from metalab.rl.dqn import polyak_update
from metalab.utils import Params

__all__ = [
    "ActorCritic",
    "Batch",
    "Config",
    "Losses",
    "actor_loss",
    "critic_loss",
    "policy_head",
    "polyak_update",
    "q_value",
    "sac_losses",
    "soft_target",
    "sub_params",
    "tanh_gaussian_log_prob",
    "tanh_gaussian_sample",
    "temperature_loss",
]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the policy's log std is clamped to this range (rlkit, SB3)


@dataclass(frozen=True)
class Config:
    """SAC hyperparameters; defaults as in SAC v2 (Haarnoja et al. 2018b, its Table 1)."""

    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak coefficient of the target critics, applied after every update."""
    reward_scale: float = 1.0
    """Rewards are multiplied by this in the Bellman target; with a fixed ``alpha`` it sets the weight of the
    entropy bonus relative to the return (PEARL's setting: ``alpha = 1`` and a scale per environment)."""
    alpha: float = 1.0
    """Entropy temperature (the initial value when ``auto_alpha``)."""
    auto_alpha: bool = True
    """Learn ``log alpha`` so that the policy's entropy stays near ``target_entropy`` (SAC v2); false: keep
    ``alpha`` fixed (SAC v1, PEARL)."""
    target_entropy: float | None = None
    """Entropy the learned temperature aims at; null: minus the action dimension (the SAC v2 default)."""
    policy_reg: float = 0.0
    """Weight of ``mean^2 + log_std^2`` (averaged) in the actor loss, keeping the pre-squash Gaussian near the
    origin (PEARL's code uses 1e-3 for each)."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy and of each critic."""

    def __post_init__(self) -> None:
        require(0 <= self.gamma < 1, "gamma", "must be in [0, 1)")
        require(0 < self.tau <= 1, "tau", "must be in (0, 1]")
        require(self.reward_scale > 0, "reward_scale", "must be > 0")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(self.policy_reg >= 0, "policy_reg", "must be >= 0")
        require_widths(self.hidden, "hidden")


class ActorCritic(nn.Module):
    """Policy MLP (mean and log std of ``A`` actions), critics ``q1``, ``q2`` on ``[obs, action]``, ``log_alpha``.

    The output layers start near zero (uniform in +-3e-3, as in rlkit) so initial actions are near the box
    centre and initial Q values near zero.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], alpha: float = 1.0):
        super().__init__()
        self.act_dim = act_dim
        self.policy = MLP(obs_dim, hidden, 2 * act_dim)
        self.q1 = MLP(obs_dim + act_dim, hidden, 1)
        self.q2 = MLP(obs_dim + act_dim, hidden, 1)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        for net in (self.policy, self.q1, self.q2):
            nn.init.uniform_(net.head.weight, -3e-3, 3e-3)
            nn.init.uniform_(net.head.bias, -3e-3, 3e-3)

    def critic_params(self) -> Params:
        """The parameters a target network copies: those of ``q1`` and ``q2``."""
        return {k: v for k, v in self.named_parameters() if k.startswith(("q1.", "q2."))}


class Losses(NamedTuple):
    """SAC's three losses; each reaches only its own parameters, so their sum is what one optimizer minimises."""

    critic: torch.Tensor
    actor: torch.Tensor
    temperature: torch.Tensor
    """Zero (a constant) unless the temperature is learned."""

    def total(self) -> torch.Tensor:
        return self.critic + self.actor + self.temperature


class Batch(NamedTuple):
    """Transitions for one SAC update (``B`` rows)."""

    obs: torch.Tensor  # (B, obs_dim) what policy and critics see; may carry gradient into an upstream network
    action: torch.Tensor  # (B, A) in [-1, 1]
    reward: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, obs_dim)
    done: torch.Tensor  # (B,) 1.0 where next_obs is terminal (no bootstrapping)


def sub_params(params: Params, prefix: str) -> Params:
    """The entries of ``params`` under ``prefix.``, keys without it, in order (what :func:`mlp_forward` needs)."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def policy_head(params: Params, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and clamped log std of the pre-squash Gaussian, each ``(B, A)``, for observations ``(B, obs_dim)``."""
    mean, log_std = mlp_forward(sub_params(params, "policy"), obs).chunk(2, -1)
    return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def q_value(params: Params, which: str, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """``Q_which(s, a)``, ``(B,)``, for ``which`` in ``q1``, ``q2`` (or a target dict with the same keys)."""
    return mlp_forward(sub_params(params, which), torch.cat([obs, action], -1)).squeeze(-1)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, pre_tanh: torch.Tensor) -> torch.Tensor:
    """``log pi(tanh(u))``, ``(B,)``: the Gaussian log-density of ``u`` minus ``sum log(1 - tanh(u)^2)``.

    ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))`` is the same quantity without the ``log(0)`` that
    ``tanh(u)`` rounding to +-1 gives for large ``|u|``.
    """
    gaussian = -0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))  # log |d tanh(u) / du|
    return (gaussian - log_det).sum(-1)


def tanh_gaussian_sample(
    mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised action ``tanh(mean + std * noise)`` and its log-probability, ``(B, A)`` and ``(B,)``.

    ``noise`` is standard normal ``(B, A)``; gradients flow to ``mean`` and ``log_std`` through it.
    """
    pre_tanh = mean + log_std.exp() * noise
    return torch.tanh(pre_tanh), tanh_gaussian_log_prob(mean, log_std, pre_tanh)


def soft_target(
    reward: torch.Tensor,
    done: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    next_log_prob: torch.Tensor,
    gamma: float,
    alpha: float | torch.Tensor,
    reward_scale: float = 1.0,
) -> torch.Tensor:
    """``scale * r + gamma (1 - done) (min(Q1', Q2') - alpha log pi(a' | s'))``, ``(B,)`` (clipped double Q)."""
    soft_value = torch.minimum(next_q1, next_q2) - alpha * next_log_prob
    return reward_scale * reward + gamma * (1.0 - done) * soft_value


def critic_loss(q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of both critics' mean squared errors against the (constant) target."""
    return F.mse_loss(q1, target) + F.mse_loss(q2, target)


def actor_loss(
    log_prob: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """``mean(alpha log pi(a | s) - min(Q1, Q2)(s, a))`` over reparameterised actions ``a``."""
    return (alpha * log_prob - torch.minimum(q1, q2)).mean()


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """``-log_alpha * mean(log pi + target_entropy)``: raises alpha while the entropy is below the target."""
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


def sac_losses(
    params: Params, target: Params, batch: Batch, cfg: Config, act_dim: int
) -> tuple[Losses, dict[str, float]]:
    """Critic, actor and temperature losses of ``batch``; each reaches only its own parameters.

    ``params`` are :class:`ActorCritic`'s named parameters, ``target`` its target critics
    (:meth:`ActorCritic.critic_params` keys). Action noise comes from torch's global generator.
    """
    log_alpha = params["log_alpha"]
    alpha = log_alpha.detach().exp()
    obs, next_obs = batch.obs.detach(), batch.next_obs.detach()  # for actor and targets: no encoder gradient

    with torch.no_grad():
        mean, log_std = policy_head(params, next_obs)
        next_action, next_log_prob = tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))
        y = soft_target(batch.reward, batch.done, q_value(target, "q1", next_obs, next_action),
                        q_value(target, "q2", next_obs, next_action), next_log_prob, cfg.gamma, alpha,
                        cfg.reward_scale)  # fmt: skip
    q1, q2 = q_value(params, "q1", batch.obs, batch.action), q_value(params, "q2", batch.obs, batch.action)
    critic = critic_loss(q1, q2, y)

    mean, log_std = policy_head(params, obs)
    action, log_prob = tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))
    frozen = {k: v.detach() for k, v in params.items() if k.startswith(("q1.", "q2."))}  # dQ/da only
    actor = actor_loss(
        log_prob, q_value(frozen, "q1", obs, action), q_value(frozen, "q2", obs, action), alpha
    )
    if cfg.policy_reg > 0:
        actor = actor + cfg.policy_reg * ((mean**2).mean() + (log_std**2).mean())
    temperature = torch.zeros((), device=critic.device)
    metrics = {
        "loss/critic": critic.item(),
        "loss/actor": actor.item(),
        "train/q": q1.detach().mean().item(),
        "train/entropy": -log_prob.detach().mean().item(),
        "train/alpha": alpha.item(),
    }
    if cfg.auto_alpha:
        target_entropy = -float(act_dim) if cfg.target_entropy is None else cfg.target_entropy
        temperature = temperature_loss(log_alpha, log_prob, target_entropy)
        metrics["loss/alpha"] = temperature.item()
    return Losses(critic, actor, temperature), metrics
