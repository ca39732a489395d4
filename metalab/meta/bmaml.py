"""Ensembles of MAML and Bayesian MAML: M particles of the regression network, adapted together.

The meta-parameters are M initialisations of the network (``particles``), held as one stacked parameter dict
(``torch.func.stack_module_state``: every tensor has a leading particle dimension, and the forward pass is
``vmap``-ped over it), and one learned observation noise ``log sigma`` shared by the particles. After
adaptation to a task the predictive at ``x`` is the equal-weight mixture of the M Gaussians
``N(f_m(x), sigma^2)``.

- ``inner: ensemble``: M independently initialised MAML members. Each adapts alone with MAML's inner loop (plain
  gradient steps on its support MSE, Finn, Abbeel & Levine, ICML 2017); the outer loss is the mean of the
  members' query losses (Gaussian negative log-likelihood per query point).
- ``inner: svgd``: Bayesian MAML (Yoon, Kim, Dia, Kim, Bengio & Ahn, "Bayesian Model-Agnostic Meta-Learning",
  NeurIPS 2018). The inner loop is Stein variational gradient descent (Liu & Wang, NeurIPS 2016) on the task
  posterior ``p(theta | support)``: each step moves particle ``j`` by ``inner_lr * phi(theta_j)`` (times ``2 sigma^2 M / K``
  with ``step_scale: noise``, the default) with
  ``phi(theta_j) = (1/M) sum_i [k(theta_i, theta_j) grad log p(theta_i | support) + grad_{theta_i}
  k(theta_i, theta_j)]``, an RBF kernel ``k(a, b) = exp(-||a - b||^2 / h)`` with the median heuristic
  ``h = med^2 / log M``. ``log p`` is the Gaussian log-likelihood of the support
  points (a sum over them) plus, with ``prior_std``, a weak ``N(0, prior_std^2)`` prior on the weights. The
  outer loss (``outer_loss: bfa``, the default for ``svgd``) is the paper's Bayesian fast-adaptation loss, the
  variant "BMAML w/o chaser" (no chaser loss): ``-log (1/M) sum_m p(query | theta_m)``, the whole query set's
  likelihood under each adapted particle, divided by the number of query points. ``outer_loss: chaser`` is the
  paper's BMAML proper (its Algorithm 2, as the official code trains it): the particles after the inner steps
  on the support set (the chaser) are pulled towards where ``leader_steps`` further SVGD steps on support plus
  query take them (the leader, a constant): ``sum_m ||theta_m^chaser - stopgrad(theta_m^leader)||^2``. Unlike
  the fast-adaptation loss, which a single particle near the query can satisfy (the others then specialise),
  it moves every particle. The chaser loss has no use for the noise ``sigma``, which the official code adapts
  as a per-particle parameter by SVGD under a Gamma prior; here the one learned ``sigma`` is fitted by the
  query NLL of the chaser's mixture, its particles held constant, and enters the chaser's steps as a
  constant (so each parameter has one objective). ``outer_loss: mean_nll`` takes the ensemble's outer loss
  instead (the particles' mean query NLL), a variant not in the paper. The outer gradient goes through the
  SVGD steps (second order: the score's derivative and the kernel's, the bandwidth's too), or only through the
  initial particles with ``first_order``.

Evaluation adapts with ``eval_inner_steps`` steps and scores the query points as
:mod:`metalab.meta.neural_process` does, with its :func:`~metalab.meta.neural_process.mixture_scores`: ``mse``
of the mixture mean, ``nll`` per point (log-mean-exp over particles) and ``coverage90``, the fraction of query
targets inside the central 90% interval of the mixture, from quantiles of ``interval_samples`` draws of
``y`` (the Gaussian's own interval when M = 1).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import grad, stack_module_state, vmap

from metalab.config import MAX_INNER_STEPS, require, require_between, require_widths
from metalab.data.episodes import Episode, generator_for
from metalab.data.sinusoid import SinusoidTasks, sinusoid
from metalab.data.tasks import EvalSamplers, make_sampler
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta.adapt import adapt
from metalab.meta.gbml import ParamTable
from metalab.meta.neural_process import MAX_SAMPLES, Z90, Gaussian, gaussian_log_prob, mixture_scores
from metalab.models import MLP
from metalab.models.mlp import mlp_forward
from metalab.stats import Estimate
from metalab.train.distributed import shard
from metalab.train.evaluate import evaluate_episode_columns
from metalab.train.loop import Learner
from metalab.utils import Params

MAX_PARTICLES = 1_024
"""Most particles (ensemble members)."""


@dataclass(frozen=True)
class Config:
    """Hyperparameters of the ``bmaml`` section: ensembles of MAML and Bayesian MAML (Yoon et al., 2018)."""

    inner: Literal["ensemble", "svgd"] = "svgd"
    """``ensemble``: each particle adapts alone by gradient steps on its support MSE (M MAML members).
    ``svgd``: the particles adapt together by SVGD on the support posterior (Bayesian MAML)."""
    particles: int = 5
    """M, the number of particles (ensemble members)."""
    inner_lr: float = 0.01
    """Inner step size: of the MSE gradient step (``ensemble``) or of the SVGD step (``svgd``)."""
    inner_steps: int = 1
    """Inner steps during meta-training."""
    eval_inner_steps: int = 10
    """Inner steps at evaluation."""
    first_order: bool = False
    """Treat each inner update as a constant in the outer gradient (first-order MAML / BMAML)."""
    outer_loss: Literal["bfa", "chaser", "mean_nll"] | None = None
    """The outer loss: ``bfa``, BMAML's fast-adaptation loss per query point, ``-log (1/M) sum_m p(query |
    theta_m)`` (the query set's joint likelihood averaged over particles); ``chaser``, BMAML's chaser loss
    (``svgd`` only; see the module docstring); ``mean_nll``, the particles' mean Gaussian NLL per query point.
    Null: ``bfa`` for ``svgd``, ``mean_nll`` for ``ensemble``."""
    leader_steps: int = 1
    """``chaser``: SVGD steps the leader takes from the chaser's particles on support plus query (the paper's
    ``s``; the official sinusoid runs take 1)."""
    step_scale: Literal["none", "noise"] = "noise"
    """``svgd``: ``noise`` multiplies each SVGD step by ``2 sigma^2 M / K`` (``K`` support points, ``M``
    particles, ``sigma`` the current noise, held constant in the outer gradient), so the drive of a particle's
    own likelihood (its kernel weight ``k_jj / M = 1 / M`` in ``phi``) equals MAML's MSE gradient step of the
    same ``inner_lr`` whatever the learned noise and the particle count (without the ``M`` it was ``1 / M`` of
    MAML's step); ``none``: the plain step ``inner_lr * phi``, whose drive grows as ``K / (2 sigma^2)`` times
    MAML's and diverged over 10 evaluation steps once ``sigma`` was learned down to 0.5
    (docs/notes/sinusoid.md)."""
    prior_std: float | None = None
    """``svgd``: standard deviation of a Gaussian prior ``N(0, prior_std^2)`` on every weight in ``log p``;
    null: no prior (the likelihood alone)."""
    init_sigma: float = 1.0
    """Initial observation noise standard deviation (learned, one scalar shared by the particles)."""
    interval_samples: int = 256
    """Draws of ``y`` from the mixture per query point for its 90% interval at evaluation."""
    mlp_hidden: tuple[int, ...] = (40, 40)
    """Hidden sizes of each particle's MLP."""

    def __post_init__(self) -> None:
        require(self.inner in ("ensemble", "svgd"), "inner", f"must be ensemble or svgd, got {self.inner!r}")
        require(
            self.step_scale in ("none", "noise"),
            "step_scale",
            f"must be none or noise, got {self.step_scale!r}",
        )
        require_between(self.particles, "particles", 1, MAX_PARTICLES)
        require(self.inner_lr > 0, "inner_lr", f"must be > 0, got {self.inner_lr}")
        require_between(self.inner_steps, "inner_steps", 1, MAX_INNER_STEPS)
        require_between(self.eval_inner_steps, "eval_inner_steps", 1, MAX_INNER_STEPS)
        require(
            self.prior_std is None or self.prior_std > 0,
            "prior_std",
            f"must be > 0 or null, got {self.prior_std}",
        )
        require(self.init_sigma > 0, "init_sigma", f"must be > 0, got {self.init_sigma}")
        require_between(self.interval_samples, "interval_samples", 10, MAX_SAMPLES)
        require_widths(self.mlp_hidden, "mlp_hidden")
        require(
            self.outer_loss in (None, "bfa", "chaser", "mean_nll"),
            "outer_loss",
            f"must be bfa, chaser, mean_nll or null, got {self.outer_loss!r}",
        )
        require(
            self.outer_loss != "chaser" or self.inner == "svgd",
            "outer_loss",
            "chaser needs inner: svgd (the leader takes SVGD steps)",
        )
        require_between(self.leader_steps, "leader_steps", 1, MAX_INNER_STEPS)


class Meta(NamedTuple):
    """The meta-parameters: the stacked particles ``{name: (M, ...)}`` and the noise's ``log sigma`` (0-d)."""

    particles: Params
    log_sigma: torch.Tensor


@dataclass(frozen=True)
class Rule:
    """How the particles adapt to one task (bound first with ``functools.partial`` before ``vmap``)."""

    mode: Literal["ensemble", "svgd"]
    lr: float
    steps: int
    first_order: bool = False
    prior_std: float | None = None
    outer: Literal["bfa", "chaser", "mean_nll"] = "bfa"
    noise_scaled: bool = False
    """Scale each SVGD step by ``2 sigma^2 M / K`` (:attr:`Config.step_scale` ``noise``)."""
    leader_steps: int = 1
    """The chaser loss's leader steps (:attr:`Config.leader_steps`)."""

    @classmethod
    def training(cls, cfg: Config) -> Rule:
        """The meta-training rule of ``cfg``."""
        outer = cfg.outer_loss or ("bfa" if cfg.inner == "svgd" else "mean_nll")
        noise = cfg.step_scale == "noise"
        return cls(
            cfg.inner,
            cfg.inner_lr,
            cfg.inner_steps,
            cfg.first_order,
            cfg.prior_std,
            outer,
            noise,
            cfg.leader_steps,
        )

    @classmethod
    def evaluation(cls, cfg: Config) -> Rule:
        """The rule at evaluation: ``eval_inner_steps`` steps, no outer gradient."""
        return replace(cls.training(cfg), steps=cfg.eval_inner_steps, first_order=True)

    """The outer loss (:func:`query_loss`)."""


class Particles(nn.Module):
    """M independently initialised MLPs stored stacked (``ParamTable`` of ``(M, ...)`` tensors), and
    ``log_sigma``: the learner's model, checkpointed and optimised as a whole."""

    def __init__(self, x_dim: int, hidden: tuple[int, ...], particles: int, init_sigma: float):
        super().__init__()
        stacked, _ = stack_module_state([MLP(x_dim, hidden, 1) for _ in range(particles)])
        self.stacked = ParamTable(stacked)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(init_sigma)))

    def meta(self) -> Meta:
        return Meta(self.stacked.as_dict(), self.log_sigma)


