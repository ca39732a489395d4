"""Neural processes for few-shot regression: the conditional NP and the latent NP.

- CNP (Garnelo, Rosenbaum, Maddison, Ramalho, Saxton, Shanahan, Teh, Rezende, Eslami, "Conditional Neural
  Processes", ICML 2018): an encoder maps each context pair ``(x_i, y_i)`` to ``r_i``; their mean ``r`` is the
  task's representation; a decoder maps ``(x, r)`` to a Gaussian ``N(mu(x), sigma(x)^2)`` over ``y``. Trained by
  the Gaussian log-likelihood of target points given the context.
- NP (Garnelo, Schwarz, Rosenbaum, Viola, Rezende, Eslami, Teh, "Neural Processes", ICML 2018 workshop on
  Theoretical Foundations and Applications of Deep Generative Models): a global latent ``z`` with an amortised
  Gaussian ``q(z | pairs)`` computed from the mean of a second encoder; the decoder sees ``(x, r, z)`` (the
  deterministic path ``r`` as in the NP baseline of Kim et al., "Attentive Neural Processes", ICLR 2019).
  Trained on the ELBO with the context posterior as prior:
  ``E_{q(z | C u T)} [sum_t log p(y_t | x_t, r_C, z)] - KL(q(z | C u T) || q(z | C))``.

Standard deviations are bounded below as in Le et al. ("Empirical Evaluation of Neural Process Objectives",
2018): ``sigma = min_std + (1 - min_std) * softplus(raw)`` for the output, ``0.1 + 0.9 * sigmoid(raw)`` for ``z``.

Training tasks take a random number of context points each step (``min_context`` to the task's ``shots``,
the same for the whole meta-batch, drawn from the step's own generator), so one model serves every K; targets
are the context and the query points together. Evaluation conditions on the task's ``shots`` support points and
scores its query points: ``mse`` of the predictive mean, ``nll`` (per point, nats) and ``coverage90``, the
fraction of query targets inside the central 90% predictive interval. For the NP the predictive is the mixture
over ``eval_samples`` draws of ``z ~ q(z | C)``: its density is averaged over the draws (log-mean-exp) and its
interval comes from quantiles of ``interval_samples`` draws of ``y``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from metalab.config import MAX_UNITS, require, require_between
from metalab.data.episodes import Episode, generator_for
from metalab.data.sinusoid import sinusoid
from metalab.data.tasks import EvalSamplers, make_sampler
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta.metareg import GaussianBottleneck, gaussian_kl
from metalab.models import MLP
from metalab.train.distributed import shard
from metalab.train.evaluate import evaluate_episode_columns
from metalab.train.loop import Learner

MAX_SAMPLES = 4_096
"""Most latent or predictive samples per evaluation point."""
Z90 = 1.6448536269514722
"""The standard normal's 95% quantile: a Gaussian's central 90% interval is ``mu +- Z90 * sigma``."""


@dataclass(frozen=True)
class Config:
    """Neural-process hyperparameters (the ``neural_process`` section); defaults follow Garnelo et al.'s 1-D
    regression (128-unit MLPs, 128-d representation and latent)."""

    model: Literal["cnp", "np"] = "cnp"
    """``cnp``: deterministic path only. ``np``: a global latent ``z`` beside it."""
    hidden: int = 128
    """Width of every hidden layer, and of the representation ``r``."""
    layers: int = 3
    """Hidden layers of each encoder and of the decoder."""
    latent_dim: int = 128
    """Width of ``z`` (``np`` only)."""
    min_std: float = 0.1
    """Lower bound of the predictive standard deviation (Le et al. 2018): keeps the likelihood from collapsing
    onto the context points."""
    min_context: int = 2
    """Fewest context points of a training task; each step draws a count from ``min_context`` to the task's
    ``shots``."""
    eval_samples: int = 32
    """``np``: draws of ``z ~ q(z | C)`` whose predictions make the predictive mixture at evaluation."""
    interval_samples: int = 256
    """``np``: draws of ``y`` from the mixture per query point for its 90% interval."""
    bottleneck: int = 0
    """MR-CNP / MR-NP, the activation form (A) of meta-regularization (Yin et al., ICLR 2020): width D of a
    Gaussian bottleneck between each target input and the decoder (sampled in training, its mean at
    evaluation), with ``bottleneck_beta * KL(q(b | x) || N(0, I))`` in the loss, so that what a task needs
    comes from the context rather than from its target inputs (on non-mutually-exclusive tasks, whose inputs
    identify the task). 0: none."""
    bottleneck_beta: float = 0.01
    """Weight of the bottleneck's KL (summed over D, averaged over target points); with ``bottleneck`` only."""

    def __post_init__(self) -> None:
        require(self.model in ("cnp", "np"), "model", f"must be cnp or np, got {self.model!r}")
        require_between(self.hidden, "hidden", 1, MAX_UNITS)
        require_between(self.layers, "layers", 1, 16)
        require_between(self.latent_dim, "latent_dim", 1, MAX_UNITS)
        require(0 < self.min_std < 1, "min_std", f"must be in (0, 1), got {self.min_std}")
        require_between(self.min_context, "min_context", 1, 10_000)
        require_between(self.eval_samples, "eval_samples", 1, MAX_SAMPLES)
        require_between(self.interval_samples, "interval_samples", 10, MAX_SAMPLES)
        require_between(self.bottleneck, "bottleneck", 0, MAX_UNITS, " (0: no bottleneck)")
        require(self.bottleneck_beta >= 0, "bottleneck_beta", f"must be >= 0, got {self.bottleneck_beta}")


