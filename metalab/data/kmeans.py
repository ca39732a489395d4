"""Batched k-means in torch: the clustering of CACTUs' partitions (:mod:`metalab.data.cactus`), on any points.

:func:`kmeans`: Lloyd's k-means in torch for ``B`` runs at once (restarts, or rescaled copies of the points
given as per-run dimension weights, never materialised), k-means++ or random seeding from a
``torch.Generator``, distances by the expanded square in chunks of points, empty clusters refilled with far
points. 82,240 points of 64 dimensions into 500 clusters: about 0.15 s per iteration per run on one core.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

KMeansInit = Literal["k-means++", "random"]

MAX_DISTANCES = 1 << 22
"""Most point-to-centroid distances held at once (16 MB of float32): points are assigned in chunks of this."""


class KMeans(NamedTuple):
    """The result of :func:`kmeans` for ``B`` runs (restarts or weightings) at once."""

    centroids: torch.Tensor  # (B, k, D), in the coordinates of the points
    assignments: torch.Tensor  # (B, M) int64: each point's nearest centroid
    inertia: torch.Tensor  # (B,) sum over points of the (weighted) squared distance to their centroid
    iterations: int  # Lloyd iterations run (the largest over the runs; fewer when all converged)


def weighted_sq_distances(
    x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances ``sum_d w_bd (x_md - c_bjd)^2`` up to the per-point term, and that term.

    Returns ``(partial, x_term)``: ``partial`` ``(M, B, k)`` is ``sum_d w (c^2 - 2 x c)`` (one matmul for
    every run: the points are shared), ``x_term`` ``(M, B)`` is ``sum_d w x^2``; their sum is the distance.
    The nearest centroid is the argmin of ``partial`` alone.
    """
    b, k, d = centroids.shape
    wc = weights[:, None, :] * centroids  # (B, k, D)
    cross = x @ wc.reshape(b * k, d).T  # (M, B*k)
    c_term = (wc * centroids).sum(-1)  # (B, k)
    partial = cross.view(-1, b, k).mul_(-2).add_(c_term)  # (M, B, k)
    x_term = (x * x) @ weights.T  # (M, B)
    return partial, x_term


