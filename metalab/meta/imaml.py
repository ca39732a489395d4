"""iMAML: meta-learning with implicit gradients (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019).

Each task adapts by (approximately) solving the proximal problem
``phi* = argmin_phi L_support(phi) + lambda/2 ||phi - theta||^2`` with ``inner_steps`` gradient steps from
``theta`` (monotone: see :func:`inner_solve`), computed WITHOUT a graph through them. At the optimum,
``d phi*/d theta = (I + H/lambda)^-1`` with ``H`` the support-loss Hessian at ``phi*``, so the meta-gradient of
the query loss is the solution ``g`` of

    (I + H / lambda) g = grad L_query(phi*)

found by ``cg_steps`` of conjugate gradient with Hessian-vector products (never the Hessian itself). Memory is
that of a few gradients, whatever ``inner_steps`` is.

How it meets the trainer: the trainer minimises a loss by backward, so ``g`` is handed over as the gradient of
the surrogate ``sum(theta * stopgrad(g))`` (averaged over tasks), whose gradient in ``theta`` is exactly ``g``
(shifted to read as the query loss; see :func:`surrogate`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call, grad, grad_and_value

from metalab.config import MAX_INNER_STEPS, require, require_between
from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, hvp
from metalab.meta.gbml import Inner, output_loss, output_score
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """iMAML hyperparameters (the ``imaml`` section)."""

    inner_steps: int = 10
    """Gradient steps on the proximal objective per task (the meta-gradient assumes they reach its minimum)."""
    lam: float = 1.0
    """Proximal strength lambda: how strongly adaptation is tied to the initialisation (keep ``inner_lr * lam``
    well below 2, or the proximal pull alone overshoots)."""
    cg_steps: int = 5
    """Conjugate-gradient iterations for the implicit meta-gradient."""
    cg_damping: float = 0.0
    """Solve ``((1 + cg_damping) I + H / lambda) g = grad`` instead of the exact system (0: the paper's). Where the
    support-loss Hessian has a direction of curvature near ``-lambda``, the exact system is near-singular and
    its solution explodes along it; damping bounds the gain ``|g| / |grad|`` by ``1 / cg_damping`` whenever the
    curvature is above ``-lambda``. The authors' code (imaml_dev) damps by 1 (and adds 10 to lambda there)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lam > 0, "lam", "must be > 0")
        require(self.cg_damping >= 0, "cg_damping", "must be >= 0")
        require_between(self.cg_steps, "cg_steps", 1, MAX_INNER_STEPS)


@dataclass(frozen=True, kw_only=True)
class Proximal(Inner):
    """iMAML's inner loop: :class:`~metalab.meta.gbml.Inner`'s network, rate and steps (``first_order`` is
    not read: no graph is ever built through the steps), and the two settings of the implicit meta-gradient."""

    lam: float
    """Proximal strength lambda (``Config.lam``)."""
    cg_steps: int
    """Conjugate-gradient iterations (``Config.cg_steps``)."""
    cg_damping: float = 0.0
    """Added to the identity of the CG system (``Config.cg_damping``)."""


def proximal_loss(
    inner: Proximal, theta: Params, params: Params, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``L(params) + lam/2 ||params - theta||^2``: the task loss kept near the initialisation ``theta``."""
    distance = sum((params[k] - theta[k]).pow(2).sum() for k in params)
    return inner.loss(params, x, y) + 0.5 * inner.lam * distance


def inner_solve(inner: Proximal, theta: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
    """``inner.steps`` steps of monotone gradient descent on the proximal objective from ``theta``, which must
    be detached: no graph is built through them.

    A step that would raise the objective (or make it non-finite) is rejected and that task's step size halved.
    Why: the implicit meta-gradient only needs ``phi`` near the proximal minimum, whatever the solver, but
    unlike MAML it does not differentiate through the steps, so nothing keeps the initialisation's curvature
    below ``2 / inner_lr``. On sinusoid, plain fixed-step GD measured curvature 260-530 (above 2/0.01 = 200)
    after 465 meta-steps and diverged to NaN on some tasks. Costs one extra forward pass per step; works
    under ``vmap`` (the test is a ``torch.where``, the step size a per-task tensor).
    """
    objective = functools.partial(proximal_loss, inner, theta)
    gradient_and_value = grad_and_value(objective)
    phi = theta
    lr = torch.full((), inner.lr, dtype=support_x.dtype, device=support_x.device)
    for _ in range(inner.steps):
        g, value = gradient_and_value(phi, support_x, support_y)
        candidate = {k: phi[k] - lr * g[k] for k in phi}
        better = objective(candidate, support_x, support_y) <= value  # False for NaN too
        phi = {k: torch.where(better, candidate[k], phi[k]) for k in phi}
        lr = torch.where(better, lr, lr / 2)
    return phi


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _scale(alpha: float, x: Params) -> Params:
    return x if alpha == 1.0 else {k: alpha * v for k, v in x.items()}


def _axpy(alpha: torch.Tensor | float, x: Params, y: Params) -> Params:
    """``alpha * x + y``."""
    return {k: alpha * x[k] + y[k] for k in y}


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, iterations: int) -> Params:
    """Approximately solve ``A x = b`` for symmetric ``A`` given as ``matvec``, by CG from ``x = 0``.

    Truncated (Steihaug's rule): ``A = I + H/lambda`` need not be positive definite, since the Hessian of a
    nonconvex loss can outweigh ``lambda``; along a direction of non-positive curvature a CG step is
    meaningless (it diverges), so the iteration stops there and keeps ``x``. It also stops once the residual
    is exactly zero. Stopping is a mask, not a ``break``, so the function works under ``vmap``.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)  # residual b - A x
    p = dict(b)  # search direction
    rr = _dot(r, r)
    active = rr > 0
    for _ in range(iterations):
        ap = matvec(p)
        curvature = _dot(p, ap)
        active = active & (curvature > 0)
        alpha = torch.where(active, rr / curvature, 0.0)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / rr, 0.0)
        active = active & (rr_new > 0)
        p = _axpy(beta, p, r)
        rr = rr_new
    return x


def implicit_gradient(
    inner: Proximal,
    theta: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """One task: the implicit meta-gradient ``g`` of the query loss in ``theta``, and the query loss and score at
    the adapted weights ``phi``."""
    theta = {k: v.detach() for k, v in theta.items()}
    phi = inner_solve(inner, theta, support_x, support_y)
    v = grad(inner.loss)(phi, query_x, query_y)

    def matvec(u: Params) -> Params:  # ((1 + damping) I + H/lambda) u, H: the support loss's Hessian at phi
        return _axpy(
            1.0 / inner.lam, hvp(inner.loss, phi, u, support_x, support_y), _scale(1.0 + inner.cg_damping, u)
        )

    g = conjugate_gradient(matvec, v, inner.cg_steps)
    out = functional_call(inner.model, phi, (query_x,))
    return g, output_loss(out, query_y, inner.regression), output_score(out, query_y, inner.regression)


def surrogate(theta: Params, g: Params, query_losses: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient in ``theta`` is ``mean_t g_t`` (the task dimension leads ``g``) and whose value is the
    mean query loss at the adapted weights, so that ``train/loss`` reads as it does for MAML."""
    tasks = query_losses.shape[0]
    linear = sum((theta[k] * g[k].detach()).sum() for k in theta) / tasks
    return linear - linear.detach() + query_losses.detach().mean()


def predict(
    inner: Proximal, theta: Params, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Test-time adaptation is the same proximal inner loop, with ``inner.steps`` steps."""
    phi = inner_solve(inner, theta, support_x, support_y)
    return functional_call(inner.model, phi, (x,))


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, surrogate training loss and evaluation for an iMAML run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    model = gbml.network(run, cfg).to(device)
    # The Hessian-vector products differentiate twice: torch's own BatchNorm is refused under vmap (task_batching).
    batching = gbml.task_batching(run.algo, cfg, model, second_order=True)
    inner = Proximal(
        model,
        regression,
        cfg.inner_lr,
        cfg.inner_steps,
        lam=cfg.lam,
        cg_steps=cfg.cg_steps,
        cg_damping=cfg.cg_damping,
    )
    per_task = functools.partial(implicit_gradient, inner)
    score = "mse" if regression else "acc"

    params = gbml.params_of(model)

    def train_loss(step: int, ep: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        theta = params()
        # g[k]: (T, *theta[k].shape), one implicit gradient per task
        g, losses, scores = gbml.map_tasks(per_task, ep, batching, gbml.detached(theta))
        return surrogate(theta, g, losses), {f"train/{score}": scores.mean().item()}

    return gbml.build_learner(
        run,
        root,
        device,
        model=model,
        meta=params,
        train_loss=train_loss,
        predict=predict,
        inner=inner,
        batching=batching,
    )
