"""Siamese networks for one-shot recognition (Koch, Zemel & Salakhutdinov, ICML DL workshop 2015).

A twin embedding network and a verification head ``sigmoid(w . |f(x1) - f(x2)| + b)`` give the probability
that two images show the same class. It is trained on pairs (binary cross-entropy); here the pairs are every
(query, support) pair of a training episode, with positives weighted ``N - 1`` so both classes count equally.
At test time a query takes the label of the support example it most probably matches (with K shots, the class
score is the mean of its K match logits). The embedding is Conv-4, not the paper's larger 105x105 network.

Evaluation protocol: BatchNorm is inductive by default (running statistics; ``siamese.batchnorm``), each pair
scored on its own as a verification network does; ``transductive`` normalises with the episode's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metalab.config import MAX_FILTERS, require_between
from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta.episodic import build_episodic, embed_tasks
from metalab.models import BatchNormMode, Conv4
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config:
    """Siamese network hyperparameters (the ``siamese`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each query on its own) or ``transductive``
    (the episode's statistics); see :data:`metalab.models.BatchNormMode`."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)


class SiameseNet(nn.Module):
    def __init__(self, hidden: int = 64, image_size: int = 28):
        super().__init__()
        self.encoder = Conv4(1, hidden, image_size=image_size)
        self.verify = nn.Linear(self.encoder.embedding_dim, 1)


def pair_logits(model: SiameseNet, ep: Episode) -> torch.Tensor:
    """Same-class logits of every (query, support) pair: ``(T, N*Q, N*K)``."""
    n_support = ep.support_x.shape[1]
    z = embed_tasks(model.encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, S+Q, D)
    distance = (z[:, n_support:, None] - z[:, None, :n_support]).abs()  # (T, Q, S, D) L1 component-wise
    return model.verify(distance).squeeze(-1)


def class_scores(pair: torch.Tensor, ep: Episode) -> torch.Tensor:
    """``(T, N*Q, N)``: mean match logit of each query against each class's K support examples."""
    return pair.unflatten(-1, (ep.n_way, ep.k_shot)).mean(-1)


def verification_loss(model: SiameseNet, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy over all (query, support) pairs, positives weighted ``N - 1``; and class scores."""
    logits = pair_logits(model, ep)
    same = (ep.query_y[:, :, None] == ep.support_y[:, None, :]).to(logits.dtype)  # (T, Q, S)
    weight = torch.tensor(max(ep.n_way - 1, 1), dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, same, pos_weight=weight), class_scores(logits, ep)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a Siamese network run."""
    cfg: Config = run.params
    model = SiameseNet(cfg.hidden, run.task.image_size)
    return build_episodic(
        run,
        root,
        device,
        model,
        lambda ep: class_scores(pair_logits(model, ep), ep),
        lambda ep: verification_loss(model, ep),
    )
