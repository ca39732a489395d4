"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

A class prototype is the mean embedding of its support examples; a query is classified by a softmax over
negative squared Euclidean distances to the prototypes. Training may use more ways than testing (60-way
training for Omniglot in the paper): set ``task.train_ways``.

Evaluation protocol: BatchNorm is inductive by default (running statistics; ``protonet.batchnorm``), as the
official ProtoNet code evaluates; ``transductive`` normalises with the episode's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from metalab.config import MAX_FILTERS, require_between
from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta.episodic import build_episodic, embed_tasks
from metalab.models import BatchNormMode, Conv4
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config:
    """ProtoNet hyperparameters (the ``protonet`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each query on its own) or ``transductive``
    (the episode's statistics); see :data:`metalab.models.BatchNormMode`."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)


def class_means(support: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean of the support embeddings of each class: ``(S, D), (S,) -> (N, D)``."""
    onehot = F.one_hot(support_y, n_way).to(support.dtype)  # (S, N)
    return onehot.T @ support / onehot.sum(0)[:, None]


def prototype_logits(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int
) -> torch.Tensor:
    """Logits ``-||q - c_k||^2`` of each query against each class mean ``c_k`` of the support embeddings.

    ``support`` (S, D), ``support_y`` (S,) in ``0..n_way-1``, ``query`` (Q, D) -> (Q, n_way).
    """
    return -torch.cdist(query, class_means(support, support_y, n_way)).pow(2)


def episode_logits(encoder: nn.Module, ep: Episode) -> torch.Tensor:
    """Query logits ``(T, N*Q, N)`` of a batched episode."""
    n_support = ep.support_x.shape[1]
    z = embed_tasks(encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, N*(K+Q), D)
    logits = vmap(prototype_logits, in_dims=(0, 0, 0, None))
    return logits(z[:, :n_support], ep.support_y, z[:, n_support:], ep.n_way)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a ProtoNet run."""
    cfg: Config = run.params
    model = Conv4(1, cfg.hidden, image_size=run.task.image_size)
    return build_episodic(run, root, device, model, lambda ep: episode_logits(model, ep))