def forward(particles: Params, x: torch.Tensor) -> torch.Tensor:
    """Every particle's outputs at ``x``: ``(N, x_dim) -> (M, N, 1)``."""
    return vmap(mlp_forward, in_dims=(0, None))(particles, x)


def log_posterior(
    params: Params, log_sigma: torch.Tensor, x: torch.Tensor, y: torch.Tensor, prior_std: float | None
) -> torch.Tensor:
    """Unnormalised ``log p(theta | (x, y))`` of one particle: ``sum_n log N(y_n | f(x_n), sigma^2)``, plus
    ``-||theta||^2 / (2 prior_std^2)`` with a prior."""
    out = mlp_forward(params, x)  # (N, 1)
    log_lik = gaussian_log_prob(Gaussian(out, log_sigma.exp()), y).sum()
    if prior_std is None:
        return log_lik
    return log_lik - sum((p**2).sum() for p in params.values()) / (2 * prior_std**2)


def pairwise_sq_dists(particles: Params) -> torch.Tensor:
    """``(M, M)`` squared Euclidean distances between the particles (all their tensors flattened together);
    computed from differences, so the diagonal is exactly 0 and differentiable."""
    m = next(iter(particles.values())).shape[0]
    return sum(((p[:, None] - p[None]) ** 2).reshape(m, m, -1).sum(-1) for p in particles.values())


