"""MAML-RL's TRPO outer step (``maml_rl.outer: trpo``, :mod:`metalab.rl.trpo`): conjugate gradient on a known
system, the closed-form step on a quadratic model, the Gaussian KL against torch's, the Fisher-vector product
against the explicit Hessian of the KL through the inner step (and the update's KL having that curvature), one
update on 2D navigation within the KL bound that does not lower the surrogate, a tiny bound and a rejected step,
config errors, the shipped config, and exact resume with the trainer's optimizer untouched."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from test_rl_maml_rl import CONFIG, make, meta_problem, tiny
from torch.distributions import Normal, kl_divergence

from metalab.errors import ConfigError
from metalab.experiment import load_run_config
from metalab.rl import maml_rl, trpo
from metalab.rl import policy_gradient as pg

TRPO_CONFIG = CONFIG.parent / "maml_rl_point_trpo.yaml"


def test_conjugate_gradient_solves_a_random_spd_system() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    x = trpo.conjugate_gradient(lambda v: a @ v, b, iters=30)
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-5)
    # a few iterations are only an approximation of a 12-d system: the solve above is not trivially met
    assert (trpo.conjugate_gradient(lambda v: a @ v, b, iters=3) - exact).abs().max() > 1e-3


def test_flatten_round_trips() -> None:
    tensors = [torch.randn(3, 2), torch.randn(4), torch.randn(())]
    flat = trpo.flatten(tensors)
    assert flat.shape == (11,)
    for got, want in zip(trpo.unflatten(flat, tensors), tensors, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="12 entries"):
        trpo.unflatten(torch.zeros(12), tensors)


def test_trpo_step_on_a_quadratic_model_is_the_closed_form_step() -> None:
    """A linear loss ``g . theta`` and a quadratic divergence ``(theta - theta0)^T A (theta - theta0) / 2`` (measured
    0.1% low, so the boundary step passes): the full step is taken, and it is the trust-region solution
    ``theta0 - sqrt(2 max_kl / g^T A^-1 g) A^-1 g``, split back over the two parameter tensors."""
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    params = [torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)]  # fmt: skip
    theta0 = trpo.flatten([p.detach().clone() for p in params])

    def loss_kl(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        d = trpo.flatten(values) - theta0
        return g @ trpo.flatten(values), 0.5 * d @ a @ d

    loss, kl = loss_kl(params)
    result = trpo.trpo_step(params, loss, kl, lambda v: (loss_kl(v)[0], 0.999 * loss_kl(v)[1]), max_kl=0.01,
                            cg_iters=5, damping=0.0, backtrack_ratio=0.8, max_backtracks=15)  # fmt: skip
    direction = torch.linalg.solve(a, g)
    expected = theta0 - (2 * 0.01 / (g @ direction)).sqrt() * direction
    assert result.accepted and result.backtracks == 0
    torch.testing.assert_close(trpo.flatten([p.detach() for p in params]), expected)
    assert result.kl == pytest.approx(0.999 * 0.01) and result.loss_after < result.loss_before


def test_diagonal_gaussian_kl_is_torchs() -> None:
    gen = torch.Generator().manual_seed(1)
    mean_p, mean_q = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    log_std_p, log_std_q = torch.randn(3, generator=gen) * 0.3, torch.randn(3, generator=gen) * 0.3
    expected = kl_divergence(Normal(mean_p, log_std_p.exp()), Normal(mean_q, log_std_q.exp())).sum(-1)
    torch.testing.assert_close(trpo.diagonal_gaussian_kl(mean_p, log_std_p, mean_q, log_std_q), expected)
    assert torch.equal(trpo.diagonal_gaussian_kl(mean_p, log_std_p, mean_p, log_std_p), torch.zeros(5))


# --- the Fisher-vector product through the inner step ----------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True])
def test_fisher_vector_product_is_the_hessian_of_the_kl_through_the_inner_step(first_order: bool) -> None:
    """A float64 policy (2-d observations, hidden (4,)), fixed pre- and post-update batches of 2 tasks: the
    damped product equals ``(H + damping I) v`` with ``H`` the explicit Hessian (``torch.autograd.functional``) of
    the mean KL between the adapted policies of the current and of perturbed parameters, the adapted parameters
    computed through the inner step; second order, ``H`` differs from the first-order one (the inner step's
    curvature is in it)."""
    policy, pre, post = meta_problem(seed=3, hidden=(4,))
    params = dict(policy.named_parameters())
    names, values = list(params), [p.detach() for p in params.values()]

    def adapted(flat: torch.Tensor, first: bool) -> maml_rl.Params:
        p = dict(zip(names, trpo.unflatten(flat, values), strict=True))
        return pg.inner_steps(pg.expand(p, 2), pre, 0.3, "maml", first)

    theta = trpo.flatten(values)
    old = {k: v.detach() for k, v in adapted(theta, False).items()}

    def kl(flat: torch.Tensor, first: bool) -> torch.Tensor:
        return pg.policy_kl(old, adapted(flat, first), post)

    hessian = torch.autograd.functional.hessian(lambda f: kl(f, first_order), theta)
    assert hessian.shape == (theta.numel(),) * 2 and hessian.abs().max() > 1e-2
    live = pg.inner_steps(pg.expand(params, 2), pre, 0.3, "maml", first_order)
    fvp = trpo.fisher_vector_product(pg.policy_kl(old, live, post), list(params.values()), damping=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(theta.numel(), generator=gen, dtype=torch.float64)
        torch.testing.assert_close(fvp(v), hessian @ v + 0.1 * v, rtol=1e-8, atol=1e-10)
    if not first_order:
        other = torch.autograd.functional.hessian(lambda f: kl(f, True), theta)
        assert (hessian - other).abs().max() > 1e-3


# --- one update on 2D navigation --------------------------------------------------------------------------------


def one_update(monkeypatch: pytest.MonkeyPatch, **cfg: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """Step 0 of a tiny navigation run with ``outer: trpo``: what the TRPO update saw (its batches and the
    policy before) and the metrics; the learner's policy is the updated one (``seen["ml"]``)."""
    learner = make(tiny(maml_rl={"outer": "trpo", **cfg}))
    seen: dict[str, Any] = {}
    update = maml_rl.trpo_update

    def spy(ml: maml_rl.MAMLRL, total: torch.Tensor, adapted: maml_rl.Params, pre: list, post: pg.Batch):
        seen.update(ml=ml, pre=pre, post=post, before={k: v.detach().clone() for k, v in ml.params().items()},
                    old={k: v.detach() for k, v in adapted.items()})  # fmt: skip
        return update(ml, total, adapted, pre, post)

    monkeypatch.setattr(maml_rl, "trpo_update", spy)
    loss, metrics = learner.loss(0)
    assert loss is None  # the learner stepped itself: nothing for the trainer
    return seen, metrics


