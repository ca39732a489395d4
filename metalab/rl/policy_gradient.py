"""The policy-gradient pieces of MAML-RL (:mod:`metalab.rl.maml_rl`), for the episodes of ``T`` tasks at once:
the Gaussian policy and its log-density, advantages (discounted rewards-to-go minus a linear feature baseline
fitted per task, optionally standardised per task), the REINFORCE and likelihood-ratio surrogates, the inner
policy-gradient step (:func:`metalab.meta.adapt.adapt`, ``vmap``-ed over tasks), the outer loss, and the mean KL
that bounds a TRPO outer step. Functions of tensors only: sampling, configs and the meta-iteration are
:mod:`metalab.rl.maml_rl`'s, and so are the sources of these choices (its docstring).

Per-task parameters are dicts of ``(T, ...)`` tensors (:func:`expand` of the policy's); :class:`Rollouts` is what
sampling returns, :class:`Batch` what the surrogates read.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from metalab.meta.adapt import adapt
from metalab.models import MLP
from metalab.models.mlp import mlp_forward
from metalab.rl.sac import sub_params
from metalab.rl.trpo import diagonal_gaussian_kl
from metalab.utils import Params

TIME_SCALE = 100.0
"""The baseline's time feature is ``step / TIME_SCALE`` (the paper's code: ``arange(l) / 100``)."""


class GaussianPolicy(nn.Module):
    """``pi(a | s) = N(mean(s), diag(exp(log_std))^2)``: a mean MLP and a state-independent ``log_std``."""

    def __init__(self, obs_dim: int, hidden: tuple[int, ...], act_dim: int, init_log_std: float):
        super().__init__()
        self.mean = MLP(obs_dim, hidden, act_dim)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))
        for layer in self.mean.modules():
            if isinstance(layer, nn.Linear):  # the paper's code: Xavier weights, zero biases
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)


class Rollouts(NamedTuple):
    """Episodes of ``T`` tasks, ``K`` each, padded to the longest (``H`` steps) with ``mask`` 0."""

    obs: torch.Tensor  # (T, K, H, obs_dim)
    action: torch.Tensor  # (T, K, H, A) the policy's samples, in [-1, 1] scale before clipping
    reward: torch.Tensor  # (T, K, H) 0 past an episode's end
    mask: torch.Tensor  # (T, K, H) 1.0 on an episode's steps
    returns: np.ndarray  # (T, K) undiscounted
    final: np.ndarray | None  # (T, K) info[final_info] at the last step


class Batch(NamedTuple):
    """What a policy-gradient surrogate needs of ``T`` tasks, flattened over episodes and steps (``N = K * H``)."""

    obs: torch.Tensor  # (T, N, obs_dim)
    action: torch.Tensor  # (T, N, A)
    advantage: torch.Tensor  # (T, N) 0 on padding
    mask: torch.Tensor  # (T, N)
    old_log_prob: torch.Tensor  # (T, N) log pi of the parameters that sampled the actions (a constant)


# --- policy ---------------------------------------------------------------------------------------------------


def log_prob(params: Params, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """``log pi(a | s)`` ``(...)`` of the Gaussian policy, for ``obs (..., obs_dim)`` and ``action (..., A)``."""
    log_std = params["log_std"]
    z = (action - mlp_forward(sub_params(params, "mean"), obs)) * torch.exp(-log_std)  # (..., A)
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def expand(params: Params, tasks: int) -> Params:
    """One copy of ``params`` per task, ``(T, ...)`` each (a view: no memory, gradients flow to ``params``)."""
    return {k: v.expand(tasks, *v.shape) for k, v in params.items()}


# --- advantages -----------------------------------------------------------------------------------------------


def discounted_returns(reward: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = sum_{t' >= t} gamma^(t'-t) r_t'`` along the last dim of ``reward (..., H)`` (zeros past the end)."""
    out = torch.zeros_like(reward)
    running = torch.zeros_like(reward[..., 0])
    for t in range(reward.shape[-1] - 1, -1, -1):
        running = reward[..., t] + gamma * running
        out[..., t] = running
    return out