def median_bandwidth(sq_dists: torch.Tensor) -> torch.Tensor:
    """The median heuristic of SVGD: ``h = med^2 / log M``, ``med`` the median distance between distinct
    particles (the lower middle one for an even number of pairs), so a pair at the median distance has
    ``k = 1/M``. One particle: ``h = 1`` (its kernel is only evaluated at distance 0). Floored at 1e-12 so
    coincident particles give ``k = 1`` and no repulsion rather than 0/0."""
    m = sq_dists.shape[0]
    if m == 1:
        return sq_dists.new_ones(())
    i, j = torch.triu_indices(m, m, 1)
    return (sq_dists[i, j].median() / math.log(m)).clamp_min(1e-12)


def svgd_direction(particles: Params, scores: Params) -> Params:
    """SVGD's update direction (Liu & Wang 2016; the inner loop of Yoon et al. 2018) for stacked ``particles``
    and their ``scores`` ``grad log p``: ``phi(theta_j) = (1/M) sum_i [k_ij s_i + grad_{theta_i} k_ij]`` with
    ``k_ij = exp(-||theta_i - theta_j||^2 / h)``, so ``grad_{theta_i} k_ij = (2/h) k_ij (theta_j - theta_i)``.
    Everything, the bandwidth ``h`` (:func:`median_bandwidth`) included, stays differentiable in the
    particles, so an outer gradient through SVGD steps is the exact gradient of the computed loss."""
    sq = pairwise_sq_dists(particles)  # (M, M)
    h = median_bandwidth(sq)
    k = torch.exp(-sq / h)  # (M, M), symmetric
    m = k.shape[0]
    out = {}
    for name, theta in particles.items():
        flat, score = theta.reshape(m, -1), scores[name].reshape(m, -1)  # (M, P)
        drive = k.T @ score  # sum_i k_ij s_i
        repulse = (2 / h) * (k.sum(0)[:, None] * flat - k.T @ flat)  # sum_i k_ij (theta_j - theta_i) 2/h
        out[name] = ((drive + repulse) / m).reshape(theta.shape)
    return out


