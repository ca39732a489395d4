"""Intervals for the two kinds of averages metalab reports.

* Over many evaluation episodes (hundreds): the normal approximation, ``1.96 * s / sqrt(n)``
  (:func:`mean_ci95`).
* Over a few training seeds (typically 3): Student's t, ``t_{0.975, n-1} * s / sqrt(n)``
  (:func:`seed_interval`). With n = 3 the factor is 4.30, not 1.96: a normal interval there is less than half
  as wide as it should be. A seed aggregate always keeps its per-seed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Z95 = 1.959963984540054
"""The 0.975 quantile of the standard normal."""


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence half-width ``ci95`` over ``n`` values."""

    mean: float
    ci95: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.ci95:.4f} (n={self.n})"


@dataclass(frozen=True)
class SeedAggregate(Estimate):
    """A mean over seeds with its Student-t 95% half-width and the values it came from."""

    per_seed: list[float] = field(default_factory=list)


def mean_ci95(values: torch.Tensor | Sequence[float]) -> Estimate:
    """Mean and normal-approximation 95% CI (sample standard deviation), for many episodes.

    ``ci95`` is NaN for fewer than 2 values."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    n = v.numel()
    ci = 1.96 * v.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.nan
    return Estimate(v.mean().item(), ci, n)


def _t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function, by Simpson's rule on the density (|error| < 1e-10 for |x| <= 50)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    # The integral over [0, x] on a grid fine enough for the density's curvature near 0 (sharpest at df = 1).
    steps = max(2000, int(200 * x)) * 2
    h = x / steps
    total = _t_density(0.0, df) + _t_density(x, df)
    total += 4 * sum(_t_density((2 * i - 1) * h, df) for i in range(1, steps // 2 + 1))
    total += 2 * sum(_t_density(2 * i * h, df) for i in range(1, steps // 2))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile takes 0.5 <= p < 1, got {p}")
    if df == 1:  # Cauchy: closed form, and the only case whose quantiles run far out
        return math.tan(math.pi * (p - 0.5))
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def seed_interval(values: Sequence[float]) -> SeedAggregate:
    """Mean over seeds with the Student-t 95% half-width ``t_{0.975, n-1} * s / sqrt(n)`` (NaN for one seed)."""
    per_seed = [float(v) for v in values]
    n = len(per_seed)
    if n == 0:
        raise ValueError("seed_interval needs at least one value")
    mean = sum(per_seed) / n
    if n == 1:
        return SeedAggregate(mean, math.nan, 1, per_seed)
    s = math.sqrt(sum((v - mean) ** 2 for v in per_seed) / (n - 1))
    return SeedAggregate(mean, t_quantile(0.975, n - 1) * s / math.sqrt(n), n, per_seed)
