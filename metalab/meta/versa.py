"""VERSA: amortized variational inference over a linear classifier's last layer (Gordon, Bronskill, Bauer,
Nowozin & Turner, "Meta-Learning Probabilistic Inference for Prediction", ICLR 2019).

A Conv-4 maps every image of an episode to a feature vector ``x`` (D-d). For each class ``c`` an amortization
network reads the mean of that class's support features (one vector whatever the shots, and the same for any
order of them) and outputs a factorised Gaussian ``q(w_c, b_c)`` over the class's weight vector and bias:
means and log-variances, ``(D + 1)`` of each. Every class goes through the same network on its own, so the
classifier has as many rows as the episode has classes (any ways, in training and at test) and relabelling
the classes permutes its rows.

Prediction averages the softmax over ``L`` samples of the head, ``p(y | x) ~= (1/L) sum_l softmax(logits_l)``.
The samples are drawn with the paper's local reparameterisation: under ``q`` the logit of class ``c`` is
itself Gaussian, with mean ``mu_c . x + mu_b`` and variance ``(x * x) . var_c + var_b``, so each query's
logits are sampled directly (one draw per query and class) instead of sampling weight vectors.

Training maximises the paper's amortized objective, the predictive log-likelihood of the query labels
estimated with ``L`` samples, ``log (1/L) sum_l p(y | x, w_l)`` (a logsumexp minus ``log L``), averaged over the
queries and tasks; there is no KL term. That is the cross-entropy of the MC-averaged predictive, and the scores
the episodic evaluation (:func:`~metalab.meta.episodic.build_episodic`) reads are its log-probabilities
(:func:`predictive_log_probs`): their softmax is the averaged predictive itself, so ``<part>/acc``,
``<part>/nll`` and the pooled ``<part>/ece`` are those of the averaged predictive, never of one sample.

Sizes: the amortization network follows the paper's code (read for facts only): for each of the four outputs
(weight means, weight log-variances, bias mean, bias log-variance) a network of two hidden ELU layers as wide as
the features. Differences: the features are metalab's shared Conv-4 (max-pool, 64-d on 28x28 Omniglot; the
paper's extractor keeps 'same'-padded 2x2 maps, 256-d, with dropout), and support and query images go through
it together, one forward per task; the log-variance outputs start at ``init_log_variance`` (-6), not at the
default initialisation's 0 (see :class:`Config`).

Sampling noise: training draws from torch's global generator (checkpointed with the run); evaluation from a
generator reset at every evaluation (``eval.seed`` and the part), so a checkpoint scores the same every time
and evaluating leaves the training stream alone.

Evaluation protocol: BatchNorm is inductive by default (running statistics; ``versa.batchnorm``), as for
ProtoNet; ``transductive`` normalises with the episode's statistics.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from metalab.config import MAX_FILTERS, require, require_between, require_widths
from metalab.data.episodes import Episode, generator_for
from metalab.experiment import RunConfig
from metalab.meta.episodic import build_episodic, cross_entropy, embed_tasks
from metalab.meta.protonet import class_means
from metalab.models import BatchNormMode, Conv4
from metalab.train.loop import Learner

MAX_SAMPLES = 4_096
"""Most Monte Carlo samples of the logits per query."""


@dataclass(frozen=True)
class Config:
    """VERSA hyperparameters (the ``versa`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters (the features are 64-d on 28x28 Omniglot)."""
    amortizer: tuple[int, ...] = (64, 64)
    """Hidden ELU layers of each of the four amortization networks (the paper's code: two, as wide as the
    features)."""
    samples: int = 10
    """``L``, samples of the logits per query in the training objective (the paper's 10)."""
    eval_samples: int = 100
    """Samples of the logits per query at evaluation: the averaged predictive that accuracy, nll and ece
    score (more than in training: local reparameterisation makes them cheap, and the ECE reads the
    probabilities, not just their argmax)."""
    init_log_variance: float = -6.0
    """Initial bias of the log-variance networks' output layers (weights and bias alike). With the default
    initialisation (0) the logits' noise starts about ten times wider than the spread of their means (64
    features each adding ``x_d^2``), and 20-way training spent its first hundreds of steps shrinking it (dev
    runs: val accuracy 42% after 200 steps, 69% with -6). A departure from the paper's code, which initialises
    these layers like any other."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each query on its own) or ``transductive``
    (the episode's statistics); see :data:`metalab.models.BatchNormMode`."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require(len(self.amortizer) >= 1, "amortizer", "must list at least one hidden layer width")
        require_widths(self.amortizer, "amortizer")
        require_between(self.samples, "samples", 1, MAX_SAMPLES)
        require_between(self.eval_samples, "eval_samples", 1, MAX_SAMPLES)
        require_between(self.init_log_variance, "init_log_variance", -30.0, 10.0)


class Posterior(NamedTuple):
    """A factorised Gaussian ``q`` over a linear head of ``N`` classes on ``D`` features (leading task
    dimensions allowed): ``weight_mean`` and ``weight_log_variance`` ``(..., N, D)``, ``bias_mean`` and
    ``bias_log_variance`` ``(..., N)``."""

    weight_mean: torch.Tensor
    weight_log_variance: torch.Tensor
    bias_mean: torch.Tensor
    bias_log_variance: torch.Tensor


def elu_mlp(features: int, widths: tuple[int, ...], out: int) -> nn.Sequential:
    """``features -> widths... -> out``, ELU after each hidden layer."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(features, width), nn.ELU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, out))


class Amortizer(nn.Module):
    """The amortization network: a class's pooled support features ``(..., D)`` to its :class:`Posterior` row.

    Four networks, as in the paper's code: weight means, weight log-variances, bias mean, bias log-variance.
    The log-variance networks' output biases start at ``init_log_variance`` (see :class:`Config`)."""

    def __init__(self, features: int, widths: tuple[int, ...], init_log_variance: float = -6.0):
        super().__init__()
        self.weight_mean = elu_mlp(features, widths, features)
        self.weight_log_variance = elu_mlp(features, widths, features)
        self.bias_mean = elu_mlp(features, widths, 1)
        self.bias_log_variance = elu_mlp(features, widths, 1)
        with torch.no_grad():
            self.weight_log_variance[-1].bias.fill_(init_log_variance)
            self.bias_log_variance[-1].bias.fill_(init_log_variance)

    def forward(self, pooled: torch.Tensor) -> Posterior:
        """``(..., N, D)`` pooled features of N classes -> their posterior (``(..., N, D)`` and ``(..., N)``)."""
        return Posterior(
            self.weight_mean(pooled),
            self.weight_log_variance(pooled),
            self.bias_mean(pooled).squeeze(-1),
            self.bias_log_variance(pooled).squeeze(-1),
        )


class Versa(nn.Module):
    """A Conv-4 feature extractor and the :class:`Amortizer` over its features."""

    def __init__(self, cfg: Config, image_size: int = 28):
        super().__init__()
        self.encoder = Conv4(1, cfg.hidden, image_size=image_size)
        self.amortizer = Amortizer(self.encoder.embedding_dim, cfg.amortizer, cfg.init_log_variance)


def infer_head(amortizer: Amortizer, support: torch.Tensor, support_y: torch.Tensor, n_way: int) -> Posterior:
    """``q`` over the head of a batch of tasks from their support features ``(T, S, D)`` with labels ``(T, S)``
    in ``0..n_way-1``: each class's features are mean-pooled over its shots, then mapped on their own."""
    pooled = vmap(class_means, in_dims=(0, 0, None))(support, support_y, n_way)  # (T, N, D)
    return amortizer(pooled)


def logit_distribution(q: Posterior, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local reparameterisation: mean and variance of the Gaussian logits of features ``x`` ``(..., M, D)``
    under ``q`` ``(..., N, D)``, each ``(..., M, N)``: ``mu_c . x + mu_b`` and ``(x * x) . var_c + var_b``."""
    mean = x @ q.weight_mean.mT + q.bias_mean[..., None, :]
    variance = x.square() @ q.weight_log_variance.exp().mT + q.bias_log_variance.exp()[..., None, :]
    return mean, variance


def sample_logits(
    mean: torch.Tensor, variance: torch.Tensor, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``samples`` draws ``(L, ...)`` of independent Gaussian logits of ``mean`` and ``variance`` ``(...)``.

    The noise comes from ``generator`` (drawn on the CPU, a fixed stream on any device, then moved) or, without
    one, from torch's global generator on the logits' device."""
    shape = (samples, *mean.shape)
    if generator is None:
        eps = torch.randn(shape, dtype=mean.dtype, device=mean.device)
    else:
        eps = torch.randn(shape, dtype=mean.dtype, generator=generator).to(mean.device)
    return mean + variance.sqrt() * eps


def predictive_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log of the MC-averaged predictive ``log (1/L) sum_l softmax(logits_l)``: ``(L, ..., N) -> (..., N)``.

    Already normalised, so its softmax (what the episodic evaluation takes of scores) is the averaged
    predictive itself, and its cross-entropy is VERSA's objective (:func:`objective`)."""
    return torch.logsumexp(F.log_softmax(logits, -1), 0) - math.log(logits.shape[0])


def objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The paper's amortized objective per prediction, ``log (1/L) sum_l p(y | x, w_l)``: ``(L, ..., N)``
    sampled logits and ``(...)`` labels -> ``(...)`` (nats; training maximises its mean)."""
    log_py = F.log_softmax(logits, -1).gather(-1, labels.expand(logits.shape[:-1])[..., None])  # (L, ..., 1)
    return torch.logsumexp(log_py.squeeze(-1), 0) - math.log(logits.shape[0])


def episode_logit_distribution(model: Versa, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance ``(T, N*Q, N)`` of the query logits of a batched episode under the inferred ``q``."""
    n_support = ep.support_x.shape[1]
    z = embed_tasks(model.encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, N*(K+Q), D)
    q = infer_head(model.amortizer, z[:, :n_support], ep.support_y, ep.n_way)  # (T, N, D), (T, N)
    return logit_distribution(q, z[:, n_support:])


def episode_predictive(
    model: Versa, ep: Episode, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Log of the averaged predictive ``(T, N*Q, N)`` of a batched episode's queries over ``samples`` draws of
    the logits (:func:`predictive_log_probs`): VERSA's scores."""
    mean, variance = episode_logit_distribution(model, ep)
    return predictive_log_probs(sample_logits(mean, variance, samples, generator))  # (T, N*Q, N)


def training_loss(model: Versa, samples: int, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """Minus the mean of :func:`objective` over the queries of every task (noise from the global generator).
    Returns (loss, the averaged predictive's log-probabilities)."""
    scores = episode_predictive(model, ep, samples)
    # objective(samples, y) = log of the averaged predictive at y: the cross-entropy of these scores
    return cross_entropy(scores, ep), scores


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss (:func:`training_loss`) and evaluation for a VERSA run: the episodic evaluation of
    :func:`~metalab.meta.episodic.build_episodic` on the averaged predictive of ``eval_samples`` draws."""
    cfg: Config = run.params
    model = Versa(cfg, run.task.image_size)
    generator = generator_for(run.eval.seed, 0)

    def scores(ep: Episode) -> torch.Tensor:
        return episode_predictive(model, ep, cfg.eval_samples, generator)

    learner = build_episodic(
        run, root, device, model, scores, lambda ep: training_loss(model, cfg.samples, ep)
    )
    episodic_evaluate = learner.evaluate

    def evaluate(part: str, episodes: int) -> dict[str, float]:
        nonlocal generator
        # the same draws at every evaluation of a part, and none from the global (training) generator
        generator = generator_for(run.eval.seed, zlib.crc32(part.encode()))
        return episodic_evaluate(part, episodes)

    learner.evaluate = evaluate
    return learner
