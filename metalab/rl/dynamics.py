"""Learned dynamics for model-based RL: an ensemble of MLPs that predicts state changes, as one batched model.

An ensemble of ``E`` members is one module whose weights carry a leading member dimension, ``(E, in, out)``: a
forward pass is one batched matrix product per layer (``torch.baddbmm``) over inputs ``(E, R, in)``, member
``e`` seeing its own ``R`` rows. Each member predicts the *change* of the state, ``s' - s``, from ``[s, a]``
(Nagabandi et al., "Neural Network Dynamics for Model-Based Deep Reinforcement Learning with Model-Free
Fine-Tuning", ICRA 2018): the change is small and well scaled where the state itself is not. Inputs and
targets are standardised with a mean and standard deviation fitted on the data (:func:`fit_normalizer`), kept
as buffers of the module so that checkpoints carry them.

Two kinds of member (Chua, Calandra, McAllister, Levine, "Deep Reinforcement Learning in a Handful of Trials
using Probabilistic Dynamics Models", NeurIPS 2018, "PETS"):

- deterministic: the mean change, trained on squared error;
- probabilistic: a diagonal Gaussian over the change, trained on its negative log-likelihood
  (:func:`gaussian_nll`). Its log-variance is held between a learned upper and lower bound by softplus
  (:func:`bounded_logvar`), and the bounds are pulled together by a small penalty, so the variance can neither
  explode nor collapse outside the data.

Each member trains on its own bootstrap resample of the data (:func:`bootstrap_indices`): their disagreement
then estimates the model's epistemic uncertainty, the Gaussian its aleatoric one.

Trajectory sampling (:func:`trajectory_sampling`, PETS section 4.2) propagates ``P`` particles per action
sequence, each through one member per step: ``tsinf`` keeps a particle's member for the whole horizon, ``ts1``
draws it afresh every step. Both assign members in balanced groups (``P / E`` particles per member per step) so
that a step stays one batched forward pass.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metalab.utils import Params

Propagation = Literal["ts1", "tsinf"]
MIN_STD = 1e-6
"""A normaliser's standard deviation below this (a constant feature) is replaced by 1: the feature is centred
but not scaled up."""


class Normalizer(NamedTuple):
    """Standardisation of a model's inputs ``[s, a]`` and of its targets ``s' - s``."""

    in_mean: torch.Tensor  # (obs_dim + act_dim,)
    in_std: torch.Tensor  # (obs_dim + act_dim,)
    out_mean: torch.Tensor  # (obs_dim,)
    out_std: torch.Tensor  # (obs_dim,)


class Data(NamedTuple):
    """Transitions to fit a dynamics model on (``N`` rows, torch tensors)."""

    obs: torch.Tensor  # (N, obs_dim)
    action: torch.Tensor  # (N, act_dim)
    next_obs: torch.Tensor  # (N, obs_dim)


class Batch(NamedTuple):
    """One minibatch per member: member ``e`` trains on row ``e``."""

    obs: torch.Tensor  # (E, B, obs_dim)
    action: torch.Tensor  # (E, B, act_dim)
    next_obs: torch.Tensor  # (E, B, obs_dim)


class Rollout(NamedTuple):
    """Sampled trajectories of a batch of action sequences from a batch of start states."""

    states: torch.Tensor  # (S, N, P, H + 1, obs_dim): start state, then one predicted state per action
    members: torch.Tensor  # (H, P) int64: the member that moved particle p at step t (in every S, N)


class Ensemble(nn.Module):
    """``E`` MLPs ``[s, a] -> s' - s`` with SiLU ("swish", as PETS) hidden layers, weights stacked per member.

    Parameters are ``weight{i}`` ``(E, in, out)`` and ``bias{i}`` ``(E, 1, out)`` per layer and, when
    ``probabilistic``, ``max_logvar`` and ``min_logvar`` ``(obs_dim,)``: the soft bounds of the log-variance, in
    normalised target units (initial values as PETS: 0.5 and -10). Members are initialised independently, with
    zero biases and weights from a normal of std ``1 / (2 sqrt(in))`` truncated at two standard deviations.
    Buffers hold the :class:`Normalizer` (identity until :meth:`set_normalizer`).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (200, 200, 200),
        members: int = 5,
        probabilistic: bool = True,
    ):
        super().__init__()
        self.obs_dim, self.act_dim, self.members = obs_dim, act_dim, members
        self.probabilistic = probabilistic
        widths = [obs_dim + act_dim, *hidden, 2 * obs_dim if probabilistic else obs_dim]
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            std = 1 / (2 * math.sqrt(fan_in))
            weight = torch.empty(members, fan_in, fan_out)
            nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
            self.register_parameter(f"weight{i}", nn.Parameter(weight))
            self.register_parameter(f"bias{i}", nn.Parameter(torch.zeros(members, 1, fan_out)))
        if probabilistic:
            self.max_logvar = nn.Parameter(torch.full((obs_dim,), 0.5))
            self.min_logvar = nn.Parameter(torch.full((obs_dim,), -10.0))
        self.register_buffer("in_mean", torch.zeros(obs_dim + act_dim))
        self.register_buffer("in_std", torch.ones(obs_dim + act_dim))
        self.register_buffer("out_mean", torch.zeros(obs_dim))
        self.register_buffer("out_std", torch.ones(obs_dim))

    def params(self) -> Params:
        """The parameters as a dict (what the pure functions of this module take)."""
        return dict(self.named_parameters())

    def normalizer(self) -> Normalizer:
        return Normalizer(self.in_mean, self.in_std, self.out_mean, self.out_std)

    def set_normalizer(self, norm: Normalizer) -> None:
        """Store ``norm`` in the module's buffers (so that it is saved with the weights)."""
        with torch.no_grad():
            for name, value in zip(Normalizer._fields, norm, strict=True):
                getattr(self, name).copy_(value)