def adapt_particles(rule: Rule, meta: Meta, x: torch.Tensor, y: torch.Tensor) -> Params:
    """One task: ``rule.steps`` inner steps of all particles on the support set ``(x, y)``; the adapted stack.

    ``ensemble``: MAML's gradient steps on each particle's MSE alone. ``svgd``: SVGD steps on
    :func:`log_posterior`, ascending it. Differentiable in ``meta`` unless ``rule.first_order``."""
    particles = meta.particles
    if rule.mode == "ensemble":
        mse = functools.partial(_mse, x=x, y=y)
        one = functools.partial(adapt, loss_fn=mse, support=(), steps=rule.steps, inner_lr=rule.lr)
        return vmap(lambda p: one(p, first_order=rule.first_order))(particles)
    score_fn = vmap(grad(log_posterior), in_dims=(0, None, None, None, None))
    m = next(iter(particles.values())).shape[0]
    lr = rule.lr * (2 * m * meta.log_sigma.detach().exp() ** 2 / y.shape[0] if rule.noise_scaled else 1.0)
    for _ in range(rule.steps):
        phi = svgd_direction(particles, score_fn(particles, meta.log_sigma, x, y, rule.prior_std))
        particles = {
            name: p + lr * (phi[name].detach() if rule.first_order else phi[name])
            for name, p in particles.items()
        }
    return particles


