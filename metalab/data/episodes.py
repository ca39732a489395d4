"""Episodes: N-way K-shot classification tasks, drawn as stacked tensors ready for ``torch.func.vmap``.

A sampler is a pure function of ``(seed, index)``: episode batch ``index`` is the same whenever and wherever it
is drawn, so training resumes exactly and evaluation sets are fixed without storing them. All selection is
tensor indexing on the pre-decoded class pool; there is no per-image Python on the hot path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Episode(NamedTuple):
    """One task, or a batch of tasks when the tensors carry a leading task dimension ``T``.

    Labels are ``0..N-1`` and examples are grouped by class: ``support_y = [0]*K + [1]*K + ...``.
    Regression tasks (sinusoid) use ``n_way = 1`` and float targets.
    """

    support_x: torch.Tensor  # (T, N*K, C, H, W) or (T, K, D)
    support_y: torch.Tensor  # (T, N*K) int64, or (T, K, 1) float for regression
    query_x: torch.Tensor  # (T, N*Q, C, H, W)
    query_y: torch.Tensor  # (T, N*Q)
    n_way: int
    k_shot: int
    q_query: int

    def task(self, i: int) -> Episode:
        """Task ``i`` of a batched episode."""
        return self._replace(
            support_x=self.support_x[i],
            support_y=self.support_y[i],
            query_x=self.query_x[i],
            query_y=self.query_y[i],
        )

    def to(self, device: torch.device | str) -> Episode:
        return self._replace(
            support_x=self.support_x.to(device, non_blocking=True),
            support_y=self.support_y.to(device, non_blocking=True),
            query_x=self.query_x.to(device, non_blocking=True),
            query_y=self.query_y.to(device, non_blocking=True),
        )

    @property
    def tasks(self) -> int:
        """Number of tasks in a batched episode."""
        return self.support_x.shape[0]


def generator_for(seed: int, index: int) -> torch.Generator:
    """A torch generator whose stream depends only on ``(seed, index)``, well mixed (no seed+index overlap)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class EpisodeSampler:
    """Draws batches of N-way K-shot Q-query episodes from a class pool of uint8 images.

    Args:
        pool: ``(n_classes, n_per_class, C, H, W)`` uint8 images (e.g. :attr:`ClassSplit.images`).
        n_way, k_shot, q_query: episode shape; ``k_shot + q_query`` must not exceed ``n_per_class``.
        seed: the sampler's stream; batch ``index`` of seed ``s`` is always the same episodes.
    """

    def __init__(self, pool: torch.Tensor, n_way: int, k_shot: int, q_query: int, seed: int = 0):
        n_classes, per_class = pool.shape[:2]
        if pool.dtype != torch.uint8 or pool.dim() != 5:
            raise ValueError(
                f"pool must be uint8 (classes, samples, C, H, W), got {pool.dtype} {tuple(pool.shape)}"
            )
        if not 1 <= n_way <= n_classes:
            raise ValueError(f"n_way={n_way} but the pool has {n_classes} classes")
        if k_shot < 1 or q_query < 0 or k_shot + q_query > per_class:
            raise ValueError(
                f"k_shot={k_shot} + q_query={q_query} must fit in the {per_class} examples per class"
            )
        self.pool, self.n_way, self.k_shot, self.q_query, self.seed = pool, n_way, k_shot, q_query, seed

    def sample(self, index: int, tasks: int) -> Episode:
        """Episode batch number ``index`` with ``tasks`` tasks; images as float in [0, 1]."""
        g = generator_for(self.seed, index)
        n_classes, per_class = self.pool.shape[:2]
        n, k, q = self.n_way, self.k_shot, self.q_query
        weights = torch.ones(tasks, n_classes)
        classes = torch.multinomial(weights, n, replacement=False, generator=g)  # (T, N) distinct per task
        picks = torch.rand(tasks, n, per_class, generator=g).argsort(-1)[..., : k + q]  # (T, N, K+Q)
        images = self.pool[classes[..., None], picks]  # (T, N, K+Q, C, H, W) uint8
        images = images.float().div_(255.0)
        shape = images.shape[3:]
        support_x = images[:, :, :k].reshape(tasks, n * k, *shape)
        query_x = images[:, :, k:].reshape(tasks, n * q, *shape)
        labels = torch.arange(n)
        support_y = labels.repeat_interleave(k).expand(tasks, -1).contiguous()
        query_y = labels.repeat_interleave(q).expand(tasks, -1).contiguous()
        return Episode(support_x, support_y, query_x, query_y, n, k, q)


def shuffle_order(ep: Episode, g: torch.Generator) -> Episode:
    """The same batched episode with support and query each in a random order per task (for sequence models)."""
    t, s, q = ep.support_y.shape[0], ep.support_y.shape[1], ep.query_y.shape[1]
    sp = torch.rand(t, s, generator=g).argsort(-1)  # (T, S)
    qp = torch.rand(t, q, generator=g).argsort(-1)
    rows = torch.arange(t)[:, None]
    return ep._replace(
        support_x=ep.support_x[rows, sp],
        support_y=ep.support_y[rows, sp],
        query_x=ep.query_x[rows, qp],
        query_y=ep.query_y[rows, qp],
    )


class ShuffledSampler:
    """Wraps a sampler so that batch ``index`` comes with a fixed random order of its examples."""

    def __init__(self, base: EpisodeSampler, seed: int):
        self.base, self.seed = base, seed

    def sample(self, index: int, tasks: int) -> Episode:
        return shuffle_order(self.base.sample(index, tasks), generator_for(self.seed, index))
