"""Planners for model-predictive control: pick an action sequence that maximises a model's predicted return.

Each planner is a pure function ``planner(rollout, reward, state, bounds, cfg, mean, *, generator) -> Plan`` over
a batch of ``S`` start states, evaluating all candidate sequences of all states (and, inside ``rollout``, all
particles and ensemble members) in one call per iteration:

- ``rollout(state (S, D), actions (S, N, H, A), generator) -> states (S, N, P, H + 1, D)`` predicts ``P``
  trajectories (particles) of each of ``N`` candidate sequences, start state first
  (:func:`metalab.rl.dynamics.trajectory_sampling` for a learned ensemble);
- ``reward(obs, action, next_obs) -> r`` scores transitions, elementwise over any leading dimensions;
- ``done(obs, action, next_obs) -> bool``, optional (keyword ``done``), says which transitions end the episode
  (an env's termination, e.g. a pole that fell: :mod:`metalab.rl.env_models`).

A sequence's value is its predicted return, ``sum_t reward(s_t, a_t, s_{t+1})`` averaged over its particles,
where a particle earns nothing after its first terminal transition (that transition's own reward counts, as
the env pays it) (:func:`sequence_returns`). Actions stay within ``bounds``. A :class:`Plan` holds the chosen sequences, of which
MPC executes the first action, and the warm start for the next step: the sequence shifted by one step with
the middle of the bounds appended (PETS). The planners:

- :func:`random_shooting`: the best of ``candidates`` uniform random sequences (Nagabandi et al., ICRA 2018);
- :func:`cem`: the cross-entropy method, refitting a diagonal Gaussian to the ``elites`` best samples
  ``iterations`` times, with momentum (Chua et al., NeurIPS 2018, "PETS"; Botev et al. 2013 on CEM);
- :func:`mppi`: model-predictive path integral control, moving the mean by the return-weighted average of the
  perturbations, weights ``softmax(R / temperature)`` (Williams, Aldrich, Theodorou, "Model Predictive Path
  Integral Control", JGCD 2017; Williams et al., "Information Theoretic MPC", ICRA 2017);
- :func:`gradient`: Adam on the action sequence through the differentiable model, from the warm start or from
  CEM's plan, keeping the best sequence seen (every evaluation uses the same random numbers, so the objective
  is one fixed function of the actions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from metalab.config import MAX_BATCH, MAX_INNER_STEPS, MAX_STEPS, require, require_between

RolloutFn = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], torch.Tensor]
"""``(state (S, D), actions (S, N, H, A), generator) -> states (S, N, P, H + 1, D)``."""
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(obs (..., D), action (..., A), next_obs (..., D)) -> reward (...)``."""
DoneFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(obs (..., D), action (..., A), next_obs (..., D)) -> terminated (...) bool``: the transition ends the
episode."""
MAX_HORIZON = 1_000
"""Longest planning horizon."""


@dataclass(frozen=True)
class PlannerConfig:
    """How MPC chooses its actions (the ``planner`` section of an ``mbrl`` config). Defaults: PETS's CEM."""

    method: Literal["random", "cem", "mppi", "gradient"] = "cem"
    """``random`` shooting, ``cem``, ``mppi``, or ``gradient`` (Adam through the model)."""
    horizon: int = 25
    """Actions per planned sequence (PETS: 25 on most tasks)."""
    candidates: int = 400
    """Sequences sampled per iteration and start state (PETS: 400-500). Random shooting draws this many once."""
    iterations: int = 5
    """Sampling rounds of CEM and MPPI (PETS: 5); unused by random shooting."""
    elites: int = 40
    """CEM: the best samples the Gaussian is refitted to (PETS: 40)."""
    momentum: float = 0.1
    """CEM: weight of the old mean and standard deviation in each refit (PETS's alpha, 0.1)."""
    init_std: float = 0.5
    """Standard deviation of CEM's first round and of MPPI's perturbations, as a fraction of the half-width of
    the action bounds (0.5: PETS's initial variance ``(high - low)^2 / 16``)."""
    temperature: float = 1.0
    """MPPI: the temperature ``lambda`` of the weights ``softmax(R / lambda)``, in units of return."""
    grad_steps: int = 10
    """Gradient planning: Adam steps on the action sequence."""
    grad_lr: float = 0.05
    """Gradient planning: Adam's step size, in action units."""
    grad_init: Literal["mean", "cem"] = "cem"
    """Gradient planning starts from the warm start (``mean``) or from CEM's plan (``cem``, the CEM settings
    above)."""

    def __post_init__(self) -> None:
        require_between(self.horizon, "horizon", 1, MAX_HORIZON)
        require_between(self.candidates, "candidates", 1, MAX_BATCH)
        require_between(self.iterations, "iterations", 1, MAX_INNER_STEPS)
        require_between(self.elites, "elites", 1, self.candidates, " (the candidates)")
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        require(self.init_std > 0, "init_std", "must be > 0")
        require(self.temperature > 0, "temperature", "must be > 0")
        require_between(self.grad_steps, "grad_steps", 0, MAX_STEPS)
        require(self.grad_lr > 0, "grad_lr", "must be > 0")


