"""Infinite Mixture Prototypes (Allen, Shelhamer, Shin & Tenenbaum, "Infinite Mixture Prototypes for Few-Shot
Learning", ICML 2019).

A class may be several clusters in embedding space (an alphabet is many characters), so IMP represents each class
by as many clusters as its support set calls for, their number inferred per episode by a DP-means-style pass
(Kulis & Jordan's small-variance limit of a Dirichlet-process mixture), and classifies a query by its nearest
cluster of each class. With one cluster per class it is a prototypical network (:mod:`metalab.meta.protonet`).

In one episode, with ``h_i`` the Conv-4 embeddings of the support set (``D`` dimensions) and ``sigma`` the
clusters' variance:

1. Start from one cluster per class, its mean the class prototype (the mean of its support embeddings).
2. The threshold of a new cluster, from the CRP prior with concentration ``alpha`` and a Gaussian base
   distribution of variance ``rho`` (the variance over classes of the episode's prototypes, per dimension,
   averaged over dimensions; population variance): a point is likelier to start a cluster of its own than to
   join cluster ``c`` when its squared distance to ``c`` exceeds
   ``lambda = -2 sigma log(alpha) + D sigma log(1 + rho / sigma)``, i.e. the paper's
   ``2 sigma log(alpha / (1 + rho / sigma)^(D/2))`` up to its sign convention (:func:`threshold`).
3. ``iterations`` times: (a) in support order, each point whose squared distance to every cluster of its own
   class (including those opened earlier in this pass) exceeds ``lambda`` opens a cluster of that class at itself
   (:func:`open_clusters`); (b) soft assignments ``z_ic = softmax_c(-||h_i - mu_c||^2 / (2 sigma))`` over the
   clusters of the point's class, and each mean becomes ``sum_i z_ic h_i / sum_i z_ic`` (:func:`soft_means`).
4. A query's score for class ``n`` is ``max_c -||q - mu_c||^2`` over the clusters ``c`` of class ``n``: its
   nearest cluster of each class (``imp.readout: nearest``, the paper's choice); the loss is the cross-entropy of
   the softmax over these class scores. ``imp.readout: mixture`` scores a class by
   ``logsumexp_c -||q - mu_c||^2`` instead (a soft mixture over the class's clusters, equal weights).

Opening a cluster is a hard decision (it has no gradient, and ``lambda`` is computed without one); everything
else is differentiable: the new clusters' means are support embeddings, the soft assignments and means are
smooth in the embeddings and in ``sigma``, and the gradient flows back through every iteration. ``sigma`` is
learned (in log space) when ``imp.learn_sigma`` is set; it reaches the loss only through the soft assignments
(the class scores are plain squared distances, as ProtoNet's). The clustering is supervised: queries are not
clustered (the paper also has a semi-supervised variant that clusters unlabelled examples, not implemented
here), so a query's scores do not depend on the other queries (inductive, with inductive BatchNorm).

One shot: a class's only support point is its prototype, at distance 0, so no cluster is ever opened and IMP is
exactly ProtoNet (``sigma`` then gets no gradient). IMP differs from ProtoNet only with several shots per class.

Details recalled from the paper without its text at hand (to check against it): the threshold's form and its
estimate of ``rho`` from the prototypes; ``sigma`` learned as one scalar for the labelled clusters; the nearest
cluster (not a mixture) as the class score, in training as at test (the official code may instead take the
cross-entropy over all clusters with the nearest cluster of the true class as target); the defaults of
``alpha`` (0.1), the initial ``sigma`` (1) and the number of iterations (3) are this module's choices.

Evaluation protocol: BatchNorm is inductive by default (running statistics; ``imp.batchnorm``), as ProtoNet's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from metalab.config import MAX_FILTERS, MAX_INNER_STEPS, require, require_between
from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta.episodic import build_episodic, embed_tasks, squared_distances
from metalab.meta.protonet import class_means
from metalab.models import BatchNormMode, Conv4
from metalab.train.loop import Learner

Readout = Literal["nearest", "mixture"]
"""How a class's clusters score a query: ``nearest`` (the closest one, the paper's) or ``mixture``
(``logsumexp`` of their scores)."""
MIN_MASS = 1e-12
"""A cluster whose soft assignments sum to less keeps its previous mean (no point is near it any more)."""


@dataclass(frozen=True)
class Config:
    """IMP hyperparameters (the ``imp`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters (the embedding is 64-d on 28x28 Omniglot)."""
    alpha: float = 0.1
    """Concentration of the CRP prior: larger opens new clusters more readily (it lowers ``lambda``)."""
    sigma: float = 1.0
    """Variance of a cluster: the temperature ``2 sigma`` of the soft assignments, and a scale of ``lambda``;
    the initial value when ``learn_sigma``."""
    learn_sigma: bool = True
    """Learn ``sigma`` (as ``log sigma``) with the embedding; false: keep it fixed."""
    iterations: int = 3
    """Clustering passes per episode (each: open clusters, then soft assignments and means)."""
    readout: Readout = "nearest"
    """Class score of a query: ``nearest`` (its closest cluster of the class, the paper's) or ``mixture``
    (``logsumexp`` over the class's clusters)."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each query on its own) or ``transductive``
    (the episode's statistics); see :data:`metalab.models.BatchNormMode`."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require(0 < self.alpha < math.inf, "alpha", f"must be > 0, got {self.alpha}")
        require_between(self.sigma, "sigma", 1e-6, 1e6)
        require_between(self.iterations, "iterations", 1, MAX_INNER_STEPS)


class Clusters(NamedTuple):
    """The clusters of one episode: ``means`` ``(C, D)`` and the class of each, ``labels`` ``(C,)``; the first N
    are the classes' initial prototypes, in class order."""

    means: torch.Tensor
    labels: torch.Tensor

    def counts(self, n_way: int) -> torch.Tensor:
        """Clusters per class, ``(N,)``."""
        return torch.bincount(self.labels, minlength=n_way)


def threshold(prototypes: torch.Tensor, sigma: float, alpha: float) -> float:
    """The squared distance ``lambda`` beyond which a point opens a new cluster, from ``(N, D)`` prototypes:
    ``-2 sigma log(alpha) + D sigma log(1 + rho / sigma)``, ``rho`` the prototypes' variance over classes (per
    dimension, averaged)."""
    rho = prototypes.detach().var(0, correction=0).mean().item()
    d = prototypes.shape[-1]
    return -2.0 * sigma * math.log(alpha) + d * sigma * math.log1p(rho / sigma)


def open_clusters(
    support: torch.Tensor, support_y: torch.Tensor, clusters: Clusters, lam: float
) -> torch.Tensor:
    """The support points that open a cluster in one pass, in support order: ``(S, D), (S,) -> (new,)`` indices.

    Point ``i`` opens one when its squared distance to every cluster of its class exceeds ``lam``, counting the
    clusters opened by earlier points of this pass (at those points). A hard decision: computed without gradient.
    """
    with torch.no_grad():
        own = clusters.labels[None] == support_y[:, None]  # (S, C)
        d = squared_distances(support, clusters.means).masked_fill(~own, math.inf)
        nearest = d.min(1).values  # (S,) to the nearest cluster of its class
        opened: list[int] = []
        start = 0
        while True:
            far = (nearest[start:] > lam).nonzero()
            if far.numel() == 0:
                return torch.tensor(opened, dtype=torch.long, device=support.device)
            i = start + int(far[0])
            opened.append(i)
            # the points of its class after it now also measure their distance to it
            to_new = squared_distances(support[i + 1 :], support[i : i + 1]).squeeze(1)  # (S-i-1,)
            same = support_y[i + 1 :] == support_y[i]
            nearest[i + 1 :] = torch.where(same, torch.minimum(nearest[i + 1 :], to_new), nearest[i + 1 :])
            start = i + 1


def soft_means(
    support: torch.Tensor, support_y: torch.Tensor, clusters: Clusters, sigma: torch.Tensor
) -> Clusters:
    """One soft update of the means: each point is shared among the clusters of its class by
    ``softmax_c(-||h_i - mu_c||^2 / (2 sigma))``, and each mean becomes the weighted mean of its points."""
    own = clusters.labels[None] == support_y[:, None]  # (S, C)
    scores = -squared_distances(support, clusters.means) / (2 * sigma)
    # (S, C); every class has a cluster, so no row is all -inf
    z = scores.masked_fill(~own, -math.inf).softmax(1)
    mass = z.sum(0)  # (C,)
    means = z.T @ support / mass.clamp_min(MIN_MASS)[:, None]  # (C, D)
    return clusters._replace(means=torch.where(mass[:, None] >= MIN_MASS, means, clusters.means))


def infer_clusters(
    support: torch.Tensor,
    support_y: torch.Tensor,
    n_way: int,
    sigma: torch.Tensor,
    lam: float,
    iterations: int,
) -> Clusters:
    """IMP's clusters of one episode: ``(S, D)`` support embeddings with labels ``(S,)`` in ``0..n_way-1``,
    starting from the class prototypes, ``iterations`` passes of :func:`open_clusters` then :func:`soft_means`."""
    clusters = Clusters(class_means(support, support_y, n_way), torch.arange(n_way, device=support.device))
    for _ in range(iterations):
        new = open_clusters(support, support_y, clusters, lam)
        if new.numel():
            clusters = Clusters(
                torch.cat([clusters.means, support[new]]), torch.cat([clusters.labels, support_y[new]])
            )
        clusters = soft_means(support, support_y, clusters, sigma)
    return clusters


def class_scores(query: torch.Tensor, clusters: Clusters, n_way: int, readout: Readout) -> torch.Tensor:
    """``(Q, D)`` queries -> ``(Q, N)`` class scores from the clusters: ``max`` (``nearest``) or ``logsumexp``
    (``mixture``) of ``-||q - mu_c||^2`` over each class's clusters."""
    scores = -squared_distances(query, clusters.means)  # (Q, C)
    if readout == "nearest":
        index = clusters.labels.expand(query.shape[0], -1)  # (Q, C)
        empty = scores.new_full((query.shape[0], n_way), -math.inf)
        return empty.scatter_reduce(1, index, scores, "amax")
    member = clusters.labels[:, None] == torch.arange(n_way, device=scores.device)  # (C, N)
    return scores[:, :, None].masked_fill(~member, -math.inf).logsumexp(1)  # (Q, N)


def imp_logits(
    support: torch.Tensor,
    support_y: torch.Tensor,
    query: torch.Tensor,
    n_way: int,
    *,
    sigma: torch.Tensor,
    alpha: float,
    iterations: int,
    readout: Readout = "nearest",
) -> torch.Tensor:
    """Query logits ``(Q, N)`` of one episode's embeddings: support ``(S, D)`` with labels ``(S,)``, queries
    ``(Q, D)``; ``lambda`` from the episode's prototypes (:func:`threshold`)."""
    lam = threshold(class_means(support, support_y, n_way), sigma.detach().item(), alpha)
    clusters = infer_clusters(support, support_y, n_way, sigma, lam, iterations)
    return class_scores(query, clusters, n_way, readout)


class IMP(nn.Module):
    """A Conv-4 embedding and the clusters' variance ``sigma`` (``log_sigma``, a parameter when learned)."""

    def __init__(self, cfg: Config, image_size: int = 28):
        super().__init__()
        self.encoder = Conv4(1, cfg.hidden, image_size=image_size)
        log_sigma = torch.tensor(math.log(cfg.sigma))
        if cfg.learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        self.alpha, self.iterations, self.readout = cfg.alpha, cfg.iterations, cfg.readout

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()


def episode_logits(model: IMP, ep: Episode) -> torch.Tensor:
    """Query logits ``(T, N*Q, N)`` of a batched episode. One task at a time: the number of clusters differs."""
    n_support = ep.support_x.shape[1]
    z = embed_tasks(model.encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, N*(K+Q), D)
    sigma = model.sigma
    return torch.stack(
        [
            imp_logits(
                z[t, :n_support],
                ep.support_y[t],
                z[t, n_support:],
                ep.n_way,
                sigma=sigma,
                alpha=model.alpha,
                iterations=model.iterations,
                readout=model.readout,
            )
            for t in range(ep.tasks)
        ]
    )


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss (cross-entropy of the class scores) and evaluation for an IMP run."""
    model = IMP(run.params, run.task.image_size)
    return build_episodic(run, root, device, model, lambda ep: episode_logits(model, ep))
