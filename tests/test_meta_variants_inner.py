"""The inner loops of ANIL, CAVIA and MAML++, and every variant on a tiny Conv-4 episode (vmap vs loop)."""

from __future__ import annotations

import functools
import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gbml_helpers import (
    D,
    conv4_problem,
    grads_of,
    graph_size,
    one_task_batch,
    requiring_grad,
    tiny_problem,
    variant_run,
)
from torch import nn

from metalab.data.sinusoid import SinusoidTasks
from metalab.errors import ConfigError
from metalab.meta import anil, cavia, gbml, imaml, mamlpp, metasgd, reptile
from metalab.meta.adapt import Params, adapt
from metalab.models import Conv4

# --------------------------------------------------------------------------------------------- ANIL


def test_anil_adapts_the_head_only_and_matches_full_model_adaptation() -> None:
    model, params, (xs, ys, _, _) = tiny_problem(2)
    adapted = anil.adapt_task(gbml.Inner(model, True, 0.3, 3), params, xs, ys)
    for k in params:
        if k.startswith("head."):
            assert not torch.equal(adapted[k], params[k]), k
        else:
            assert adapted[k] is params[k], k
    # The same as adapting the head through the whole model (ANIL only caches the body's embedding).
    body = {k: v for k, v in params.items() if not k.startswith("head.")}

    def head_loss(head: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gbml.task_loss(model, True, {**body, **head}, x, y)

    head = adapt({k: params[k] for k in ("head.weight", "head.bias")}, head_loss, (xs, ys), 3, 0.3)
    for k, v in head.items():
        torch.testing.assert_close(adapted[k], v, rtol=1e-12, atol=1e-14)


def test_anil_refuses_a_model_without_head() -> None:
    params = dict(Conv4(1, 4, image_size=16).named_parameters())  # an embedding network: no head
    with pytest.raises(ConfigError) as info:
        anil.split_head(params)
    assert info.value.key == "anil" and "head" in str(info.value)


# -------------------------------------------------------------------------------------------- CAVIA


def test_cavia_context_starts_at_zero_and_network_is_untouched() -> None:
    torch.manual_seed(0)
    model = cavia.ContextMLP(1, 3, (8,), 1).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = {k: v.clone() for k, v in params.items()}
    ep = SinusoidTasks(5, 5, seed=0).sample(0, 3)
    sx, sy = ep.support_x.double(), ep.support_y.double()
    inner = gbml.Inner(model, True, 0.5, 2)
    assert torch.equal(
        cavia.adapt_context(replace(inner, steps=0), params, sx[0], sy[0]), torch.zeros(3, dtype=D)
    )
    contexts = [cavia.adapt_context(inner, params, sx[t], sy[t]) for t in range(3)]
    assert all(float(c.abs().sum()) > 0 for c in contexts)
    # Each task starts from zero whatever was adapted before it: task 2 alone gives the same context.
    torch.testing.assert_close(cavia.adapt_context(inner, params, sx[2], sy[2]), contexts[2])
    assert all(torch.equal(params[k], before[k]) for k in params)
    # The outer gradient reaches every network weight through the adapted context.
    leaves = requiring_grad(params)
    loss = cavia.query_loss(
        replace(inner, steps=1), leaves, sx[0], sy[0], ep.query_x[0].double(), ep.query_y[0].double()
    )[0]
    assert all(float(g.abs().sum()) > 0 for g in grads_of(loss, leaves).values())


def test_cavia_film_with_zero_context_is_plain_conv4() -> None:
    torch.manual_seed(0)
    model = cavia.ContextConv4(5, 4, 3, 16).double()
    x = torch.rand(6, 1, 16, 16, dtype=D)
    torch.testing.assert_close(model(x, torch.zeros(5, dtype=D)), model.net(x))
    assert not torch.allclose(model(x, torch.ones(5, dtype=D)), model.net(x))


# -------------------------------------------------------------------------------------------- MAML++


def test_mamlpp_multi_step_loss_weights_sum_to_one_and_anneal() -> None:
    cfg = mamlpp.Config(inner_steps=5, msl_epochs=4, epoch_steps=10)
    weights = [mamlpp.msl_weights(step, cfg) for step in range(0, 60, 5)]
    for w in weights:
        assert w.shape == (5,) and abs(float(w.sum()) - 1) < 1e-6 and bool((w >= 0).all())
    torch.testing.assert_close(weights[0], torch.full((5,), 0.2))
    last = [float(w[-1]) for w in weights]
    assert all(b > a for a, b in itertools.pairwise(last[:9]))  # rises while annealing (40 steps) ...
    assert last[8:] == [1.0] * 4  # ... then the last step alone
    assert float(mamlpp.msl_weights(0, mamlpp.Config(msl_epochs=0))[-1]) == 1.0


def test_mamlpp_per_step_batchnorm_and_rates_learn() -> None:
    model, ep = conv4_problem()
    pp = mamlpp.MAMLPlusPlusModel(model, inner_steps=2, inner_lr=0.1).double()
    meta = pp.meta()
    assert all(v.shape == (2,) for v in meta["lr"].values())
    assert all(v.shape[0] == 3 for v in meta["bn"].values())  # a BatchNorm set per step 0..2
    assert not set(meta["bn"]) & set(meta["weights"])
    losses, _ = mamlpp.step_losses(gbml.Inner(model, False, 0.1, 2), meta, *ep.task(0)[:4])
    assert losses.shape == (2,)
    losses.sum().backward()
    trained = pp.trained()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trained)
    assert len(trained) == len(list(pp.parameters())) - len(
        meta["bn"]
    )  # the net's own BN weights are shadowed