class Bounds(NamedTuple):
    """The action box."""

    low: torch.Tensor  # (A,)
    high: torch.Tensor  # (A,)

    @property
    def middle(self) -> torch.Tensor:
        return (self.low + self.high) / 2

    @property
    def half_width(self) -> torch.Tensor:
        return (self.high - self.low) / 2

    def clamp(self, actions: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(actions, self.high), self.low)


class Plan(NamedTuple):
    """A planner's answer for each of ``S`` start states."""

    actions: torch.Tensor  # (S, H, A) the chosen sequences: MPC executes actions[:, 0]
    mean: torch.Tensor  # (S, H, A) the warm start for the next step: actions shifted by one, middle appended


def initial_mean(bounds: Bounds, states: int, horizon: int) -> torch.Tensor:
    """The warm start of a new episode: the middle of the bounds, ``(S, H, A)``."""
    return bounds.middle.expand(states, horizon, -1).clone()


def shifted(actions: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """``actions`` ``(S, H, A)`` one step on: drop the first action, append the middle of the bounds."""
    return torch.cat([actions[:, 1:], bounds.middle.expand(actions.shape[0], 1, -1)], 1)


def sequence_returns(
    rollout: RolloutFn,
    reward: RewardFn,
    state: torch.Tensor,
    actions: torch.Tensor,
    generator: torch.Generator | None = None,
    done: DoneFn | None = None,
) -> torch.Tensor:
    """Predicted return of each sequence ``actions`` ``(S, N, H, A)`` from ``state`` ``(S, D)``, averaged over
    its particles: ``(S, N)``. With ``done``, a particle's rewards after its first terminal transition are
    dropped (the model knows nothing of episodes and would go on predicting, and paying for, states past the
    end)."""
    states = rollout(state, actions, generator)  # (S, N, P, H + 1, D)
    obs, action, next_obs = states[..., :-1, :], actions[:, :, None], states[..., 1:, :]
    r = reward(obs, action, next_obs)  # (S, N, P, H)
    if done is not None:
        ended = done(obs, action, next_obs).long()  # (S, N, P, H) 1 where transition t ends the episode
        after_end = (ended.cumsum(-1) - ended) > 0  # an earlier transition ended it
        r = torch.where(
            after_end, torch.zeros_like(r), r
        )  # where, not a product: states past the end may be inf
    return r.sum(-1).mean(-1)


def _gaussian(
    mean: torch.Tensor, std: torch.Tensor, n: int, bounds: Bounds, generator: torch.Generator | None
) -> torch.Tensor:
    """``n`` samples of ``N(mean, std^2)`` per state, clamped into the bounds: ``(S, n, H, A)``."""
    s, h, a = mean.shape
    noise = torch.randn((s, n, h, a), generator=generator, device=mean.device, dtype=mean.dtype)
    return bounds.clamp(mean[:, None] + std[:, None] * noise)


def _start(
    mean: torch.Tensor | None, bounds: Bounds, state: torch.Tensor, cfg: PlannerConfig
) -> torch.Tensor:
    return initial_mean(bounds, state.shape[0], cfg.horizon) if mean is None else mean


def random_shooting(
    rollout: RolloutFn,
    reward: RewardFn,
    state: torch.Tensor,
    bounds: Bounds,
    cfg: PlannerConfig,
    mean: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    done: DoneFn | None = None,
) -> Plan:
    """The best of ``cfg.candidates`` sequences drawn uniformly from the bounds (``mean`` is not used)."""
    s, h, a = state.shape[0], cfg.horizon, bounds.low.shape[0]
    u = torch.rand((s, cfg.candidates, h, a), generator=generator, device=state.device, dtype=state.dtype)
    samples = bounds.low + (bounds.high - bounds.low) * u  # (S, N, H, A)
    returns = sequence_returns(rollout, reward, state, samples, generator, done)  # (S, N)
    best = samples[torch.arange(s, device=state.device), returns.argmax(1)]  # (S, H, A)
    return Plan(best, shifted(best, bounds))


def cem(
    rollout: RolloutFn,
    reward: RewardFn,
    state: torch.Tensor,
    bounds: Bounds,
    cfg: PlannerConfig,
    mean: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    done: DoneFn | None = None,
) -> Plan:
    """The cross-entropy method from ``mean`` (default: the middle of the bounds); the plan is the final mean,
    as in PETS. Each round samples ``candidates`` sequences, takes the ``elites`` best and moves the mean and
    standard deviation to theirs, keeping a ``momentum`` fraction of the old values."""
    mu = _start(mean, bounds, state, cfg)  # (S, H, A)
    std = (cfg.init_std * bounds.half_width).expand_as(mu)
    for _ in range(cfg.iterations):
        samples = _gaussian(mu, std, cfg.candidates, bounds, generator)  # (S, N, H, A)
        returns = sequence_returns(rollout, reward, state, samples, generator, done)  # (S, N)
        top = returns.topk(cfg.elites, 1).indices  # (S, K)
        elites = samples.gather(1, top[:, :, None, None].expand(-1, -1, *samples.shape[2:]))  # (S, K, H, A)
        mu = cfg.momentum * mu + (1 - cfg.momentum) * elites.mean(1)
        std = cfg.momentum * std + (1 - cfg.momentum) * elites.std(1, unbiased=False)
    return Plan(mu, shifted(mu, bounds))


def mppi(
    rollout: RolloutFn,
    reward: RewardFn,
    state: torch.Tensor,
    bounds: Bounds,
    cfg: PlannerConfig,
    mean: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    done: DoneFn | None = None,
) -> Plan:
    """MPPI from ``mean``: ``iterations`` rounds of ``mean <- sum_k w_k x_k`` over ``candidates`` perturbed
    sequences ``x_k`` (noise of std ``init_std`` times the half-width, clamped into the bounds), with
    ``w = softmax(R / temperature)``."""
    mu = _start(mean, bounds, state, cfg)  # (S, H, A)
    std = (cfg.init_std * bounds.half_width).expand_as(mu)
    for _ in range(cfg.iterations):
        samples = _gaussian(mu, std, cfg.candidates, bounds, generator)  # (S, N, H, A)
        returns = sequence_returns(rollout, reward, state, samples, generator, done)  # (S, N)
        weights = torch.softmax(returns / cfg.temperature, 1)  # (S, N)
        mu = (weights[:, :, None, None] * samples).sum(1)
    return Plan(mu, shifted(mu, bounds))


def gradient(
    rollout: RolloutFn,
    reward: RewardFn,
    state: torch.Tensor,
    bounds: Bounds,
    cfg: PlannerConfig,
    mean: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    done: DoneFn | None = None,
) -> Plan:
    """Gradient ascent (Adam, ``grad_steps`` steps of ``grad_lr``) on the predicted return of one sequence per
    state, from CEM's plan or from ``mean``, projected onto the bounds after each step. Returns the best sequence
    evaluated (so it never does worse, under the model, than where it started). The model's parameters get no
    gradient: only the actions are differentiated. A termination (``done``) is a step in the return, with no
    gradient: it counts only through the returns compared when picking the best sequence."""
    if cfg.grad_init == "cem":
        start = cem(rollout, reward, state, bounds, cfg, mean, generator=generator, done=done).actions
    else:
        start = _start(mean, bounds, state, cfg)
    x = start.detach().clone().requires_grad_(True)  # (S, H, A)
    noise = generator.get_state() if generator is not None else None

    def value(actions: torch.Tensor) -> torch.Tensor:  # (S,) the same random numbers on every call
        if generator is not None:
            generator.set_state(noise)
        return sequence_returns(rollout, reward, state, actions[:, None], generator, done)[:, 0]

    opt = torch.optim.Adam([x], lr=cfg.grad_lr)
    best, best_value = x.detach().clone(), torch.full((state.shape[0],), -torch.inf, device=state.device)
    for i in range(cfg.grad_steps + 1):
        with torch.enable_grad():
            v = value(x)
            better = v.detach() > best_value  # (S,)
            best = torch.where(better[:, None, None], x.detach(), best)
            best_value = torch.where(better, v.detach(), best_value)
            if i == cfg.grad_steps:
                break
            (grad,) = torch.autograd.grad(v.sum(), x)  # each state's return depends on its own sequence only
        x.grad = -grad  # ascent
        opt.step()
        with torch.no_grad():
            x.copy_(bounds.clamp(x))
    return Plan(best, shifted(best, bounds))


PLANNERS: dict[str, Callable[..., Plan]] = {
    "random": random_shooting,
    "cem": cem,
    "mppi": mppi,
    "gradient": gradient,
}
"""The planner of each :attr:`PlannerConfig.method`."""


def plan(
    rollout: RolloutFn,
    reward: RewardFn,
    state: torch.Tensor,
    bounds: Bounds,
    cfg: PlannerConfig,
    mean: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    done: DoneFn | None = None,
) -> Plan:
    """The plan of ``cfg.method``'s planner (``done``: the episode's termination, see :func:`sequence_returns`)."""
    return PLANNERS[cfg.method](rollout, reward, state, bounds, cfg, mean, generator=generator, done=done)