def nearest(
    x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's nearest centroid ``(B, M)`` and its squared distance ``(B, M)``, in chunks of points."""
    b, k, _ = centroids.shape
    chunk = max(1, MAX_DISTANCES // (b * k))
    labels, dists = [], []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        partial, x_term = weighted_sq_distances(part, centroids, weights)
        best, label = partial.min(-1)  # (m, B)
        labels.append(label.T)
        dists.append((best + x_term).clamp_(min=0).T)  # rounding can take a tiny distance below 0
    return torch.cat(labels, 1), torch.cat(dists, 1)


def kmeans_plus_plus(x: torch.Tensor, k: int, weights: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, SODA 2007) for every run: ``(B, k, D)`` initial centroids.

    The first centroid is a uniform draw; each next one a draw with probability proportional to the (weighted)
    squared distance to the nearest centroid so far (inverse-CDF sampling: one ``cumsum`` and one
    ``searchsorted`` per centroid, for every run at once). A run whose points all coincide with its centroids
    so far draws uniformly.
    """
    b, m = weights.shape[0], x.shape[0]
    x_term = (x * x) @ weights.T  # (M, B)

    def distance_to(picks: torch.Tensor) -> torch.Tensor:  # (B,) point indices -> (B, M) distances
        wc = weights * x[picks]  # (B, D)
        return (x_term - 2 * (x @ wc.T) + (wc * x[picks]).sum(1)).T.clamp_(min=0)

    chosen = torch.empty(b, k, dtype=torch.long)
    chosen[:, 0] = torch.randint(m, (b,), generator=g)
    closest = distance_to(chosen[:, 0])
    for j in range(1, k):
        cdf = closest.cumsum(1)  # (B, M)
        total = cdf[:, -1]
        u = torch.rand(b, generator=g, dtype=x.dtype)
        drawn = torch.searchsorted(cdf, (u * total)[:, None], right=True).squeeze(1).clamp_(max=m - 1)
        uniform = (u * m).long().clamp_(max=m - 1)
        chosen[:, j] = torch.where(total > 0, drawn, uniform)
        closest = torch.minimum(closest, distance_to(chosen[:, j]))
    return x[chosen]  # (B, k, D)


def update_centroids(
    x: torch.Tensor,
    assignments: torch.Tensor,
    distances: torch.Tensor,
    centroids: torch.Tensor,
) -> torch.Tensor:
    """The mean of each cluster's points; an empty cluster moves onto a point far from its centroid.

    Empty clusters of a run take, in order of their index, the points with the largest distance to their own
    centroid (the farthest point first), each a different point; that point keeps its own cluster's mean too,
    so the next assignment splits the worst-fitted region (as scikit-learn's Lloyd does).
    """
    b, k, d = centroids.shape
    sums = torch.zeros(b, k, d, dtype=x.dtype)
    for run in range(b):  # one index_add per run: the points are not copied B times
        sums[run].index_add_(0, assignments[run], x)
    flat = assignments + torch.arange(b)[:, None] * k  # (B, M): cluster ids unique across runs
    counts = torch.bincount(flat.flatten(), minlength=b * k).view(b, k)
    means = (sums / counts.clamp(min=1)[..., None].to(x.dtype)).where(counts[..., None] > 0, centroids)
    empty = counts == 0  # (B, k)
    most = int(empty.sum(1).max())
    if most == 0:
        return means
    far = distances.topk(most, dim=1).indices  # (B, E): farthest points first
    rank = (empty.cumsum(1) - 1).clamp(min=0)  # (B, k): j-th empty cluster of its run -> j
    donor = far.gather(1, rank.clamp(max=most - 1))  # (B, k)
    return torch.where(empty[..., None], x[donor], means)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    init: KMeansInit | torch.Tensor = "k-means++",
    iterations: int = 20,
    generator: torch.Generator | None = None,
) -> KMeans:
    """Lloyd's k-means of the points ``x`` ``(M, D)``, for ``B`` runs at once: restarts or rescaled copies.

    Run ``b`` clusters the points under the squared distance ``sum_d weights[b, d] (x_d - c_d)^2``: with
    ``weights = s**2`` that is k-means of the rescaled points ``x * s`` (CACTUs' random scalings), with its
    centroids given back divided by ``s`` (the same assignments and inertia); with ones it is plain k-means,
    and ``B`` rows of ones are ``B`` restarts from different seedings. The points are never copied per run:
    the distances of every run come from one matmul (:func:`weighted_sq_distances`), in chunks of points.

    Each iteration assigns every point to its nearest centroid, then moves each centroid to its cluster's mean
    (:func:`update_centroids`, which also refills empty clusters); it stops early once no assignment changes.

    Args:
        x: ``(M, D)`` float points.
        k: clusters per run, at most ``M``.
        weights: ``(B, D)`` non-negative weight of each dimension in each run; ``None``: one run of ones.
        init: ``k-means++`` (:func:`kmeans_plus_plus`), ``random`` (``k`` distinct points drawn uniformly), or
            the ``(B, k, D)`` initial centroids themselves.
        iterations: most Lloyd iterations.
        generator: the random stream of the seeding (a fixed one when ``None``).

    The result (:class:`KMeans`) holds the centroids, each point's nearest of them, the inertia and the number
    of iterations run.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be float (M, D), got {x.dtype} {tuple(x.shape)}")
    m, d = x.shape
    if not 1 <= k <= m:
        raise ValueError(f"k={k} clusters for {m} points")
    weights = torch.ones(1, d, dtype=x.dtype) if weights is None else weights.to(x.dtype)
    if weights.dim() != 2 or weights.shape[1] != d or bool((weights < 0).any()):
        raise ValueError(f"weights must be non-negative (B, {d}), got {tuple(weights.shape)}")
    b = weights.shape[0]
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if isinstance(init, torch.Tensor):
        if init.shape != (b, k, d):
            raise ValueError(f"initial centroids must be {(b, k, d)}, got {tuple(init.shape)}")
        centroids = init.to(x.dtype).clone()
    elif init == "k-means++":
        centroids = kmeans_plus_plus(x, k, weights, g)
    elif init == "random":
        picks = torch.rand(b, m, generator=g).argsort(1)[:, :k]  # (B, k) distinct points per run
        centroids = x[picks]
    else:
        raise ValueError(f"unknown init {init!r}; choose 'k-means++', 'random' or a tensor")
    assignments, distances = nearest(x, centroids, weights)
    done = 0
    for done in range(1, iterations + 1):  # noqa: B007 (the count is returned)
        centroids = update_centroids(x, assignments, distances, centroids)
        new, distances = nearest(x, centroids, weights)
        changed = bool((new != assignments).any())
        assignments = new
        if not changed:
            break
    return KMeans(centroids, assignments, distances.sum(1), done)