def test_mamlpp_anneals_derivative_order(sinusoid_config, tmp_path: Path) -> None:
    run = variant_run(sinusoid_config, "mamlpp", inner_steps=2, first_order_steps=3, mlp_hidden=[8])
    learner = mamlpp.build(run, tmp_path, torch.device("cpu"))
    first, second = learner.loss(2)[0], learner.loss(3)[0]  # step 2: first order; step 3: second order
    assert graph_size(second) > graph_size(first)


# --------------------------------------------------------------------------- every variant on Conv-4


def imaml_loss(model: nn.Module, params: Params, task: tuple[torch.Tensor, ...]) -> torch.Tensor:
    cfg = imaml.Config(inner_steps=2, cg_steps=2)
    inner = imaml.Proximal(model, False, cfg.inner_lr, cfg.inner_steps, lam=cfg.lam, cg_steps=cfg.cg_steps)
    g, loss, _ = imaml.implicit_gradient(inner, params, *task)
    return imaml.surrogate(params, one_task_batch(g), loss[None])


def reptile_loss(model: nn.Module, params: Params, task: tuple[torch.Tensor, ...]) -> torch.Tensor:
    cfg = reptile.Config(inner_lr=0.1)
    phi, _ = reptile.adapt_task(gbml.Inner(model, False, cfg.inner_lr, cfg.inner_steps), params, *task)
    return reptile.surrogate(params, one_task_batch(phi))