def _mse(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((mlp_forward(params, x) - y) ** 2).mean()


def predictive(rule: Rule, meta: Meta, sx: torch.Tensor, sy: torch.Tensor, x: torch.Tensor) -> Gaussian:
    """One task: adapt on ``(sx, sy)``, then the mixture's components at ``x``: ``(M, N, 1)`` means and stds."""
    means = forward(adapt_particles(rule, meta, sx, sy), x)
    return Gaussian(means, meta.log_sigma.exp().expand_as(means))


def chaser_distance(
    rule: Rule, meta: Meta, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
) -> tuple[torch.Tensor, Params]:
    """BMAML's chaser loss for one task, ``sum_m ||theta_m^chaser - stopgrad(theta_m^leader)||^2`` over every
    weight, and the chaser (the particles after ``rule.steps`` SVGD steps on the support set, differentiable
    in ``meta.particles``). The leader takes ``rule.leader_steps`` more steps from the chaser on support plus
    query. ``sigma`` is a constant in both."""
    fixed_noise = meta.log_sigma.detach()
    chaser = adapt_particles(rule, Meta(meta.particles, fixed_noise), sx, sy)
    start = Meta({k: v.detach() for k, v in chaser.items()}, fixed_noise)
    lead = replace(rule, steps=rule.leader_steps, first_order=True)
    leader = adapt_particles(lead, start, torch.cat([sx, qx]), torch.cat([sy, qy]))
    distance = sum(((chaser[k] - leader[k].detach()) ** 2).sum() for k in chaser)
    return distance, chaser


def query_loss(
    rule: Rule, meta: Meta, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's (outer loss, MSE of the mixture mean, detached). The loss, per query point: ``rule.outer``
    ``mean_nll``, the particles' mean Gaussian NLL; ``bfa``, BMAML's ``-log (1/M) sum_m p(query | theta_m)``.
    ``chaser``: :func:`chaser_distance` plus the query NLL of the chaser's mixture as a function of ``sigma``
    alone (``bfa`` with the particles held constant), which fits the noise."""
    if rule.outer == "chaser":
        distance, chaser = chaser_distance(rule, meta, sx, sy, qx, qy)
        means = forward({k: v.detach() for k, v in chaser.items()}, qx)
        p = Gaussian(means, meta.log_sigma.exp().expand_as(means))
        return distance + _bfa(p, qy), ((means.mean(0) - qy) ** 2).mean().detach()
    p = predictive(rule, meta, sx, sy, qx)
    loss = -gaussian_log_prob(p, qy[None]).mean() if rule.outer == "mean_nll" else _bfa(p, qy)
    return loss, ((p.mean.mean(0) - qy) ** 2).mean().detach()


def _bfa(p: Gaussian, qy: torch.Tensor) -> torch.Tensor:
    """``-log (1/M) sum_m p(query | theta_m)`` per query point, for the ``(M, N, 1)`` components ``p``."""
    joint = gaussian_log_prob(p, qy[None]).sum((1, 2))  # (M,): log p(query | theta_m)
    return -(torch.logsumexp(joint, 0) - math.log(joint.shape[0])) / qy.numel()


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Particles, the outer loss over a vmapped meta-batch, and evaluation of the adapted mixture (MSE, NLL,
    90% coverage of the query points)."""
    cfg: Config = run.params
    if run.task.dataset != "sinusoid":
        raise ConfigError("task.dataset", f"{run.algo} here is for regression tasks; use sinusoid")
    model = Particles(run.task.input_features, cfg.mlp_hidden, cfg.particles, cfg.init_sigma).to(device)
    rule, tested = Rule.training(cfg), Rule.evaluation(cfg)
    train = make_sampler(run.task, "train", run.seed, root)
    evals = EvalSamplers(run.task, run.eval.seed, root)

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ep = shard(train.sample(step, run.train.meta_batch)).to(device)
        per_task = vmap(functools.partial(query_loss, rule), in_dims=(None, 0, 0, 0, 0))
        losses, mse = per_task(model.meta(), *ep[:4])  # (T,), (T,)
        sigma = model.log_sigma.exp().item()
        return losses.mean(), {"train/mse": mse.mean().item(), "train/sigma": sigma}

    def evaluate(part: str, episodes: int) -> dict[str, float]:
        g = generator_for(run.eval.seed, episodes)

        def per_task(ep: Episode) -> torch.Tensor:
            return batch_scores(tested, model.meta(), ep, cfg.interval_samples, g)

        columns = evaluate_episode_columns(per_task, evals[part], episodes, run.eval.batch, device)
        names = ("mse", "nll", "coverage90")
        return {k: v for n, c in zip(names, columns, strict=True) for k, v in _estimate(part, n, c).items()}

    def figures(run_dir: Path) -> list[Path]:
        if run.task.label_assignment != "shuffled":
            return []
        return [bands_figure(tested, model.meta(), evals["test"], run_dir / "bmaml_bands.png", run.algo)]

    return Learner(model, loss, evaluate, figures=figures)


def batch_scores(
    rule: Rule, meta: Meta, ep: Episode, interval_samples: int, g: torch.Generator
) -> torch.Tensor:
    """Per task ``(T, 3)``: MSE of the mixture mean, NLL per point and 90% coverage of the query points after
    adapting with ``rule`` (:func:`~metalab.meta.neural_process.mixture_scores`); no outer graph is kept."""
    meta = Meta({k: v.detach() for k, v in meta.particles.items()}, meta.log_sigma.detach())
    with torch.no_grad():  # torch.func.grad still differentiates inside
        p = vmap(functools.partial(predictive, rule), in_dims=(None, 0, 0, 0))(
            meta, ep.support_x, ep.support_y, ep.query_x
        )  # (T, M, N, 1)
        mixture = Gaussian(p.mean.movedim(1, 0), p.std.movedim(1, 0))  # (M, T, N, 1)
        return mixture_scores(mixture, ep.query_y, interval_samples, g)


def _estimate(part: str, name: str, est: Estimate) -> dict[str, float]:
    return {f"{part}/{name}": est.mean, f"{part}/{name}_ci95": est.ci95}


def bands_figure(rule: Rule, meta: Meta, tasks: SinusoidTasks, path: Path, name: str) -> Path:
    """Each particle's adapted curve, the mixture mean and its 90% band (mean +- 1.645 mixture std, an
    approximation) on 4 test tasks, adapted to their first 2, 5 and 10 points."""
    n, contexts = 4, (2, 5, 10)
    device = meta.log_sigma.device
    big = type(tasks)(max(contexts), 1, seed=tasks.seed, family=tasks.family)
    ep = big.sample(0, n).to(device)
    amplitude, phase = big.functions(0, n)
    x = torch.linspace(-5, 5, 200, device=device).reshape(1, -1, 1).expand(n, -1, -1)  # (n, 200, 1)
    truth = sinusoid(x.cpu(), amplitude[:, None, None], phase[:, None, None])[..., 0]
    fig, axes = plt.subplots(len(contexts), n, figsize=(3.2 * n, 2.4 * len(contexts)), sharex=True)
    fit = vmap(functools.partial(predictive, rule), in_dims=(None, 0, 0, 0))
    for row, k in enumerate(contexts):
        with torch.no_grad():
            p = fit(meta, ep.support_x[:, :k], ep.support_y[:, :k], x)
        curves = p.mean[..., 0].cpu()  # (n, M, 200)
        mean = curves.mean(1)
        spread = (curves.var(1, correction=0) + p.std[..., 0].cpu().pow(2).mean(1)).sqrt()  # mixture std
        for col in range(n):
            ax, xs = axes[row, col], x[col, :, 0].cpu()
            for curve in curves[col, :8]:
                ax.plot(xs, curve, color="tab:blue", alpha=0.3, lw=0.8)
            ax.fill_between(xs, mean[col] - Z90 * spread[col], mean[col] + Z90 * spread[col], alpha=0.2)
            ax.plot(xs, truth[col], color="black", lw=1, label="true")
            ax.plot(xs, mean[col], color="tab:blue", lw=1.2, label="mixture mean")
            ax.scatter(
                ep.support_x[col, :k, 0].cpu(), ep.support_y[col, :k, 0].cpu(), color="red", s=12, zorder=3
            )
            ax.set_ylim(-6, 6)
            if col == 0:
                ax.set_ylabel(f"K = {k}")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{name} ({rule.mode}, {rule.steps} steps): particles, mixture mean, 90% band", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