def measure(seen: dict[str, Any], params: maml_rl.Params) -> tuple[float, float]:
    """Outer loss and mean KL from the sampling-time adapted policies, at policy parameters ``params``, on the
    batches of the update."""
    ml, post = seen["ml"], seen["post"]
    with torch.no_grad():
        adapted = pg.expand(params, post.obs.shape[0])
        for batch in seen["pre"]:
            adapted = pg.inner_steps(adapted, batch, ml.cfg.inner_lr, ml.cfg.objective)
        return pg.outer_loss(adapted, post).item(), pg.policy_kl(seen["old"], adapted, post).item()


@pytest.mark.parametrize("first_order", [False, True])
def test_one_update_keeps_the_kl_bound_and_improves_the_surrogate(
    monkeypatch: pytest.MonkeyPatch, first_order: bool
) -> None:
    seen, metrics = one_update(monkeypatch, first_order=first_order)
    after = {k: v.detach() for k, v in seen["ml"].params().items()}
    loss_before, kl_before = measure(seen, seen["before"])
    loss_after, kl_after = measure(seen, after)
    assert kl_before == pytest.approx(0.0, abs=1e-7)  # the sampling policy is the adapted current one
    assert metrics["train/trpo_accepted"] == 1.0 and metrics["train/line_search_steps"] < 15
    assert max((after[k] - seen["before"][k]).abs().max().item() for k in after) > 1e-3  # it moved
    assert 1e-4 < kl_after <= 0.01 + 1e-6  # within the bound, and using it
    assert kl_after == pytest.approx(metrics["train/kl"], rel=1e-4)
    assert loss_after < loss_before
    assert loss_before - loss_after == pytest.approx(metrics["train/surrogate_gain"], rel=1e-3)
    assert metrics["loss/outer"] == pytest.approx(loss_before, rel=1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_the_update_constrains_the_kl_through_the_inner_step(
    monkeypatch: pytest.MonkeyPatch, first_order: bool
) -> None:
    """The KL the update hands to :func:`metalab.rl.trpo.trpo_step` has the curvature of the adapted policies
    as functions of the initial parameters: its Fisher-vector products are those of the KL recomputed here
    through a second-order inner step (or, with ``first_order``, a first-order one), and not the other's."""
    products: list[torch.Tensor] = []
    size = sum(p.numel() for p in make(tiny()).model.parameters())
    v = torch.randn(size, generator=torch.Generator().manual_seed(0))
    step = trpo.trpo_step

    def spy(params: list, loss: torch.Tensor, kl: torch.Tensor, *args: Any, **kw: Any) -> trpo.TRPOStep:
        products.append(trpo.fisher_vector_product(kl, params, 0.0)(v))
        return step(params, loss, kl, *args, **kw)

    monkeypatch.setattr(maml_rl, "trpo_step", spy)
    seen, _ = one_update(monkeypatch, first_order=first_order)
    cfg = seen["ml"].cfg

    def product(first: bool) -> torch.Tensor:
        params = {k: v.clone().requires_grad_(True) for k, v in seen["before"].items()}
        adapted = pg.expand(params, seen["post"].obs.shape[0])
        for batch in seen["pre"]:
            adapted = pg.inner_steps(adapted, batch, cfg.inner_lr, cfg.objective, first)
        kl = pg.policy_kl(seen["old"], adapted, seen["post"])
        return trpo.fisher_vector_product(kl, list(params.values()), 0.0)(v)

    (got,) = products
    torch.testing.assert_close(got, product(first_order), rtol=1e-4, atol=1e-6)
    assert (got - product(not first_order)).abs().max() > 1e-3 * got.abs().max()


def test_a_tiny_kl_bound_rejects_the_step_or_keeps_it_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, metrics = one_update(monkeypatch, max_kl=1e-12)
    after = {k: v.detach() for k, v in seen["ml"].params().items()}
    moved = max((after[k] - seen["before"][k]).abs().max().item() for k in after)
    if metrics["train/trpo_accepted"]:
        assert moved < 1e-4 and measure(seen, after)[1] <= 1e-12 + 1e-9
    else:
        assert moved == 0.0 and metrics["train/line_search_steps"] == 15
        assert metrics["train/surrogate_gain"] == 0.0


def test_a_rejected_step_leaves_the_policy_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the full step tried (``line_search_steps: 1``): on this batch its KL, 0.01 to second order, is over
    the bound, so the step is rejected and the policy is left bit for bit as it was."""
    seen, metrics = one_update(monkeypatch, line_search_steps=1)
    after = seen["ml"].params()
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())
    assert metrics["train/trpo_accepted"] == 0.0 and metrics["train/line_search_steps"] == 1
    assert (metrics["train/surrogate_gain"], metrics["train/kl"]) == (0.0, 0.0)


# --- config, resume ---------------------------------------------------------------------------------------------


def test_config_errors_name_the_key() -> None:
    for key, value in (("outer", "sgd"), ("max_kl", -1.0), ("max_kl", 0.0), ("cg_iters", 0),
                       ("cg_damping", -0.1), ("line_search_steps", 0), ("backtrack_ratio", 1.0),
                       ("backtrack_ratio", 0.0)):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"maml_rl\.{key}"):
            tiny(maml_rl={"outer": "trpo", key: value})
    with pytest.raises(ConfigError, match=r"maml_rl\.max_kll.*did you mean 'max_kl'"):
        tiny(maml_rl={"outer": "trpo", "max_kll": 0.01})


def test_trpo_config_is_the_navigation_config_with_the_trpo_outer_step() -> None:
    adam, trpo_run = load_run_config(CONFIG), load_run_config(TRPO_CONFIG)
    assert trpo_run.params.outer == "trpo"
    assert (trpo_run.params.max_kl, trpo_run.params.cg_iters, trpo_run.params.line_search_steps) == (
        0.01,
        10,
        15,
    )
    assert trpo_run.params == dataclasses.replace(adam.params, outer="trpo")
    assert (trpo_run.env, trpo_run.train, trpo_run.eval) == (adam.env, adam.train, adam.eval)