def test_every_variant_runs_on_conv4() -> None:
    """Each variant's per-task training loss on a tiny Omniglot-like episode: finite, and its gradient
    reaches every trained parameter (but the conv biases in front of BatchNorm, whose gradient is zero)."""
    model, ep = conv4_problem()
    params = dict(model.named_parameters())
    task = ep.task(0)[:4]
    sgd = metasgd.MetaSGDModel(model, 0.1).double()
    film = cavia.ContextConv4(4, 4, 3, 16).double()
    film_params = dict(film.named_parameters())
    cases = {
        "metasgd": (
            lambda: metasgd.query_loss(gbml.Inner(model, False, 0.1, 1), sgd.meta(), *task)[0],
            sgd.parameters(),
        ),
        "anil": (
            lambda: anil.query_loss(gbml.Inner(model, False, 0.4, 1), params, *task)[0],
            params.values(),
        ),
        "cavia": (
            lambda: cavia.query_loss(gbml.Inner(film, False, 1.0, 1), film_params, *task)[0],
            film.parameters(),
        ),
        "imaml": (lambda: imaml_loss(model, params, task), params.values()),
        "reptile": (lambda: reptile_loss(model, params, task), params.values()),
    }
    for name, (loss_fn, trained) in cases.items():
        trained = list(trained)
        loss = loss_fn()
        assert torch.isfinite(loss), name
        grads = torch.autograd.grad(loss, trained, allow_unused=True)
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), name
        conv_biases = sum(
            name.endswith(".0.bias") and "features" in name for name, _ in model.named_parameters()
        )
        assert sum(float(g.abs().sum()) > 0 for g in grads) >= len(trained) - conv_biases * 2, name


def test_anil_vmap_equals_loop_through_batchnorm() -> None:
    """ANIL never differentiates twice through BatchNorm, so vmap is exact for it even at second order."""
    model, ep = conv4_problem()
    params = requiring_grad(dict(model.named_parameters()))
    per_task = functools.partial(anil.query_loss, gbml.Inner(model, False, 0.4, 2))
    results = []
    for mode in ("vmap", "loop"):
        losses, _ = gbml.map_tasks(per_task, ep, gbml.TaskBatching(mode), params)
        results.append((losses, torch.autograd.grad(losses.mean(), list(params.values()))))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_imaml_vmap_equals_loop_through_batchnorm() -> None:
    """iMAML's Hessian-vector products differentiate twice through the Conv-4's BatchNorm: vmap, now allowed
    there, gives the loop's implicit gradients."""
    model, ep = conv4_problem()
    params = dict(model.named_parameters())
    cfg = imaml.Config(inner_steps=2, cg_steps=2, batching="vmap")
    assert gbml.task_batching("imaml", cfg, model, second_order=True).mode == "vmap"
    inner = imaml.Proximal(model, False, cfg.inner_lr, cfg.inner_steps, lam=cfg.lam, cg_steps=cfg.cg_steps)
    per_task = functools.partial(imaml.implicit_gradient, inner)
    (gv, lv, _), (gl, ll, _) = (
        gbml.map_tasks(per_task, ep, gbml.TaskBatching(mode), gbml.detached(params))
        for mode in ("vmap", "loop")
    )
    torch.testing.assert_close(lv, ll)
    for k in params:
        torch.testing.assert_close(gv[k], gl[k], rtol=1e-7, atol=1e-9, msg=k)


def test_batching_refusals_and_auto_for_second_order_variants() -> None:
    """torch's own BatchNorm is refused under vmap at second order (pytorch/functorch#534), not at first;
    ``auto`` loops over a Conv-4 on a CPU and vmaps an MLP."""
    model, _ = conv4_problem()
    for block in model.features:
        block[1] = nn.BatchNorm2d(block[1].num_features, track_running_stats=False).double()
    with pytest.raises(ConfigError) as info:
        gbml.task_batching("imaml", imaml.Config(batching="vmap"), model, second_order=True)
    assert info.value.key == "imaml.batching"
    assert gbml.task_batching("reptile", reptile.Config(batching="vmap"), model, second_order=False).vmapped
    auto = imaml.Config(batching="auto")
    assert gbml.task_batching("imaml", auto, model, second_order=True).mode == "loop"  # auto loops over convs
    mlp = cavia.ContextMLP(1, 2, (4,), 1)
    assert gbml.task_batching("cavia", cavia.Config(), mlp, second_order=True).mode == "vmap"


def test_mse_of_outputs_is_the_regression_score() -> None:
    out, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
    assert float(gbml.output_score(out, y, True)) == float(F.mse_loss(out, y)) == 2.5
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert float(gbml.output_score(logits, torch.tensor([0, 0, 0]), False)) == pytest.approx(2 / 3)
