"""Planners on a problem with a known answer: 1-D linear dynamics ``x' = x + a`` and reward ``-x'^2 - c a^2``,
whose optimal sequence follows from a finite-horizon Riccati recursion; CEM against random shooting at equal
compute; bounds, warm starts, batches of start states, and gradient planning that leaves the model alone."""

from __future__ import annotations

import pytest
import torch

from metalab.errors import ConfigError
from metalab.rl import planners as pl

C = 0.5  # action cost
BOUNDS = pl.Bounds(torch.tensor([-1.0]), torch.tensor([1.0]))


def rollout(
    state: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x_{t+1} = x_t + a_t``, one particle: ``(S, N, 1, H + 1, 1)``."""
    path = state[:, None, None, :] + torch.cumsum(actions, 2)  # (S, N, H, 1)
    start = state[:, None, None, :].expand(-1, actions.shape[1], 1, -1)  # (S, N, 1, 1)
    return torch.cat([start, path], 2)[:, :, None]


def reward(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    return -(next_obs[..., 0] ** 2) - C * action[..., 0] ** 2


def optimum(x0: float, horizon: int) -> tuple[list[float], float]:
    """The optimal actions and return from ``x0``: the value ``-p_t x^2`` with ``p_H = 0`` and, for
    ``q = 1 + p_{t+1}``, ``a_t = -q x_t / (q + c)``, ``p_t = q c / (q + c)`` (unconstrained)."""
    p = [0.0] * (horizon + 1)
    for t in reversed(range(horizon)):
        q = 1 + p[t + 1]
        p[t] = q * C / (q + C)
    actions, x = [], x0
    for t in range(horizon):
        q = 1 + p[t + 1]
        actions.append(-q * x / (q + C))
        x += actions[-1]
    return actions, -p[0] * x0**2


def value(actions: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return pl.sequence_returns(rollout, reward, state, actions[:, None])[:, 0]


def test_closed_form_optimum_is_optimal() -> None:
    actions, best = optimum(0.9, 4)
    state = torch.tensor([[0.9]])
    a = torch.tensor(actions)[None, :, None]
    assert value(a, state).item() == pytest.approx(best, rel=1e-5)
    torch.manual_seed(0)
    worse = value(a + 0.05 * torch.randn(20, 4, 1), state.expand(20, 1))  # any perturbation does worse
    assert torch.all(worse < best)


SETTINGS = {
    "random": dict(candidates=20_000),
    "cem": dict(candidates=200, elites=20, iterations=6),
    "mppi": dict(candidates=1000, iterations=20, init_std=0.2, temperature=0.002),
    "gradient": dict(grad_init="mean", grad_steps=100, grad_lr=0.05),
}


@pytest.mark.parametrize("method", ["random", "cem", "mppi", "gradient"])
def test_planner_finds_the_optimum(method: str) -> None:
    horizon = 2 if method == "random" else 5  # random shooting is hopeless beyond a few dimensions
    x0 = 0.9
    best_actions, best = optimum(x0, horizon)
    cfg = pl.PlannerConfig(method=method, horizon=horizon, **SETTINGS[method])
    state = torch.tensor([[x0]])
    plan = pl.plan(rollout, reward, state, BOUNDS, cfg, generator=torch.Generator().manual_seed(0))
    assert plan.actions.shape == (1, horizon, 1)
    regret = best - value(plan.actions, state).item()
    assert 0 <= regret < (0.01 if method == "random" else 0.005)
    assert plan.actions[0, 0, 0].item() == pytest.approx(best_actions[0], abs=0.05)
    if method == "gradient":  # a convex problem: gradient ascent reaches the optimum itself
        assert torch.allclose(plan.actions[0, :, 0], torch.tensor(best_actions), atol=0.01)


def test_cem_beats_random_shooting_at_equal_compute() -> None:
    """Both evaluate 1,000 sequences of 6 actions; over 10 seeds CEM's regret is far below random shooting's."""
    horizon, state = 6, torch.tensor([[0.9]])
    _, best = optimum(0.9, horizon)
    cem = pl.PlannerConfig(method="cem", horizon=horizon, candidates=200, iterations=5, elites=20)
    shooting = pl.PlannerConfig(method="random", horizon=horizon, candidates=1000)
    regret = {"cem": 0.0, "random": 0.0}
    for seed in range(10):
        for name, cfg in (("cem", cem), ("random", shooting)):
            plan = pl.plan(rollout, reward, state, BOUNDS, cfg, generator=torch.Generator().manual_seed(seed))
            regret[name] += (best - value(plan.actions, state).item()) / 10
    assert regret["cem"] < 0.2 * regret["random"], regret


@pytest.mark.parametrize("method", ["random", "cem", "mppi", "gradient"])
def test_plans_stay_in_bounds_and_saturate(method: str) -> None:
    """From x0 = 5 the unconstrained optimum pushes harder than |a| <= 1 allows: the first action is -1."""
    cfg = pl.PlannerConfig(
        method=method, horizon=3, candidates=300, elites=30, temperature=0.01, grad_steps=30
    )
    plan = pl.plan(
        rollout, reward, torch.tensor([[5.0]]), BOUNDS, cfg, generator=torch.Generator().manual_seed(0)
    )
    assert torch.all(plan.actions >= -1) and torch.all(plan.actions <= 1)
    assert plan.actions[0, 0, 0].item() < -0.9


def test_each_start_state_gets_its_own_plan() -> None:
    horizon = 4
    starts = [0.9, -0.6, 0.0]
    cfg = pl.PlannerConfig(method="cem", horizon=horizon, candidates=200, elites=20, iterations=6)
    state = torch.tensor(starts)[:, None]
    plan = pl.plan(rollout, reward, state, BOUNDS, cfg, generator=torch.Generator().manual_seed(1))
    assert plan.actions.shape == (3, horizon, 1)
    for i, x0 in enumerate(starts):
        best_actions, _ = optimum(x0, horizon)
        assert plan.actions[i, 0, 0].item() == pytest.approx(best_actions[0], abs=0.05)


def test_warm_start_is_the_plan_shifted() -> None:
    cfg = pl.PlannerConfig(method="cem", horizon=4, candidates=50, elites=5, iterations=2)
    bounds = pl.Bounds(torch.tensor([0.0]), torch.tensor([2.0]))  # middle 1.0
    plan = pl.plan(
        rollout, reward, torch.tensor([[0.5]]), bounds, cfg, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(plan.mean[:, :-1], plan.actions[:, 1:])
    assert torch.equal(plan.mean[:, -1], torch.ones(1, 1))
    assert torch.equal(pl.initial_mean(bounds, 2, 4), torch.ones(2, 4, 1))


def test_cem_starts_from_the_warm_start() -> None:
    """One round with momentum 0.9 stays near a warm start far from the optimum."""
    cfg = pl.PlannerConfig(method="cem", horizon=3, candidates=100, elites=10, iterations=1, momentum=0.9)
    mean = torch.full((1, 3, 1), 0.8)
    plan = pl.cem(
        rollout, reward, torch.tensor([[0.9]]), BOUNDS, cfg, mean, generator=torch.Generator().manual_seed(0)
    )
    assert torch.all((plan.actions - 0.8).abs() < 0.2)


def test_gradient_planning_differentiates_only_the_actions() -> None:
    gain = torch.tensor(1.0, requires_grad=True)  # a model parameter

    def model(state: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return rollout(state, gain * actions, generator)

    cfg = pl.PlannerConfig(method="gradient", horizon=3, candidates=50, elites=5, iterations=2, grad_steps=20)
    plan = pl.gradient(
        model, reward, torch.tensor([[0.9]]), BOUNDS, cfg, None, generator=torch.Generator().manual_seed(0)
    )
    assert gain.grad is None and not plan.actions.requires_grad
    _, best = optimum(0.9, 3)
    assert best - value(plan.actions, torch.tensor([[0.9]])).item() < 0.005


def test_gradient_planning_uses_common_random_numbers() -> None:
    """With a noisy model the objective is one fixed function of the actions: the same noise at every call."""
    seen: list[torch.Tensor] = []

    def noisy(state: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(actions.shape, generator=generator)
        seen.append(noise)
        return rollout(state, actions + 0.1 * noise, generator)

    cfg = pl.PlannerConfig(method="gradient", grad_init="mean", horizon=3, grad_steps=4)
    pl.gradient(
        noisy, reward, torch.tensor([[0.9]]), BOUNDS, cfg, None, generator=torch.Generator().manual_seed(0)
    )
    assert len(seen) == 5 and all(torch.equal(n, seen[0]) for n in seen)


def beyond_one(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    """A termination: the episode ends on the step that takes x past 1."""
    return next_obs[..., 0] > 1


def position(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    return next_obs[..., 0]


def test_returns_stop_after_the_first_termination() -> None:
    """x: 0.6, 1.2 (ends the episode: its own reward counts), then 0.6 and inf, which earn nothing (inf gives
    0, not NaN)."""
    actions = torch.tensor([[[0.6], [0.6], [-0.6], [float("inf")]], [[0.3], [0.3], [0.3], [0.3]]])[None]
    state = torch.tensor([[0.0]])
    masked = pl.sequence_returns(rollout, position, state, actions, done=beyond_one)  # (1, 2)
    assert masked[0].tolist() == pytest.approx([0.6 + 1.2, 0.3 + 0.6 + 0.9 + 1.2])  # the second ends at t=3
    assert pl.sequence_returns(rollout, position, state, actions)[0, 0].item() == float("inf")


@pytest.mark.parametrize("method", ["cem", "mppi", "gradient"])
def test_planners_respect_termination(method: str) -> None:
    """Reward x' and termination past x = 1, from x0 = 0.5: the best plan goes to 1, stays there, and only on
    its last step, whose reward counts though it ends the episode, jumps to 2 (return 1 + 1 + 1 + 2 = 5);
    ignoring termination it runs right at full speed (1.5 + 2.5 + 3.5 + 4.5 = 12 if nothing ended)."""
    cfg = pl.PlannerConfig(
        method=method, horizon=4, candidates=500, elites=20, iterations=8, temperature=0.05
    )
    state = torch.tensor([[0.5]])

    def chosen(done: pl.DoneFn | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return pl.plan(rollout, position, state, BOUNDS, cfg, generator=g, done=done).actions

    careful = chosen(beyond_one)
    path = 0.5 + torch.cumsum(careful[0, :, 0], 0)
    assert torch.all(path[:3] <= 1) and path.sum().item() > 4.4  # staying at 0.5: 3; running: 1.5
    assert chosen(None)[0, 0, 0].item() > 0.9  # unaware of the end, the plan leaves x = 1 at once


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"elites": 500}, "elites"),
        ({"horizon": 0}, "horizon"),
        ({"momentum": 1.0}, "momentum"),
        ({"temperature": 0.0}, "temperature"),
        ({"init_std": -1.0}, "init_std"),
    ],
)
def test_bad_planner_config_names_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        pl.PlannerConfig(**values)
    assert info.value.key == key
