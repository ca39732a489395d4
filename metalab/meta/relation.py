"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018).

An embedding module maps images to feature maps; a class's feature map is the sum over its support examples;
a relation module scores each (class, query) pair of concatenated feature maps in [0, 1] and is trained with
mean squared error against the one-hot match. On 28x28 Omniglot the embedding is 4 conv blocks (64 filters,
padding 1, max-pool after the first two): 64x7x7 maps; the relation module is 2 conv blocks with max-pool
(7 -> 3 -> 1) then 64 -> 8 -> 1 fully connected with a sigmoid, as in the paper's Omniglot architecture.

Evaluation protocol: BatchNorm is inductive by default (running statistics; ``relation.batchnorm``), as the
official Relation Network code evaluates; ``transductive`` normalises with the episode's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metalab.config import MAX_FILTERS, MAX_WIDTH, require_between
from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta.episodic import build_episodic, embed_tasks
from metalab.models.conv4 import BatchNormMode, conv_block
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config:
    """Relation network hyperparameters (the ``relation`` section of a config)."""

    hidden: int = 64
    """Filters of both modules."""
    relation_dim: int = 8
    """Width of the relation module's hidden fully connected layer."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each query on its own) or ``transductive``
    (the episode's statistics); see :data:`metalab.models.BatchNormMode`."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require_between(self.relation_dim, "relation_dim", 1, MAX_WIDTH)


class RelationNet(nn.Module):
    def __init__(self, hidden: int = 64, relation_dim: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(
            conv_block(1, hidden),
            conv_block(hidden, hidden),
            conv_block(hidden, hidden, pool=False),
            conv_block(hidden, hidden, pool=False),
        )
        self.relation = nn.Sequential(
            conv_block(2 * hidden, hidden),
            conv_block(hidden, hidden),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(hidden, relation_dim),
            nn.ReLU(),
            nn.Linear(relation_dim, 1),
        )


def relation_scores(model: RelationNet, ep: Episode) -> torch.Tensor:
    """``(T, N*Q, N)`` relation logits (sigmoid gives the score in [0, 1])."""
    t, n, k, q = ep.tasks, ep.n_way, ep.k_shot, ep.q_query
    maps = embed_tasks(model.encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, N*(K+Q), C, h, w)
    support, query = maps[:, : n * k], maps[:, n * k :]
    classes = support.unflatten(1, (n, k)).sum(2)  # (T, N, C, h, w): support is grouped by class
    pairs = torch.cat(
        [classes[:, None].expand(-1, n * q, -1, -1, -1, -1), query[:, :, None].expand(-1, -1, n, -1, -1, -1)],
        dim=3,
    )  # (T, N*Q, N, 2C, h, w)
    # each task's pairs form one batch through the relation module (per-task BatchNorm statistics)
    logits = embed_tasks(model.relation, pairs.flatten(1, 2))  # (T, N*Q*N, 1)
    return logits.view(t, n * q, n)


def mse_to_onehot(model: RelationNet, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's loss: mean squared error between sigmoid relation scores and the one-hot match."""
    scores = relation_scores(model, ep)
    return F.mse_loss(torch.sigmoid(scores), F.one_hot(ep.query_y, ep.n_way).to(scores.dtype)), scores


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a Relation network run."""
    cfg: Config = run.params
    model = RelationNet(cfg.hidden, cfg.relation_dim)
    return build_episodic(
        run, root, device, model, lambda ep: relation_scores(model, ep), lambda ep: mse_to_onehot(model, ep)
    )
