"""The shared shape of episodic metric learners: score queries against classes, train on a loss of the scores.

ProtoNets, Matching, Relation and Siamese networks differ only in how an episode becomes class scores and how
those scores are penalised; sampling, evaluation and the trainer hook-up live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metalab.calibration import PooledQueries
from metalab.config import require
from metalab.data import text
from metalab.data.episodes import Episode
from metalab.data.tasks import EvalSamplers, make_sampler
from metalab.experiment import RunConfig
from metalab.models import set_batchnorm_mode
from metalab.models.text import SentenceEncoder
from metalab.train.distributed import shard
from metalab.train.evaluate import PARTS, evaluate_episode_columns
from metalab.train.loop import Learner
from metalab.train.precision import autocast

ScoreFn = Callable[[Episode], torch.Tensor]
"""Batched episode -> ``(T, N*Q, N)`` class scores of each query (higher means more likely)."""
EpisodeLoss = Callable[[Episode], tuple[torch.Tensor, torch.Tensor]]
"""Batched episode -> (scalar training loss, the ``(T, N*Q, N)`` class scores it was computed with)."""


class Samplers(NamedTuple):
    """Where a learner's episodes come from, when not from the image and sinusoid task samplers of
    :mod:`metalab.data.tasks` (e.g. the text tasks of :mod:`metalab.data.text`): anything with
    ``sample(step, batch) -> Episode`` to train, and one fixed-episode sampler per evaluation part."""

    train: Any
    evals: Mapping[str, Any]


def text_parts(run: RunConfig, root: Path, width: int, key: str) -> tuple[SentenceEncoder, Samplers]:
    """A sentence encoder of width ``width`` (the config field ``key``) over the SMLMT vocabulary, and the text
    task samplers (:mod:`metalab.data.text`) of ``run``: what every learner on text tasks starts from."""
    require(width % 4 == 0, key, f"text encoder width must be a multiple of 4, got {width}")
    vocab = text.load_corpus(root).vocab
    encoder = SentenceEncoder(len(vocab), width, max_tokens=text.MAX_TOKENS)
    samplers = Samplers(
        text.make_sampler(run.task, "train", run.seed, root),
        {part: text.eval_sampler(run.task, part, run.eval.seed, root) for part in PARTS},  # fail early
    )
    return encoder, samplers


def embed_sentences(encoder: nn.Module, ep: Episode) -> torch.Tensor:
    """Embeddings ``(T, N*(K+Q), D)`` of a batched text episode's support then query token ids ``(T, N*K, L)``
    and ``(T, N*Q, L)``: every sentence of every task through the encoder in one batch (it has no batch
    statistics)."""
    tokens = torch.cat([ep.support_x, ep.query_x], dim=1)  # (T, N*(K+Q), L)
    return encoder(tokens.flatten(0, 1)).unflatten(0, tokens.shape[:2])


def cross_entropy(scores: torch.Tensor, ep: Episode) -> torch.Tensor:
    """Softmax cross-entropy of ``(T, N*Q, N)`` scores against the query labels."""
    return F.cross_entropy(scores.flatten(0, 1), ep.query_y.flatten())


def embed_tasks(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(T, B, C, H, W) -> (T, B, ...)``: each task is one forward batch, so BatchNorm's batch statistics (in
    training, and at evaluation in transductive mode) are per task.

    A loop over tasks, in channels-last layout: on CPU this measured 1.6x (one task of 360 images) to 3x (four
    tasks of 80) faster for Conv-4 forward+backward than ``vmap`` over the task dimension (torch 2.13).
    """
    return torch.stack([encoder(x.contiguous(memory_format=torch.channels_last)) for x in images])


def squared_distances(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``||x_i - mu_c||^2``: ``(S, D), (C, D) -> (S, C)``, in float32 whatever ``train.autocast`` says (distances
    of nearby embeddings lose their differences in bfloat16, and ``torch.cdist`` has no bfloat16 kernel)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, means.dtype), torch.float32)  # float64 stays
    with torch.autocast(x.device.type, enabled=False):
        return torch.cdist(x.to(dtype), means.to(dtype)).pow(2)


def accuracy(scores: torch.Tensor, ep: Episode) -> torch.Tensor:
    """Per-task query accuracy ``(T,)``."""
    return (scores.argmax(-1) == ep.query_y).float().mean(-1)


def build_episodic(
    run: RunConfig,
    root: Path,
    device: torch.device,
    model: nn.Module,
    scores: ScoreFn,
    loss: EpisodeLoss | None = None,
    *,
    samplers: Samplers | None = None,
) -> Learner:
    """Learner for a metric method: ``loss`` (default: cross-entropy of ``scores``) to train, accuracy to evaluate,
    on the episodes of ``run.task`` (or of ``samplers``).

    Evaluation reads the scores as logits (their softmax is the predictive, as cross-entropy trains it) and
    reports, besides ``<part>/acc``: ``<part>/nll``, the mean negative log-likelihood of the query labels per
    episode (nats), and ``<part>/ece``, the expected calibration error (15 bins) over all the queries of all
    the episodes pooled (:class:`~metalab.calibration.PooledQueries`). For Relation and Siamese networks, trained with
    per-pair sigmoid losses, the softmax over their scores is a derived predictive and so are its nll and ece.

    BatchNorm follows the algorithm's ``batchnorm`` field (:data:`~metalab.models.BatchNormMode`): inductive by
    default, as the ProtoNet and Matching code evaluate."""
    # Learners without a batchnorm field (text encoders have no BatchNorm) leave the model as it is.
    set_batchnorm_mode(model, getattr(run.params, "batchnorm", "inductive"))
    model.to(device, memory_format=torch.channels_last)  # see embed_tasks
    if samplers is None:
        samplers = Samplers(
            make_sampler(run.task, "train", run.seed, root), EvalSamplers(run.task, run.eval.seed, root)
        )
    train, evals = samplers

    def train_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ep = shard(train.sample(step, run.train.meta_batch)).to(device)
        with autocast(
            run.train.autocast, device
        ):  # train.autocast: bf16 convolutions and products, or a no-op
            if loss is None:
                s = scores(ep)
                value = cross_entropy(s.float(), ep)
            else:
                value, s = loss(ep)
        return value.float(), {"train/acc": accuracy(s, ep).mean().item()}

    def evaluate(part: str, n: int) -> dict[str, float]:
        pooled = PooledQueries()

        def per_task(ep: Episode) -> torch.Tensor:
            with torch.no_grad(), autocast(run.train.autocast, device):
                s = scores(ep).float()  # (T, N*Q, N)
            return pooled.columns(s, ep.query_y)

        return pooled.metrics(
            part, *evaluate_episode_columns(per_task, evals[part], n, run.eval.batch, device)
        )

    return Learner(model, train_loss, evaluate, autocast=True)
