"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

A class prototype is the mean embedding of its support examples; a query is classified by a softmax over
negative squared Euclidean distances to the prototypes. Training may use more ways than testing (60-way
training for Omniglot in the paper): set ``task.train_ways``.

Evaluation protocol: BatchNorm is inductive by default (running statistics; ``protonet.batchnorm``), as the
official ProtoNet code evaluates; ``transductive`` normalises with the episode's statistics.

MR-ProtoNet (``protonet.bottleneck: D``): meta-regularization on activations, form (A) of Yin et al.,
"Meta-Learning without Memorization" (ICLR 2020), for non-mutually-exclusive tasks: the embedding passes
through a Gaussian bottleneck (:class:`metalab.meta.metareg.GaussianBottleneck`), sampled in training, its mean
at evaluation, and ``bottleneck_beta * KL(q(z|x) || N(0, I))`` joins the loss. Off by default.

Text tasks (``task.dataset: smlmt``, :mod:`metalab.data.text`; Bansal et al., EMNLP 2020): the embedding is a
:class:`~metalab.models.text.SentenceEncoder` of width ``protonet.hidden`` over token ids; prototypes, loss and
evaluation are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from metalab.config import MAX_FILTERS, MAX_UNITS, require, require_between
from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta.episodic import (
    build_episodic,
    cross_entropy,
    embed_sentences,
    embed_tasks,
    squared_distances,
    text_parts,
)
from metalab.meta.metareg import Bottleneck, GaussianBottleneck
from metalab.models import BatchNormMode, Conv4
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config:
    """ProtoNet hyperparameters (the ``protonet`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters; on text tasks, the sentence encoder's width (a multiple of its 4 attention heads)."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each query on its own) or ``transductive``
    (the episode's statistics); see :data:`metalab.models.BatchNormMode`."""
    bottleneck: int = 0
    """MR-ProtoNet: width D of a Gaussian bottleneck on the embedding (meta-regularization on activations);
    0: none, plain ProtoNet."""
    bottleneck_beta: float = 0.01
    """Weight of the bottleneck's KL to ``N(0, I)`` (summed over D, averaged over images); with
    ``bottleneck`` only."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require_between(self.bottleneck, "bottleneck", 0, MAX_UNITS, " (0: no bottleneck)")
        require(self.bottleneck_beta >= 0, "bottleneck_beta", f"must be >= 0, got {self.bottleneck_beta}")


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
    with torch.autocast(query.device.type, enabled=False):  # float32 prototypes under train.autocast
        means = class_means(support.to(torch.promote_types(support.dtype, torch.float32)), support_y, n_way)
        return -squared_distances(query, means)


def episode_logits(encoder: nn.Module, ep: Episode) -> torch.Tensor:
    """Query logits ``(T, N*Q, N)`` of a batched episode."""
    z = embed_tasks(encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, N*(K+Q), D)
    return embedding_logits(z, ep)


def embedding_logits(z: torch.Tensor, ep: Episode) -> torch.Tensor:
    """Query logits ``(T, N*Q, N)`` from the embeddings ``(T, N*(K+Q), D)`` of an episode's support then query."""
    n_support = ep.support_x.shape[1]
    logits = vmap(prototype_logits, in_dims=(0, 0, 0, None))
    return logits(z[:, :n_support], ep.support_y, z[:, n_support:], ep.n_way)


class BottleneckEncoder(nn.Module):
    """MR-ProtoNet's embedding: a Conv-4, then a :class:`GaussianBottleneck` of ``features`` dimensions. Its
    forward is the code ``z``: a sample in training mode, the mean in eval mode."""

    def __init__(self, conv: Conv4, features: int):
        super().__init__()
        self.conv = conv
        self.bottleneck = GaussianBottleneck(conv.embedding_dim, features)

    def encode(self, x: torch.Tensor) -> Bottleneck:
        return self.bottleneck(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).z


def regularized_loss(model: BottleneckEncoder, beta: float, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """MR-ProtoNet's training loss: cross-entropy of the sampled codes' logits plus ``beta`` times the mean KL
    of the codes to ``N(0, I)``. Returns (loss, logits)."""
    images = torch.cat([ep.support_x, ep.query_x], dim=1)  # (T, N*(K+Q), C, H, W)
    # One forward per task (BatchNorm statistics per task), channels-last, as embed_tasks does.
    codes = [model.encode(x.contiguous(memory_format=torch.channels_last)) for x in images]
    z = torch.stack([c.z for c in codes])  # (T, N*(K+Q), D)
    kl = torch.stack([c.kl() for c in codes]).mean()
    logits = embedding_logits(z, ep)
    return cross_entropy(logits, ep) + beta * kl, logits


def build_text(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """ProtoNet on SMLMT text tasks (:mod:`metalab.data.text`): a sentence encoder trained from scratch as the
    embedding; the training loss and the evaluation are :func:`~metalab.meta.episodic.build_episodic`'s, over the
    text samplers."""
    cfg: Config = run.params
    require(cfg.bottleneck == 0, "protonet.bottleneck", "the bottleneck is for images; text tasks need 0")
    encoder, samplers = text_parts(run, root, cfg.hidden, "protonet.hidden")
    return build_episodic(
        run,
        root,
        device,
        encoder,
        lambda ep: embedding_logits(embed_sentences(encoder, ep), ep),
        samplers=samplers,
    )


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a ProtoNet run (text tasks: :func:`build_text`)."""
    cfg: Config = run.params
    if run.task.dataset == "smlmt":
        return build_text(run, root, device)
    model = Conv4(1, cfg.hidden, image_size=run.task.image_size)
    if cfg.bottleneck:
        encoder = BottleneckEncoder(model, cfg.bottleneck)
        return build_episodic(
            run,
            root,
            device,
            encoder,
            lambda ep: episode_logits(encoder, ep),
            lambda ep: regularized_loss(encoder, cfg.bottleneck_beta, ep),
        )
    return build_episodic(run, root, device, model, lambda ep: episode_logits(model, ep))
