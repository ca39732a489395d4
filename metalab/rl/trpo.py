"""The constrained step of trust-region policy optimisation (Schulman, Levine, Moritz, Jordan, Abbeel, "Trust Region
Policy Optimization", ICML 2015), in generic pieces over a list of parameter tensors.

:func:`trpo_step` minimises a loss ``L(theta)`` subject to ``KL(theta) <= max_kl``, where ``KL`` is a divergence
that is 0 (and flat) at the current parameters: it solves ``(H + damping I) s = grad L`` for the search direction
by conjugate gradient (:func:`conjugate_gradient`), ``H`` the Hessian of ``KL`` reached through Hessian-vector
products (:func:`fisher_vector_product`, double backward: ``H`` is never formed), scales ``s`` to the step whose
quadratic model of ``KL`` equals ``max_kl``, and backtracks along it (:func:`line_search`) to the first step that
lowers ``L`` and keeps the measured ``KL`` within ``max_kl``; if none does, the parameters stay as they are.

This is the procedure of rllab's ``ConjugateGradientOptimizer`` (used by MAML's code for its outer step): the
same initial step size ``sqrt(2 max_kl / (s^T (H + damping I) s))``, the same acceptance test, backtracking by
a constant ratio. What a caller supplies: the loss and the divergence as differentiable scalars at the current
parameters, and a function that measures both at candidate parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

Evaluate = Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""Loss and divergence ``(L, KL)`` at candidate parameters (tensors shaped like the parameters)."""


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' entries in one vector, in order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split ``vector`` into tensors shaped like ``like`` (the inverse of :func:`flatten`)."""
    out, start = [], 0
    for t in like:
        out.append(vector[start : start + t.numel()].view_as(t))
        start += t.numel()
    if start != vector.numel():
        raise ValueError(f"a vector of {vector.numel()} entries for tensors of {start}")
    return out


def conjugate_gradient(
    fvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, residual_tol: float = 1e-10
) -> torch.Tensor:
    """An approximate solution ``x`` of ``A x = b`` for a symmetric positive definite ``A`` known only through
    its products ``fvp(v) = A v``: ``iters`` conjugate-gradient iterations from ``x = 0``, stopping early once the
    squared residual ``|b - A x|^2`` is at most ``residual_tol``."""
    x = torch.zeros_like(b)
    r = b.clone()  # the residual b - A x
    p = b.clone()  # the search direction
    rr = r @ r
    for _ in range(iters):
        if rr <= residual_tol:
            break
        ap = fvp(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fisher_vector_product(
    kl: torch.Tensor, params: Sequence[torch.Tensor], damping: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> (H + damping I) v`` on flat vectors, ``H`` the Hessian of the scalar ``kl`` with respect to
    ``params`` (at a minimum of ``kl``, the Fisher information): one backward with ``create_graph`` now, then one
    backward of ``grad(kl) . v`` per product (the graph is kept for the next)."""
    grads = torch.autograd.grad(kl, params, create_graph=True, materialize_grads=True)
    flat_grad = flatten(grads)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        if not flat_grad.requires_grad:  # kl does not reach the parameters twice: H = 0
            return damping * v
        hv = torch.autograd.grad(flat_grad @ v, params, retain_graph=True, materialize_grads=True)
        return flatten(hv) + damping * v

    return fvp


def line_search(
    evaluate: Callable[[torch.Tensor], tuple[float, float]],
    start: torch.Tensor,
    step: torch.Tensor,
    loss_before: float,
    max_kl: float,
    ratio: float,
    tries: int,
) -> tuple[int, float, float] | None:
    """The first of ``start - ratio^i step`` (``i = 0 .. tries - 1``) whose ``(loss, kl) = evaluate(candidate)``
    has ``loss < loss_before`` and ``kl <= max_kl``, as ``(i, loss, kl)``; None if there is none (a NaN fails)."""
    for i in range(tries):
        loss, kl = evaluate(start - ratio**i * step)
        if loss < loss_before and kl <= max_kl:
            return i, loss, kl
    return None


class TRPOStep(NamedTuple):
    """What one :func:`trpo_step` did."""

    accepted: bool
    """Whether the parameters moved (a step passed the line search)."""
    backtracks: int
    """Step-size reductions before the accepted step (0: the full step); the number tried if none passed."""
    loss_before: float
    """The loss at the current parameters."""
    loss_after: float
    """The loss at the parameters the step ends with (``loss_before`` if rejected)."""
    kl: float
    """The divergence at the parameters the step ends with (its value at the current ones if rejected)."""


def trpo_step(
    params: Sequence[torch.Tensor],
    loss: torch.Tensor,
    kl: torch.Tensor,
    evaluate: Evaluate,
    *,
    max_kl: float,
    cg_iters: int,
    damping: float,
    backtrack_ratio: float,
    max_backtracks: int,
) -> TRPOStep:
    """One constrained update of the leaf tensors ``params`` (in place, without autograd): minimise ``loss``
    subject to ``kl <= max_kl``, both scalars computed from ``params`` with their graphs. ``evaluate(candidate)``
    gives both at candidate parameters (it is called without autograd).

    The direction solves ``(H + damping I) s = grad loss`` by ``cg_iters`` conjugate-gradient iterations, ``H``
    the Hessian of ``kl``; the full step is ``sqrt(2 max_kl / (s^T (H + damping I) s)) s`` (rllab's, 1 if that is
    not finite); the line search tries ``max_backtracks`` step sizes, shrinking by ``backtrack_ratio``, and takes
    the first that lowers the loss and keeps ``kl`` within ``max_kl``; if none does, ``params`` are unchanged.
    """
    params = list(params)
    grad = flatten(torch.autograd.grad(loss, params, retain_graph=True, materialize_grads=True))
    fvp = fisher_vector_product(kl, params, damping)
    direction = conjugate_gradient(fvp, grad, cg_iters)
    curvature = float(direction @ fvp(direction))
    scale = math.sqrt(2 * max_kl / (curvature + 1e-8)) if curvature + 1e-8 > 0 else math.nan
    step = (scale if math.isfinite(scale) else 1.0) * direction.detach()
    loss_before, kl_before = loss.item(), kl.item()
    with torch.no_grad():
        start = flatten([p.detach() for p in params])

        def measure(candidate: torch.Tensor) -> tuple[float, float]:
            loss_at, kl_at = evaluate(unflatten(candidate, params))
            return float(loss_at), float(kl_at)

        found = line_search(measure, start, step, loss_before, max_kl, backtrack_ratio, max_backtracks)
        if found is None:
            return TRPOStep(False, max_backtracks, loss_before, loss_before, kl_before)
        i, loss_after, kl_after = found
        for p, value in zip(params, unflatten(start - backtrack_ratio**i * step, params), strict=True):
            p.copy_(value)
    return TRPOStep(True, i, loss_before, loss_after, kl_after)


def diagonal_gaussian_kl(
    mean_p: torch.Tensor, log_std_p: torch.Tensor, mean_q: torch.Tensor, log_std_q: torch.Tensor
) -> torch.Tensor:
    """``KL(p || q)`` of diagonal Gaussians ``p = N(mean_p, exp(log_std_p)^2)`` and ``q`` likewise, summed over the
    last dimension (the arguments broadcast): ``sum log(s_q / s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2``."""
    var_ratio = torch.exp(2 * (log_std_p - log_std_q))
    mahalanobis = (mean_p - mean_q) ** 2 * torch.exp(-2 * log_std_q)
    return (log_std_q - log_std_p + 0.5 * (var_ratio + mahalanobis - 1)).sum(-1)
