"""The MAML variants against closed forms and by hand: Hessian-vector products, iMAML's implicit gradient,
Reptile's direction and Meta-SGD's rate gradients (the inner loops of ANIL, CAVIA and MAML++ are in
test_meta_variants_inner.py)."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gbml_helpers import (
    D,
    finite_difference,
    flat,
    grads_of,
    graph_size,
    one_task_batch,
    requiring_grad,
    tiny_problem,
    unflat,
    variant_run,
)
from torch import nn
from torch.autograd.functional import hessian

from metalab.data.sinusoid import SinusoidTasks
from metalab.errors import ConfigError
from metalab.meta import gbml, imaml, metasgd, reptile
from metalab.meta.adapt import Params, adapt, hvp
from metalab.models import MLP

# -------------------------------------------------------------------------------------------- hvp


def test_hvp_equals_explicit_hessian_times_vector() -> None:
    model, params, (xs, ys, _, _) = tiny_problem()
    loss_fn = functools.partial(gbml.task_loss, model, True)
    H = hessian(lambda vec: loss_fn(unflat(vec, params), xs, ys), flat(params))  # (P, P)
    v = torch.randn(H.shape[0], dtype=D)
    torch.testing.assert_close(flat(hvp(loss_fn, params, unflat(v, params), xs, ys)), H @ v)


def test_hvp_through_relu_mlp_and_mse() -> None:
    """jvp-of-grad breaks inside F.mse_loss's backward in torch 2.13; hvp must not."""
    torch.manual_seed(0)
    model = MLP(1, (5, 5), 1).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(7, 1, dtype=D), torch.randn(7, 1, dtype=D)
    loss_fn = functools.partial(gbml.task_loss, model, True)
    H = hessian(lambda vec: loss_fn(unflat(vec, params), x, y), flat(params))
    v = torch.randn(H.shape[0], dtype=D)
    torch.testing.assert_close(flat(hvp(loss_fn, params, unflat(v, params), x, y)), H @ v)


# ------------------------------------------------------------------------------------------- iMAML


def linear_problem(
    lam: float,
) -> tuple[nn.Module, Params, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Linear regression (d=3 + bias): the proximal inner problem has the closed-form minimiser
    ``phi* = (A + lam I)^-1 (b + lam theta)`` with ``A = 2/n X^T X``, ``b = 2/n X^T y`` (X with a ones column)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}  # weight (1, 3), bias (1,)
    xs, xq = torch.randn(8, 3, dtype=D), torch.randn(6, 3, dtype=D)
    ys, yq = torch.randn(8, 1, dtype=D), torch.randn(6, 1, dtype=D)
    X = torch.cat([xs, torch.ones(8, 1, dtype=D)], 1)  # (n, 4)
    A, b = 2 / 8 * X.T @ X, 2 / 8 * X.T @ ys[:, 0]
    return model, params, (xs, ys, xq, yq), A, b


def test_imaml_implicit_gradient_is_the_exact_closed_form() -> None:
    lam = 0.7
    model, params, (xs, ys, xq, yq), A, b = linear_problem(lam)
    theta = flat(params)  # [w, bias], matching X's column order
    eye = torch.eye(4, dtype=D)
    phi = torch.linalg.solve(A + lam * eye, b + lam * theta)
    Xq = torch.cat([xq, torch.ones(6, 1, dtype=D)], 1)
    grad_query = 2 / 6 * Xq.T @ (Xq @ phi - yq[:, 0])
    # d phi*/d theta = lam (A + lam I)^-1 = (I + A/lam)^-1, symmetric: the meta-gradient is it times grad_query.
    expected = torch.linalg.solve(eye + A / lam, grad_query)

    # Enough proximal GD steps to converge, and CG steps >= dimension: exact in exact arithmetic.
    cfg = imaml.Config(inner_lr=0.1, inner_steps=500, lam=lam, cg_steps=4)
    inner = imaml.Proximal(model, True, cfg.inner_lr, cfg.inner_steps, lam=cfg.lam, cg_steps=cfg.cg_steps)
    g, loss, _ = imaml.implicit_gradient(inner, params, xs, ys, xq, yq)
    torch.testing.assert_close(flat(imaml.inner_solve(replace(inner, steps=500), params, xs, ys)), phi)
    # phi is exact to about sqrt(float64 eps) = 1e-8: the solver accepts a step by comparing objective values,
    # and closer to the minimum their difference is below float64 resolution.
    torch.testing.assert_close(flat(g), expected, rtol=1e-6, atol=1e-8)
    assert (expected - grad_query).norm() > 0.05 * grad_query.norm()  # the implicit correction matters here
    # The surrogate hands g to the trainer as a gradient, and reads as the query loss.
    leaves = requiring_grad(params)
    sur = imaml.surrogate(leaves, one_task_batch(g), loss[None])
    torch.testing.assert_close(float(sur.detach()), float(loss))
    torch.testing.assert_close(flat(grads_of(sur, leaves)), flat(g), rtol=1e-12, atol=1e-14)
    # Damped: ((1 + d) I + A / lam) g = grad_query, at the same adapted weights.
    damped, _, _ = imaml.implicit_gradient(replace(inner, cg_damping=0.5), params, xs, ys, xq, yq)
    torch.testing.assert_close(
        flat(damped), torch.linalg.solve(1.5 * eye + A / lam, grad_query), rtol=1e-6, atol=1e-8
    )
    assert (flat(damped) - flat(g)).norm() > 0.1 * flat(g).norm()


