"""Episodes: N-way K-shot classification tasks, drawn as stacked tensors ready for ``torch.func.vmap``.

A sampler is a pure function of ``(seed, index)``: episode batch ``index`` is the same whenever and wherever it
is drawn, so training resumes exactly and evaluation sets are fixed without storing them. All selection is
tensor indexing on the pre-decoded class pool; there is no per-image Python on the hot path.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

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


LabelAssignment = Literal["shuffled", "fixed", "fixed_labels"]
"""How a task's classes get their labels ``0..N-1`` (Yin et al., "Meta-Learning without Memorization", ICLR
2020, call tasks *mutually exclusive* when no single function solves them all).

- ``shuffled``: N classes drawn at random per task, labelled in the order drawn, so a class takes every label
  across tasks: mutually exclusive, the usual few-shot protocol.
- ``fixed``: the classes are split once into fixed groups of N; a task is one group, and a class always has
  the same label (its place in its group). Non-mutually-exclusive: one classifier solves every task.
- ``fixed_labels``: each class owns one label for good (the classes are split once into N sets of equal size,
  set ``i`` being label ``i``); a task draws one class from each set. Non-mutually-exclusive too, with far
  more distinct tasks than ``fixed``.

Yin et al. make few-shot classification non-mutually-exclusive by not randomising the class-to-label
assignment per task; ``fixed`` and ``fixed_labels`` are two ways of fixing it (``fixed``: a finite set of
tasks, the easiest to memorise). Evaluation episodes should stay ``shuffled`` on held-out classes
(:func:`metalab.data.tasks.make_sampler` does so).
"""
NME_GROUPING_SEED = 0
"""Seed of the one random split of the class pool behind ``fixed`` and ``fixed_labels``: it is part of the data
set's definition (like a class split), the same for every run and every sampler seed."""


class EpisodeSampler:
    """Draws batches of N-way K-shot Q-query episodes from a class pool of uint8 images.

    Args:
        pool: ``(n_classes, n_per_class, C, H, W)`` uint8 images (e.g. :attr:`metalab.data.omniglot.ClassSplit.images`).
        n_way: classes per episode (N).
        k_shot: support examples per class (K).
        q_query: query examples per class; ``k_shot + q_query`` must not exceed ``n_per_class``.
        seed: the sampler's stream; batch ``index`` of seed ``s`` is always the same episodes.
        label_assignment: see :data:`LabelAssignment`; ``shuffled`` (the default) draws exactly the episodes
            it always has. With ``fixed`` the ``n_classes mod N`` classes left over by the grouping are never
            drawn; with ``fixed_labels`` neither are those beyond ``N * (n_classes // N)``.
    """

    def __init__(
        self,
        pool: torch.Tensor,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        label_assignment: LabelAssignment = "shuffled",
    ):
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
        if label_assignment not in ("shuffled", "fixed", "fixed_labels"):
            raise ValueError(f"unknown label_assignment {label_assignment!r}")
        self.pool, self.n_way, self.k_shot, self.q_query, self.seed = pool, n_way, k_shot, q_query, seed
        self.label_assignment = label_assignment
        # (N, n_classes // N): column j of fixed's groups is group j; row i of fixed_labels' sets is label i.
        self.groups = label_groups(n_classes, n_way) if label_assignment != "shuffled" else None

    def sample(self, index: int, tasks: int) -> Episode:
        """Episode batch number ``index`` with ``tasks`` tasks; images as float in [0, 1]."""
        g = generator_for(self.seed, index)
        n_classes, per_class = self.pool.shape[:2]
        n, k, q = self.n_way, self.k_shot, self.q_query
        if self.groups is None:
            weights = torch.ones(tasks, n_classes)
            # (T, N) distinct per task
            classes = torch.multinomial(weights, n, replacement=False, generator=g)
        elif self.label_assignment == "fixed":
            group = torch.randint(self.groups.shape[1], (tasks,), generator=g)  # (T,)
            classes = self.groups[:, group].T  # (T, N): label i is always the group's i-th class
        else:
            member = torch.randint(self.groups.shape[1], (tasks, n), generator=g)  # (T, N)
            classes = self.groups[torch.arange(n), member]  # (T, N): class of label i from set i
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


def label_groups(n_classes: int, n_way: int) -> torch.Tensor:
    """``(N, n_classes // N)`` class indices: one fixed random split of the pool (:data:`NME_GROUPING_SEED`).

    Column ``j`` is ``fixed``'s task ``j`` (its class in row ``i`` has label ``i``); row ``i`` is the set of
    classes that ``fixed_labels`` always labels ``i``. Leftover classes (``n_classes mod N``) are dropped.
    """
    order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(NME_GROUPING_SEED))
    per_label = n_classes // n_way
    return order[: per_label * n_way].reshape(per_label, n_way).T.contiguous()


class LabeledBatch(NamedTuple):
    """Images with their class in the pool they came from: a plain classification batch, not an episode."""

    x: torch.Tensor  # (B, C, H, W) float in [0, 1]
    y: torch.Tensor  # (B,) int64: class index in the pool, 0..n_classes-1

    def to(self, device: torch.device | str) -> LabeledBatch:
        return LabeledBatch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))


class ClassBatchSampler:
    """Draws batches of (image, class) pairs for whole-pool classification (pretraining on every class).

    Each pair is drawn uniformly over every image of the pool, independently (with replacement), so a class is
    drawn in proportion to its images; its label is its index in the pool. Like :class:`EpisodeSampler`, batch
    ``index`` of seed ``s`` is always the same images.

    Args:
        pool: ``(n_classes, n_per_class, C, H, W)`` uint8 images (e.g. :attr:`metalab.data.omniglot.ClassSplit.images`).
        seed: the sampler's stream.
    """

    def __init__(self, pool: torch.Tensor, seed: int = 0):
        if pool.dtype != torch.uint8 or pool.dim() != 5:
            raise ValueError(
                f"pool must be uint8 (classes, samples, C, H, W), got {pool.dtype} {tuple(pool.shape)}"
            )
        self.pool, self.seed = pool, seed

    @property
    def classes(self) -> int:
        """Number of classes (labels are ``0..classes-1``)."""
        return self.pool.shape[0]

    def sample(self, index: int, size: int) -> LabeledBatch:
        """Batch number ``index`` of ``size`` images (float in [0, 1]) and their classes."""
        per_class = self.pool.shape[1]
        flat = torch.randint(self.classes * per_class, (size,), generator=generator_for(self.seed, index))
        y = flat // per_class  # (B,)
        x = self.pool[y, flat % per_class].float().div_(255.0)  # (B, C, H, W)
        return LabeledBatch(x, y)


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


PROBE_OFFSET = 1 << 40
"""Index offset of the episodes whose support sets :class:`SupportSwapped` borrows (never a drawn index)."""


class SupportSwapped:
    """Wraps a sampler so that each task's support set is another task's: the memorisation probe.

    Batch ``index`` is the base batch ``index`` with its support examples and labels replaced by those of the
    base batch ``index + PROBE_OFFSET`` (other classes, or another function). The query set is untouched. A
    learner that adapts to its support set falls to chance on these tasks; one that memorised the training
    tasks (Yin et al., ICLR 2020: non-mutually-exclusive tasks) answers the queries as well as with the true
    support set, because it never looked at it.
    """

    def __init__(self, base: EpisodeSampler):
        self.base = base

    def sample(self, index: int, tasks: int) -> Episode:
        ep, other = self.base.sample(index, tasks), self.base.sample(index + PROBE_OFFSET, tasks)
        return ep._replace(support_x=other.support_x, support_y=other.support_y)