def fit_normalizer(data: Data) -> Normalizer:
    """Mean and standard deviation of the inputs ``[s, a]`` and targets ``s' - s`` of ``data`` (a constant
    feature keeps a standard deviation of 1)."""
    inputs = torch.cat([data.obs, data.action], -1)  # (N, in)
    targets = data.next_obs - data.obs  # (N, obs_dim)

    def std(x: torch.Tensor) -> torch.Tensor:
        s = x.std(0, unbiased=False)
        return torch.where(s < MIN_STD, torch.ones_like(s), s)

    return Normalizer(inputs.mean(0), std(inputs), targets.mean(0), std(targets))


def ensemble_forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """The raw outputs ``(E, R, out)`` of every member on its own rows ``x`` ``(E, R, in)``."""
    layers = sum(1 for k in params if k.startswith("weight"))
    for i in range(layers):
        x = torch.baddbmm(params[f"bias{i}"], x, params[f"weight{i}"])  # (E, R, width)
        if i < layers - 1:
            x = F.silu(x)
    return x


def bounded_logvar(raw: torch.Tensor, min_logvar: torch.Tensor, max_logvar: torch.Tensor) -> torch.Tensor:
    """``raw`` squashed smoothly between ``min_logvar`` and ``max_logvar`` by two softplus steps (PETS, appendix
    A.1), with gradients to the bounds themselves.

    Near the middle of the range it is ``raw``; far below it tends to ``min_logvar``, far above to
    ``min_logvar + softplus(max_logvar - min_logvar)``, which is ``max_logvar`` plus
    ``log(1 + exp(min_logvar - max_logvar))``: a margin of 5e-5 for PETS's initial bounds (0.5 and -10).
    """
    logvar = max_logvar - F.softplus(max_logvar - raw)
    return min_logvar + F.softplus(logvar - min_logvar)


def mean_logvar(params: Params, x: torch.Tensor, obs_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predicted mean change and bounded log-variance, each ``(E, R, obs_dim)``, in normalised target units, for
    normalised inputs ``x`` ``(E, R, in)``; the log-variance is None for a deterministic ensemble."""
    out = ensemble_forward(params, x)
    if "max_logvar" not in params:
        return out, None
    return out[..., :obs_dim], bounded_logvar(out[..., obs_dim:], params["min_logvar"], params["max_logvar"])


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-density of ``target`` under ``N(mean, exp(logvar))``, averaged over all but the first
    (member) dimension: ``(E,)``. ``0.5 ((y - mu)^2 exp(-logvar) + logvar + log 2 pi)`` per entry."""
    per_entry = 0.5 * ((target - mean) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))
    return per_entry.flatten(1).mean(1)