class Gaussian(NamedTuple):
    mean: torch.Tensor
    std: torch.Tensor


class NeuralProcess(nn.Module):
    """Encoders and decoder of a CNP (``latent_dim`` 0) or an NP, for ``x_dim``-d inputs and 1-d targets."""

    def __init__(
        self, x_dim: int, hidden: int, layers: int, latent_dim: int, min_std: float, bottleneck: int = 0
    ):
        super().__init__()
        width = [hidden] * layers
        self.deterministic = MLP(x_dim + 1, width[:-1], hidden)
        self.latent = MLP(x_dim + 1, width[:-1], 2 * latent_dim) if latent_dim else None
        self.bottleneck = GaussianBottleneck(x_dim, bottleneck) if bottleneck else None
        self.decoder = MLP((bottleneck or x_dim) + hidden + latent_dim, width, 2)
        self.min_std = min_std

    def inputs(self, x: torch.Tensor, g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder sees of target inputs ``x``, and the bottleneck's KL (0 without one)."""
        if self.bottleneck is None:
            return x, x.new_zeros(())
        code = self.bottleneck(x, g)
        return code.z, code.kl()

    def represent(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(T, K, x_dim), (T, K, 1) -> (T, hidden)``: the mean of the pairs' encodings."""
        return self.deterministic(torch.cat([x, y], -1)).mean(1)

    def posterior(self, x: torch.Tensor, y: torch.Tensor) -> Gaussian:
        """``q(z | pairs)``: ``(T, latent_dim)`` mean and standard deviation."""
        assert self.latent is not None
        mean, raw = self.latent(torch.cat([x, y], -1)).mean(1).chunk(2, -1)
        return Gaussian(mean, 0.1 + 0.9 * torch.sigmoid(raw))

    def decode(self, x: torch.Tensor, r: torch.Tensor, z: torch.Tensor | None) -> Gaussian:
        """``p(y | x, r, z)`` at ``(T, N, .)`` target inputs (or their bottleneck codes), for ``(T, hidden)`` ``r`` and ``(T, latent)`` ``z``."""
        parts = [x, r[:, None].expand(-1, x.shape[1], -1)]
        if z is not None:
            parts.append(z[:, None].expand(-1, x.shape[1], -1))
        mean, raw = self.decoder(torch.cat(parts, -1)).chunk(2, -1)
        return Gaussian(mean, self.min_std + (1 - self.min_std) * F.softplus(raw))


def gaussian_log_prob(p: Gaussian, y: torch.Tensor) -> torch.Tensor:
    """Elementwise ``log N(y | mean, std^2)``."""
    return -0.5 * ((y - p.mean) / p.std) ** 2 - p.std.log() - 0.5 * math.log(2 * math.pi)


def training_loss(
    model: NeuralProcess,
    cx: torch.Tensor,
    cy: torch.Tensor,
    tx: torch.Tensor,
    ty: torch.Tensor,
    g: torch.Generator,
    *,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative log-likelihood per target point (CNP) or negative ELBO per target point (NP), averaged over the
    tasks, given context ``(cx, cy)`` and targets ``(tx, ty)`` (which include the context); plus ``beta`` times
    the input bottleneck's KL when the model has one (MR-CNP / MR-NP)."""
    r = model.represent(cx, cy)
    xs, kl_x = model.inputs(tx, g)
    reg = beta * kl_x if model.bottleneck is not None and beta else 0.0
    extra = {"train/bottleneck_kl": kl_x.item()} if model.bottleneck is not None else {}
    if model.latent is None:
        nll = -gaussian_log_prob(model.decode(xs, r, None), ty).mean()
        return nll + reg, {"train/nll": nll.item(), **extra}
    q_target, q_context = model.posterior(tx, ty), model.posterior(cx, cy)
    noise = torch.randn(q_target.mean.shape, generator=g).to(q_target.mean.device)
    z = q_target.mean + q_target.std * noise  # reparameterised
    nll = -gaussian_log_prob(model.decode(xs, r, z), ty).mean()
    tasks, targets = tx.shape[:2]
    kl = gaussian_kl(q_target.mean, q_target.std, q_context.mean, q_context.std) / (tasks * targets)
    return nll + kl + reg, {"train/nll": nll.item(), "train/kl": kl.item(), **extra}


def predictive(
    model: NeuralProcess,
    cx: torch.Tensor,
    cy: torch.Tensor,
    x: torch.Tensor,
    samples: int,
    g: torch.Generator,
) -> Gaussian:
    """The predictive at ``x`` as ``S`` Gaussians (a mixture with equal weights): ``(S, T, N, 1)`` means and
    standard deviations; ``S = 1`` for a CNP."""
    r = model.represent(cx, cy)
    x, _ = model.inputs(x)  # in eval mode the bottleneck's mean
    if model.latent is None:
        p = model.decode(x, r, None)
        return Gaussian(p.mean[None], p.std[None])
    q = model.posterior(cx, cy)
    noise = torch.randn((samples, *q.mean.shape), generator=g).to(q.mean.device)
    outs = [model.decode(x, r, q.mean + q.std * e) for e in noise]
    return Gaussian(torch.stack([o.mean for o in outs]), torch.stack([o.std for o in outs]))


def mixture_scores(p: Gaussian, y: torch.Tensor, interval_samples: int, g: torch.Generator) -> torch.Tensor:
    """Per task ``(T, 3)``: MSE of the mixture's mean, NLL per point, and the fraction of ``y`` inside the
    central 90% interval (a Gaussian's own for one component, else quantiles of draws from the mixture)."""
    s = p.mean.shape[0]
    mse = ((p.mean.mean(0) - y) ** 2).mean((-2, -1))
    log_density = torch.logsumexp(gaussian_log_prob(p, y[None]), 0) - math.log(s)
    nll = -log_density.mean((-2, -1))
    if s == 1:
        inside = ((y - p.mean[0]).abs() <= Z90 * p.std[0]).float()
    else:
        which = torch.randint(s, (interval_samples, *y.shape), generator=g).to(y.device)
        mean, std = p.mean.gather(0, which), p.std.gather(0, which)
        draws = mean + std * torch.randn(which.shape, generator=g).to(y.device)
        low, high = torch.quantile(draws, torch.tensor([0.05, 0.95], device=y.device), dim=0)
        inside = ((y >= low) & (y <= high)).float()
    return torch.stack([mse, nll, inside.mean((-2, -1))], -1)


def context_size(step: int, seed: int, low: int, high: int) -> int:
    """The training step's number of context points, uniform in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (1,), generator=generator_for(seed, step)))


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """A CNP or NP on a regression task family, trained on the (negative) ELBO, evaluated on MSE, NLL and 90%
    coverage of its query points."""
    cfg: Config = run.params
    if run.task.dataset != "sinusoid":
        raise ConfigError("task.dataset", "neural processes here are for regression tasks; use sinusoid")
    if cfg.min_context > run.task.shots:
        raise ConfigError(
            f"{run.algo}.min_context",
            f"{cfg.min_context} exceeds task.shots ({run.task.shots}), the most context",
        )
    latent = cfg.latent_dim if cfg.model == "np" else 0
    model = NeuralProcess(
        run.task.input_features, cfg.hidden, cfg.layers, latent, cfg.min_std, cfg.bottleneck
    )
    model = model.to(device)
    train = make_sampler(run.task, "train", run.seed, root)
    evals = EvalSamplers(run.task, run.eval.seed, root)

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ep = shard(train.sample(step, run.train.meta_batch)).to(device)
        k = context_size(step, run.seed, cfg.min_context, run.task.shots)
        tx, ty = torch.cat([ep.support_x, ep.query_x], 1), torch.cat([ep.support_y, ep.query_y], 1)
        g = generator_for(run.seed, step)
        return training_loss(
            model, ep.support_x[:, :k], ep.support_y[:, :k], tx, ty, g, beta=cfg.bottleneck_beta
        )

    def evaluate(part: str, episodes: int) -> dict[str, float]:
        g = generator_for(run.eval.seed, episodes)

        def per_task(ep: Episode) -> torch.Tensor:
            p = predictive(model, ep.support_x, ep.support_y, ep.query_x, cfg.eval_samples, g)
            return mixture_scores(p, ep.query_y, cfg.interval_samples, g)

        with torch.no_grad():
            mse, nll, cover = evaluate_episode_columns(
                per_task, evals[part], episodes, run.eval.batch, device
            )
        return {
            f"{part}/mse": mse.mean,
            f"{part}/mse_ci95": mse.ci95,
            f"{part}/nll": nll.mean,
            f"{part}/nll_ci95": nll.ci95,
            f"{part}/coverage90": cover.mean,
            f"{part}/coverage90_ci95": cover.ci95,
        }

    def figures(run_dir: Path) -> list[Path]:
        if run.task.label_assignment != "shuffled":
            return []
        return [bands_figure(model, cfg, evals["test"], run_dir / "np_bands.png", device, run.algo)]

    return Learner(model, loss, evaluate, figures=figures)


def bands_figure(
    model: NeuralProcess,
    cfg: Config,
    tasks,
    path: Path,
    device: torch.device,
    name: str,
    *,
    contexts=(2, 5, 10),
) -> Path:
    """Predictive mean, 90% band and (NP) sampled functions on 4 test tasks, conditioned on the first 2, 5 and
    10 of its points: where a point estimate is confidently wrong at K = 2, a Bayesian learner's band should
    cover the true curve."""
    n, g = 4, torch.Generator().manual_seed(0)
    big = type(tasks)(max(contexts), 1, seed=tasks.seed, family=tasks.family)
    ep = big.sample(0, n).to(device)
    amplitude, phase = big.functions(0, n)
    x = torch.linspace(-5, 5, 200, device=device).reshape(1, -1, 1).expand(n, -1, -1)
    truth = sinusoid(x.cpu(), amplitude[:, None, None], phase[:, None, None])
    fig, axes = plt.subplots(
        len(contexts), n, figsize=(3.2 * n, 2.4 * len(contexts)), sharex=True, squeeze=False
    )
    with torch.no_grad():
        for row, k in enumerate(contexts):
            p = predictive(model, ep.support_x[:, :k], ep.support_y[:, :k], x, cfg.eval_samples, g)
            mean = p.mean.mean(0)[..., 0].cpu()
            spread = (
                (p.mean.var(0, correction=0) + (p.std**2).mean(0))[..., 0].sqrt().cpu()
            )  # the mixture's std
            for col in range(n):
                ax = axes[row, col]
                xs = x[col, :, 0].cpu()
                for s in range(min(p.mean.shape[0], 8)) if p.mean.shape[0] > 1 else ():
                    ax.plot(xs, p.mean[s, col, :, 0].cpu(), color="tab:blue", alpha=0.25, lw=0.8)
                ax.fill_between(xs, mean[col] - Z90 * spread[col], mean[col] + Z90 * spread[col], alpha=0.2)
                ax.plot(xs, truth[col, :, 0], color="black", lw=1, label="true")
                ax.plot(xs, mean[col], color="tab:blue", lw=1.2, label="mean")
                ax.scatter(
                    ep.support_x[col, :k, 0].cpu(),
                    ep.support_y[col, :k, 0].cpu(),
                    color="red",
                    s=12,
                    zorder=3,
                )
                ax.set_ylim(-6, 6)
                if col == 0:
                    ax.set_ylabel(f"K = {k}")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        f"{name} ({cfg.model}): predictive mean, 90% band (approx.), context points in red", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