def test_imaml_damping_is_validated() -> None:
    with pytest.raises(ConfigError, match="cg_damping"):
        imaml.Config(cg_damping=-0.1)


def test_conjugate_gradient_solves_and_stops_at_negative_curvature() -> None:
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=D)
    spd = m @ m.T + 0.5 * torch.eye(5, dtype=D)
    b = {"x": torch.randn(5, dtype=D)}
    x = imaml.conjugate_gradient(lambda u: {"x": spd @ u["x"]}, b, 5)
    torch.testing.assert_close(x["x"], torch.linalg.solve(spd, b["x"]))
    # Extra iterations after convergence (zero residual) change nothing and make no NaN.
    torch.testing.assert_close(imaml.conjugate_gradient(lambda u: {"x": spd @ u["x"]}, b, 12)["x"], x["x"])
    # A negative-definite operator: CG stops at once rather than stepping to infinity.
    stopped = imaml.conjugate_gradient(lambda u: {"x": -spd @ u["x"]}, b, 5)
    assert torch.equal(stopped["x"], torch.zeros(5, dtype=D))


def test_imaml_memory_does_not_grow_with_inner_steps(sinusoid_config, tmp_path: Path) -> None:
    sizes = {}
    for steps in (2, 12):
        run = variant_run(sinusoid_config, "imaml", inner_steps=steps, mlp_hidden=[8])
        loss, _ = imaml.build(run, tmp_path, torch.device("cpu")).loss(0)
        sizes[steps] = graph_size(loss)
    assert sizes[2] == sizes[12] < 30, sizes


# ------------------------------------------------------------------------------------------ Reptile


def test_reptile_surrogate_gradient_is_theta_minus_adapted(sinusoid_config, tmp_path: Path) -> None:
    run = variant_run(sinusoid_config, "reptile", inner_steps=3, inner_lr=0.05, mlp_hidden=[8])
    learner = reptile.build(run, tmp_path, torch.device("cpu"))
    loss, metrics = learner.loss(2)
    assert set(metrics) == {"train/mse"}
    loss.backward()
    model = learner.model
    theta = {k: v.detach() for k, v in model.named_parameters()}
    ep = SinusoidTasks(run.task.shots, run.task.queries, seed=run.seed).sample(2, run.train.meta_batch)
    loss_fn = functools.partial(gbml.task_loss, model, True)
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(ep.tasks):
        sx, sy, qx, qy = ep.task(t)[:4]
        phi = adapt(theta, loss_fn, (torch.cat([sx, qx]), torch.cat([sy, qy])), 3, 0.05)
        for k in theta:
            expected[k] += (theta[k] - phi[k]) / ep.tasks
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6)
    assert graph_size(loss) < 30  # no graph through the inner loop


# ----------------------------------------------------------------------------------------- Meta-SGD


def test_metasgd_rate_gradients_equal_finite_differences() -> None:
    model, params, task = tiny_problem(1)
    torch.manual_seed(1)
    alpha = {k: 0.1 + 0.2 * torch.rand_like(v) for k, v in params.items()}  # distinct rates per weight

    def meta_loss(theta: Params, rates: Params) -> torch.Tensor:
        inner = gbml.Inner(model, True, lr=0.0, steps=2)  # lr unused: the rates are ``alpha``
        return metasgd.query_loss(inner, {"theta": theta, "alpha": rates}, *task)[0]

    theta_l, alpha_l = requiring_grad(params), requiring_grad(alpha)
    loss = meta_loss(theta_l, alpha_l)
    both = grads_of(
        loss,
        {**{("theta", k): v for k, v in theta_l.items()}, **{("alpha", k): v for k, v in alpha_l.items()}},
    )
    g_theta = {k: both["theta", k] for k in theta_l}
    g_alpha = {k: both["alpha", k] for k in alpha_l}
    assert all(float(g.abs().sum()) > 0 for g in g_alpha.values())
    for name, index in [
        ("hidden.weight", (1, 0)),
        ("hidden.bias", 2),
        ("head.weight", (0, 3)),
        ("head.bias", 0),
    ]:
        numeric = finite_difference(lambda r: meta_loss(params, r), alpha, name, index)
        assert abs(float(g_alpha[name][index]) - numeric) < 1e-7, name
        numeric = finite_difference(lambda th: meta_loss(th, alpha), params, name, index)
        assert abs(float(g_theta[name][index]) - numeric) < 1e-7, name


def test_metasgd_learner_trains_rates_and_checkpoints_them(sinusoid_config, tmp_path: Path) -> None:
    run = variant_run(sinusoid_config, "metasgd", mlp_hidden=[8])
    learner = metasgd.build(run, tmp_path, torch.device("cpu"))
    rates = [k for k in learner.model.state_dict() if k.startswith("inner_lr.")]
    assert len(rates) == len(list(learner.model.net.parameters()))
    assert {id(p) for p in learner.parameters} == {id(p) for p in learner.model.parameters()}
    learner.loss(0)[0].backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in learner.model.inner_lr.parameters())