def normalized_inputs(norm: Normalizer, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """``([s, a] - mean) / std``, ``(..., in)``."""
    return (torch.cat([obs, action], -1) - norm.in_mean) / norm.in_std


def model_loss(
    params: Params, norm: Normalizer, batch: Batch, bound_reg: float = 0.01
) -> tuple[torch.Tensor, dict[str, float]]:
    """The ensemble's training loss on one minibatch per member, and metrics (``train/model_mse``, and
    ``train/model_nll`` for a probabilistic ensemble).

    Per member: the Gaussian NLL (probabilistic) or the squared error (deterministic) of the normalised change,
    averaged over rows and state dimensions; summed over members, so that each member's gradient is that of its
    own loss. A probabilistic ensemble adds ``bound_reg * (sum max_logvar - sum min_logvar)`` (PETS): without it
    the bounds would drift apart and stop bounding.
    """
    x = normalized_inputs(norm, batch.obs, batch.action)  # (E, B, in)
    target = (batch.next_obs - batch.obs - norm.out_mean) / norm.out_std  # (E, B, obs_dim)
    mean, logvar = mean_logvar(params, x, batch.obs.shape[-1])
    mse = ((mean - target) ** 2).flatten(1).mean(1)  # (E,)
    metrics = {"train/model_mse": float(mse.detach().mean())}
    if logvar is None:
        return mse.sum(), metrics
    nll = gaussian_nll(mean, logvar, target)  # (E,)
    metrics["train/model_nll"] = float(nll.detach().mean())
    bounds = params["max_logvar"].sum() - params["min_logvar"].sum()
    return nll.sum() + bound_reg * bounds, metrics


def predict(
    params: Params,
    norm: Normalizer,
    obs: torch.Tensor,
    action: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """Next states ``(E, R, obs_dim)`` from states ``(E, R, obs_dim)`` and actions ``(E, R, act_dim)``, member
    ``e`` predicting row ``e``. A probabilistic member samples its Gaussian (with ``generator``) unless
    ``sample`` is false; a deterministic one returns its mean."""
    mean, logvar = mean_logvar(params, normalized_inputs(norm, obs, action), obs.shape[-1])
    if logvar is not None and sample:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        mean = mean + torch.exp(0.5 * logvar) * noise
    return obs + mean * norm.out_std + norm.out_mean


def member_assignment(
    members: int,
    particles: int,
    horizon: int,
    propagation: Propagation,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which member moves each particle at each step, ``(H, P)``: a random balanced assignment (``P / E``
    particles per member) drawn once (``tsinf``) or afresh every step (``ts1``)."""
    if particles % members:
        raise ValueError(f"{particles} particles cannot be split evenly among {members} members")
    draws = 1 if propagation == "tsinf" else horizon
    group = torch.arange(particles, device=device) // (particles // members)  # (P,) member of each slot
    slots = torch.stack([torch.randperm(particles, generator=generator, device=device) for _ in range(draws)])
    assignment = torch.empty_like(slots)
    assignment.scatter_(1, slots, group.expand_as(slots))  # particle slots[t, j] goes to the member of slot j
    return assignment.expand(horizon, particles)


def trajectory_sampling(
    params: Params,
    norm: Normalizer,
    state: torch.Tensor,
    actions: torch.Tensor,
    particles: int,
    propagation: Propagation = "tsinf",
    *,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> Rollout:
    """Roll ``P = particles`` particles of every action sequence through the ensemble (PETS's TS1 / TSinf).

    ``state`` ``(S, obs_dim)`` are start states, ``actions`` ``(S, N, H, act_dim)`` ``N`` candidate sequences
    for each. Every step is one batched forward pass of all ``S * N * P`` particles, grouped by member. The member
    assignment is shared by all candidates (common random numbers: candidates differ by their actions, not by
    which members judge them). Differentiable in ``actions`` (reparameterised sampling), for gradient planning.
    """
    members = params["weight0"].shape[0]
    s, n, horizon, _ = actions.shape
    per = particles // members
    assignment = member_assignment(members, particles, horizon, propagation, generator, state.device)
    x = state[:, None, None, :].expand(s, n, particles, state.shape[-1])  # (S, N, P, D)
    states = [x]

    def by_member(v: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        v = v[:, :, order].reshape(s, n, members, per, v.shape[-1])  # (S, N, E, P/E, d)
        return v.permute(2, 0, 1, 3, 4).reshape(members, s * n * per, v.shape[-1])  # (E, S*N*P/E, d)

    for t in range(horizon):
        order = torch.argsort(assignment[t], stable=True)  # (P,) particles sorted by member
        a = actions[:, :, None, t].expand(s, n, particles, actions.shape[-1])  # (S, N, P, A)
        nxt = predict(params, norm, by_member(x, order), by_member(a, order), generator, sample)  # (E, R, D)
        nxt = nxt.reshape(members, s, n, per, -1).permute(1, 2, 0, 3, 4).reshape(s, n, particles, -1)
        x = torch.empty_like(nxt).index_copy(2, order, nxt)  # back to particle order
        states.append(x)
    return Rollout(torch.stack(states, 3), assignment)


def bootstrap_indices(n: int, members: int, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap resample of ``n`` rows per member, ``(E, n)``: ``n`` draws with replacement."""
    return rng.integers(0, n, size=(members, n))


def minibatch(data: Data, boot: np.ndarray, size: int, rng: np.random.Generator) -> Batch:
    """``size`` rows per member, drawn uniformly from that member's bootstrap resample ``boot[e]``."""
    pick = rng.integers(0, boot.shape[1], size=(boot.shape[0], size))  # (E, B) positions in each resample
    index = torch.from_numpy(np.take_along_axis(boot, pick, 1)).to(data.obs.device)  # (E, B) data rows
    return Batch(data.obs[index], data.action[index], data.next_obs[index])


def fit_ensemble(
    model: Ensemble,
    data: Data,
    updates: int,
    batch_size: int,
    rng: np.random.Generator,
    *,
    lr: float = 1e-3,
    bound_reg: float = 0.01,
    weight_decay: float = 0.0,
) -> tuple[np.ndarray, list[float]]:
    """Fit ``model`` to ``data`` on its own (outside the trainer): normaliser, one bootstrap resample per member,
    ``updates`` Adam steps on minibatches of ``batch_size`` rows per member. Returns the resamples ``(E, N)`` and
    the losses. (:mod:`metalab.rl.mbrl` makes the same updates one trainer step at a time.)"""
    model.set_normalizer(fit_normalizer(data))
    boot = bootstrap_indices(data.obs.shape[0], model.members, rng)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(updates):
        batch = minibatch(data, boot, batch_size, rng)
        loss, _ = model_loss(model.params(), model.normalizer(), batch, bound_reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return boot, losses
