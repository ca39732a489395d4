"""Meta-regularization (Yin, Tucker, Zhou, Levine & Finn, "Meta-Learning without Memorization", ICLR 2020).

With non-mutually-exclusive tasks one function of the query input can solve every training task, and a
meta-learner may memorise it instead of learning from the support set. Meta-regularization limits the
information the meta-parameters (or an activation) carry, so what a task needs must come from its support set:

- on weights, (W): the meta-parameters ``theta`` get a distribution ``q(theta) = N(mean, diag(std^2))``,
  sampled by reparameterisation (``theta = mean + std * eps``), and ``beta * KL(q || p)`` joins the
  meta-training loss, ``p`` a fixed Gaussian prior (:class:`Gaussian`);
- on activations, (A): a stochastic layer ``z ~ N(mu(x), diag(sigma(x)^2))`` with ``beta * KL(q(z|x) || N(0, I))``,
  an information bottleneck on what flows from the input (:class:`GaussianBottleneck`).

Both are pure pieces: a posterior is a pair of parameter dicts (its means and its softplus-scales ``rho``,
``std = softplus(rho)``), every KL is in closed form, and noise comes from a generator the caller owns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metalab.utils import Params

MIN_STD = 1e-6
"""Floor added to a bottleneck's standard deviation, so its KL (which takes ``log std``) stays finite."""


def softplus_inverse(std: float | torch.Tensor) -> torch.Tensor:
    """``rho`` with ``softplus(rho) = std`` (``std > 0``), stable from tiny to large ``std``:
    ``rho = std + log(1 - exp(-std))``."""
    std = torch.as_tensor(std, dtype=torch.get_default_dtype())
    return std + torch.log(-torch.expm1(-std))


def gaussian_kl(
    mean_q: torch.Tensor,
    std_q: torch.Tensor,
    mean_p: torch.Tensor | float,
    std_p: torch.Tensor | float,
) -> torch.Tensor:
    """``KL(N(mean_q, std_q^2) || N(mean_p, std_p^2))`` of independent coordinates, summed: a scalar.

    Per coordinate ``log(std_p / std_q) + (std_q^2 + (mean_q - mean_p)^2) / (2 std_p^2) - 1/2``; ``p``'s
    arguments broadcast (a float prior is the same for every coordinate).
    """
    std_p = torch.as_tensor(std_p, dtype=std_q.dtype, device=std_q.device)
    # log std_p - log std_q, not the log of the squared ratio: that underflows to log(0) for a tiny std_q.
    log_ratio = std_p.log() - std_q.log()
    squares = (std_q / std_p).pow(2) + ((mean_q - mean_p) / std_p).pow(2)
    return (log_ratio + 0.5 * (squares - 1.0)).sum()


class Gaussian(NamedTuple):
    """A diagonal Gaussian over named tensors, ``q(theta) = N(mean, diag(softplus(rho)^2))``.

    ``mean`` and ``rho`` have the same keys and shapes; they may be a network's own parameters and a
    :class:`~metalab.meta.gbml.ParamTable`'s, so the posterior is trained (and checkpointed) with them.
    """

    mean: Params
    rho: Params

    @classmethod
    def around(cls, mean: Params, std: float) -> Gaussian:
        """A posterior centred on ``mean`` with every standard deviation ``std`` (a fresh ``rho``)."""
        rho = {k: torch.full_like(v, float(softplus_inverse(std))) for k, v in mean.items()}
        return cls(mean, rho)

    def std(self) -> Params:
        return {k: F.softplus(r) for k, r in self.rho.items()}

    def sample(self, generator: torch.Generator | None = None) -> Params:
        """``mean + std * eps`` with ``eps ~ N(0, I)``: differentiable in ``mean`` and ``rho``.

        ``eps`` is drawn on the CPU from ``generator`` (a fixed stream: the same draw on any device) and moved
        to the tensors' device; without a generator, from torch's global generator on that device.
        """
        out = {}
        for k, mean in self.mean.items():
            if generator is None:
                eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
            else:
                eps = torch.randn(mean.shape, dtype=mean.dtype, generator=generator).to(mean.device)
            out[k] = mean + F.softplus(self.rho[k]) * eps
        return out

    def kl(self, prior: Gaussian | float) -> torch.Tensor:
        """``KL(self || prior)`` summed over every coordinate, in closed form; ``prior`` is another
        :class:`Gaussian` with the same keys, or a float ``s`` for ``N(0, s^2 I)``."""
        if not self.mean:
            return torch.zeros(())
        total = []
        for k, mean in self.mean.items():
            std = F.softplus(self.rho[k])
            if isinstance(prior, Gaussian):
                total.append(gaussian_kl(mean, std, prior.mean[k], F.softplus(prior.rho[k])))
            else:
                total.append(gaussian_kl(mean, std, 0.0, prior))
        return torch.stack(total).sum()


class Bottleneck(NamedTuple):
    """What a :class:`GaussianBottleneck` returns: the code ``z`` and the distribution it was drawn from."""

    z: torch.Tensor  # (..., D): a sample in training, the mean otherwise
    mean: torch.Tensor  # (..., D)
    std: torch.Tensor  # (..., D)

    def kl(self) -> torch.Tensor:
        """``KL(N(mean, std^2) || N(0, I))`` summed over the D features, averaged over the examples."""
        per_coordinate = 0.5 * (self.std.pow(2) + self.mean.pow(2) - 1.0) - self.std.log()
        return per_coordinate.sum(-1).mean()


class GaussianBottleneck(nn.Module):
    """The activation form (A): ``h -> z ~ N(mu(h), diag(sigma(h)^2))`` with one linear map to ``mu`` and
    ``sigma = softplus(.) + MIN_STD``; its :meth:`Bottleneck.kl` to ``N(0, I)`` is the regularizer.

    In training mode ``z`` is a reparameterised sample (noise from ``generator``, or torch's global generator);
    in eval mode it is the mean, so evaluation is deterministic. ``sample`` overrides the mode.
    """

    def __init__(self, in_features: int, features: int):
        super().__init__()
        self.features = features
        self.project = nn.Linear(in_features, 2 * features)

    def forward(
        self, h: torch.Tensor, generator: torch.Generator | None = None, sample: bool | None = None
    ) -> Bottleneck:
        mean, pre_std = self.project(h).chunk(2, dim=-1)  # (..., D) each
        std = F.softplus(pre_std) + MIN_STD
        if not (self.training if sample is None else sample):
            return Bottleneck(mean, mean, std)
        if generator is None:
            eps = torch.randn_like(mean)
        else:
            eps = torch.randn(mean.shape, dtype=mean.dtype, generator=generator).to(mean.device)
        return Bottleneck(mean + std * eps, mean, std)