def baseline_features(obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The linear baseline's features ``[o, o^2, t, t^2, t^3, 1]`` ``(..., H, 2 obs_dim + 4)``, zero on padding;
    ``o`` is the observation clipped to +-10, ``t`` the step / 100 (the paper's ``LinearFeatureBaseline``)."""
    o = obs.clamp(-10, 10)
    t = (torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / TIME_SCALE).expand(obs.shape[:-1])
    t = t[..., None]  # (..., H, 1)
    features = torch.cat([o, o**2, t, t**2, t**3, torch.ones_like(t)], -1)
    return features * mask[..., None]


def fit_linear_baseline(features: torch.Tensor, targets: torch.Tensor, reg: float) -> torch.Tensor:
    """Ridge least squares ``argmin_w |X w - y|^2 + reg |w|^2`` per leading index: ``features (..., M, F)``,
    ``targets (..., M)`` -> ``w (..., F)``, solved in float64. Zero rows (padding) do not count."""
    x, y = features.double(), targets.double()
    gram = x.transpose(-1, -2) @ x + reg * torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(gram, (x.transpose(-1, -2) @ y[..., None]))[..., 0].to(features.dtype)


def advantages(rollouts: Rollouts, gamma: float, reg: float, normalize: bool) -> torch.Tensor:
    """``A_t = G_t - b(s_t, t)`` ``(T, K, H)``: rewards-to-go minus a linear baseline fitted per task on that
    task's ``K`` episodes; standardised per task over its steps if ``normalize``; 0 on padding."""
    tasks, k, h = rollouts.mask.shape
    ret = discounted_returns(rollouts.reward, gamma)  # (T, K, H)
    x = baseline_features(rollouts.obs, rollouts.mask).reshape(tasks, k * h, -1)  # (T, N, F)
    coef = fit_linear_baseline(x, ret.reshape(tasks, k * h), reg)  # (T, F)
    adv = (ret - (x @ coef[..., None]).reshape(tasks, k, h)) * rollouts.mask
    if normalize:
        n = rollouts.mask.sum((1, 2), keepdim=True)  # (T, 1, 1)
        mean = adv.sum((1, 2), keepdim=True) / n
        std = (((adv - mean) * rollouts.mask) ** 2).sum((1, 2), keepdim=True).div(n).sqrt()
        adv = (adv - mean) / (std + 1e-8) * rollouts.mask
    return adv


# --- surrogates and the inner step ----------------------------------------------------------------------------


def pg_surrogate(
    logp: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor, old_log_prob: torch.Tensor, ratio: bool
) -> torch.Tensor:
    """A policy-gradient surrogate to minimise from the log-probabilities ``logp (N,)`` of ``N`` steps' actions,
    their advantages and mask: a mean over the steps.

    ``ratio=False``: ``-mean(log pi * A)`` (REINFORCE). ``ratio=True``: ``-mean(pi / pi_old * A)`` with ``pi_old``
    the constant ``exp(old_log_prob)``. Where the parameters are those that sampled the actions, both have the
    gradient ``-mean(grad log pi * A)``; the ratio's Hessian has the extra ``-mean(A grad log pi grad log pi^T)``
    (ProMP's LVC inner objective; the outer surrogate).
    """
    weight = torch.exp(logp - old_log_prob) if ratio else logp
    return -(weight * advantage * mask).sum() / mask.sum()


def policy_surrogate(
    params: Params,
    obs: torch.Tensor,
    action: torch.Tensor,
    advantage: torch.Tensor,
    mask: torch.Tensor,
    old_log_prob: torch.Tensor,
    *,
    ratio: bool,
) -> torch.Tensor:
    """:func:`pg_surrogate` of the Gaussian policy ``params`` on one task's steps (the fields of a :class:`Batch`,
    ``(N, ...)``)."""
    return pg_surrogate(log_prob(params, obs, action), advantage, mask, old_log_prob, ratio)


def inner_step(params: Params, batch: Batch, lr: float, objective: str, first_order: bool = False) -> Params:
    """One task's adapted parameters ``params - lr * grad L(params)`` with ``L`` the ``objective``'s inner
    surrogate on the task's ``batch`` (unbatched, ``(N, ...)``); differentiable in ``params`` unless
    ``first_order``. ``vmap`` it over tasks."""
    loss = partial(policy_surrogate, ratio=objective == "promp")
    return adapt(params, loss, tuple(batch), 1, float(lr), first_order)


def inner_steps(params: Params, batch: Batch, lr: float, objective: str, first_order: bool = False) -> Params:
    """:func:`inner_step` of ``T`` tasks at once: per-task ``params (T, ...)`` and ``batch (T, N, ...)``."""
    step = partial(inner_step, lr=lr, objective=objective, first_order=first_order)
    return vmap(step)(params, batch)


def outer_loss(adapted: Params, post: Batch) -> torch.Tensor:
    """The meta-objective to minimise: the likelihood-ratio surrogate of the post-update episodes at the adapted
    parameters ``(T, ...)``, averaged over tasks (its gradient flows through the inner steps to ``theta``)."""
    return vmap(partial(policy_surrogate, ratio=True))(adapted, *post).mean()


# --- the TRPO constraint --------------------------------------------------------------------------------------


def _task_kl(old: Params, new: Params, obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kl = diagonal_gaussian_kl(mlp_forward(sub_params(old, "mean"), obs), old["log_std"],
                              mlp_forward(sub_params(new, "mean"), obs), new["log_std"])  # fmt: skip
    return (kl * mask).sum() / mask.sum()


def policy_kl(old: Params, new: Params, post: Batch) -> torch.Tensor:
    """The TRPO constraint: ``KL(pi_old || pi_new)`` of per-task parameters ``(T, ...)``, averaged over each task's
    post-update steps (``post.obs`` where ``post.mask`` is 1), then over tasks."""
    return vmap(_task_kl)(old, new, post.obs, post.mask).mean()
