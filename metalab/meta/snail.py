"""SNAIL: a simple neural attentive meta-learner (Mishra, Rohaninejad, Chen & Abbeel, ICLR 2018).

Each query is classified from one sequence: the N*K support pairs (embedding, one-hot label) in random order,
then the query with an all-zero label. Temporal-convolution blocks (dense blocks of causal dilated 1-D
convolutions with gated activations) interleave with causal key-value attention blocks; the output at the
last position gives the query's logits. All queries of a task share the support prefix, and the network is
causal, so :func:`query_logits` runs that prefix once per task and then only each query's last position
(:meth:`SNAIL.query_forward`), instead of one whole sequence per query: the same logits with about
``N*Q`` times less sequence work per task. A training step (meta-batch 16, 5 train queries per class, one busy
core) took 1.8x (5w1s) and 5.2x (5w5s) less time than with one whole sequence per query; the Conv-4 embedding
is now most of the cost. Omniglot architecture of the paper: Conv-4 embedding (here with
per-image normalisation, so one query's prediction never depends on other queries), then
Attention(64, 32), TC(128), Attention(256, 128), TC(128), Attention(512, 256), a 1x1 projection to N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metalab.config import MAX_FILTERS, require, require_between
from metalab.data.episodes import Episode, ShuffledSampler, generator_for
from metalab.data.tasks import make_sampler
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.models import Conv4
from metalab.train.distributed import shard
from metalab.train.evaluate import evaluate_episodes
from metalab.train.loop import Learner
from metalab.train.precision import autocast


@dataclass(frozen=True)
class Config:
    """SNAIL hyperparameters (the ``snail`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters of the embedding."""
    tc_filters: int = 128
    """Filters of each dense block in the temporal-convolution blocks."""
    tied_qk_init: bool = True
    """Start each attention block's key map equal to its query map (both stay free parameters), so attention
    already favours positions whose features resemble the current one; at random init the attention reads an
    almost uniform average of the support, from which the query's label cannot be told. Omniglot 5w1s on one
    H200, same seed: test accuracy 63% / 84% after 500 / 1,000 steps against 35% / 65% untied."""
    embed_norm: bool = False
    """Layer-normalise each image's embedding (learned gain and bias) before the label is appended. The Conv-4's
    embeddings of random init share most of their direction (cosine 0.95 between different classes, 0.96 within
    one); normalised, a tied attention's first block picks a same-class support item for 40% / 17% of 5-way /
    20-way queries at init instead of 30% / 9% (chance 20% / 5%). That did not start 20-way learning: on one
    H200, 20w1s stayed at chance for 2.8k steps with it (tied or untied) as without it; 5w1s with it reached
    32% / 89% at 500 / 1,000 steps (63% / 84% without it, in a separate run). Off by default."""
    label_head_init: float = 0.0
    """If > 0, start the output layer as a matching readout: logit ``j`` reads the last attention block's
    value of label ``j`` (its columns for the label input, scaled to ``label_head_init / ||column||^2``),
    and nothing else, so at init the logit of label ``j`` is about ``label_head_init`` times the attention weight
    on the support items shown with ``j``. A random head needs to learn that map before the attention gets a
    useful gradient; with it, the gradient sharpens the attention on same-class items from the first step
    (only the init changes; every weight stays free). 0: the default random init."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require_between(self.tc_filters, "tc_filters", 1, MAX_FILTERS)
        require(self.label_head_init >= 0, "label_head_init", "must be >= 0")


class DenseBlock(nn.Module):
    """Causal dilated convolution (kernel 2) with a gated activation, concatenated to its input."""

    def __init__(self, channels: int, filters: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(channels, 2 * filters, kernel_size=2, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C + F, L)
        y = self.conv(F.pad(x, (self.dilation, 0)))  # left padding only: output t sees inputs <= t
        f, g = y.chunk(2, dim=1)
        return torch.cat([x, torch.tanh(f) * torch.sigmoid(g)], dim=1)

    def extend(self, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output at the position right after ``prefix`` ``(B, C, S)``, for each of ``Q`` inputs there
        ``x`` ``(B, Q, C)``: ``(B, Q, C + F)``, as :meth:`forward` of the sequence ``prefix + [x]`` would give."""
        w = self.conv.weight  # (2F, C, 2): tap 0 reads position t - dilation, tap 1 position t
        y = x @ w[:, :, 1].T + self.conv.bias
        earlier = prefix.shape[-1] - self.dilation
        if earlier >= 0:  # else that tap reads the zero padding
            y = y + (prefix[:, :, earlier] @ w[:, :, 0].T)[:, None]
        f, g = y.chunk(2, dim=-1)
        return torch.cat([x, torch.tanh(f) * torch.sigmoid(g)], dim=-1)


def tc_block(channels: int, length: int, filters: int) -> tuple[nn.Sequential, int]:
    """Dense blocks with dilations 1, 2, 4, ... up to the sequence length; returns it and its output width."""
    blocks = []
    for i in range(max(1, math.ceil(math.log2(length)))):
        blocks.append(DenseBlock(channels, filters, 2**i))
        channels += filters
    return nn.Sequential(*blocks), channels


class AttentionBlock(nn.Module):
    """Causal single-head key-value attention; the read is concatenated to the input."""

    def __init__(self, channels: int, key: int, value: int, tied_qk_init: bool = False):
        super().__init__()
        self.query, self.key, self.value = (
            nn.Linear(channels, key),
            nn.Linear(channels, key),
            nn.Linear(channels, value),
        )
        if tied_qk_init:
            self.key.load_state_dict(self.query.state_dict())
        self.scale = 1 / math.sqrt(key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C + V, L)
        h = x.transpose(1, 2)  # (B, L, C)
        logits = self.query(h) @ self.key(h).transpose(1, 2) * self.scale  # (B, L, L)
        length = h.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        read = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1) @ self.value(h)  # (B, L, V)
        return torch.cat([x, read.transpose(1, 2)], dim=1)

    def extend(self, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`DenseBlock.extend`: each of the ``Q`` inputs ``x`` ``(B, Q, C)`` attends to the prefix
        ``(B, C, S)`` and to itself; ``(B, Q, C + V)``."""
        h = prefix.transpose(1, 2)  # (B, S, C)
        q = self.query(x)  # (B, Q, K)
        earlier = q @ self.key(h).transpose(1, 2) * self.scale  # (B, Q, S)
        itself = (q * self.key(x)).sum(-1, keepdim=True) * self.scale  # (B, Q, 1)
        weights = torch.softmax(torch.cat([earlier, itself], dim=-1), dim=-1)
        read = weights[..., :-1] @ self.value(h) + weights[..., -1:] * self.value(x)  # (B, Q, V)
        return torch.cat([x, read], dim=-1)


class SNAIL(nn.Module):
    """The SNAIL network for ``n_way`` labels and sequences of ``length`` (N*K support pairs and a query); the
    keyword-only options are the :class:`Config` fields of the same names (``filters``: ``tc_filters``), and
    the Conv-4's ``image_size``."""

    def __init__(
        self,
        n_way: int,
        length: int,
        *,
        hidden: int = 64,
        filters: int = 128,
        image_size: int = 28,
        tied_qk_init: bool = True,
        embed_norm: bool = False,
        label_head_init: float = 0.0,
    ):
        super().__init__()
        self.encoder = Conv4(1, hidden, image_size=image_size, norm="layer")  # per-image: no leaks
        self.embed_norm = nn.LayerNorm(self.encoder.embedding_dim) if embed_norm else nn.Identity()
        c = self.encoder.embedding_dim + n_way
        layers: list[nn.Module] = [AttentionBlock(c, 64, 32, tied_qk_init)]
        c += 32
        tc1, c = tc_block(c, length, filters)
        layers += [tc1, AttentionBlock(c, 256, 128, tied_qk_init)]
        c += 128
        tc2, c = tc_block(c, length, filters)
        layers += [tc2, AttentionBlock(c, 512, 256, tied_qk_init)]
        c += 256
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv1d(c, n_way, 1)
        self.n_way = n_way
        if label_head_init > 0:
            self._init_label_head(layers[-1], label_head_init)

    def _init_label_head(self, last: AttentionBlock, scale: float) -> None:
        """Head row ``j`` = ``scale`` times the last attention's value column of label ``j`` over its squared
        norm, on the channels of that attention's read (the last ones); zero elsewhere. Dense blocks and
        attention keep their input in front, so the labels are channels ``D .. D+N`` of every layer's input."""
        d, n = self.encoder.embedding_dim, self.n_way
        with torch.no_grad():
            labels = last.value.weight[:, d : d + n]  # (V, N): the value of each one-hot label
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[:, -labels.shape[0] :, 0] = (labels / labels.pow(2).sum(0)).T * scale

    def forward(self, z: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, N)`` at every position of embedded sequences ``z`` ``(B, L, D)`` with labels shown."""
        x = torch.cat([z, shown], dim=-1).transpose(1, 2)  # (B, D + N, L)
        return self.head(self.body(x)).transpose(1, 2)

    def query_forward(self, z: torch.Tensor, shown: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, Q, N)`` at the last position of the ``Q`` sequences ``prefix + [query_j]``: the prefix
        ``z`` ``(B, S, D)`` with labels ``shown`` ``(B, S, N)``, then query embedding ``query[:, j]`` ``(B, Q, D)``
        with an all-zero label. Equals :meth:`forward` on those ``B*Q`` sequences, with the prefix run once."""
        prefix = torch.cat([z, shown], dim=-1).transpose(1, 2)  # (B, D + N, S)
        x = F.pad(query, (0, self.n_way))  # (B, Q, D + N)
        blocks = [b for layer in self.body for b in (layer if isinstance(layer, nn.Sequential) else [layer])]
        for i, block in enumerate(blocks):
            x = block.extend(prefix, x)
            if i < len(blocks) - 1:
                prefix = block(prefix)
        return x @ self.head.weight[:, :, 0].T + self.head.bias


def query_logits(model: SNAIL, ep: Episode) -> torch.Tensor:
    """``(T, N*Q, M)``: each query classified from its own sequence (the task's support, then that query), over
    the model's ``M = model.n_way >= N`` labels. Embeddings are computed once per task, and so is the support
    prefix (:meth:`SNAIL.query_forward`)."""
    t, s = ep.support_y.shape
    q = ep.query_y.shape[1]
    images = torch.cat([ep.support_x, ep.query_x], dim=1).flatten(0, 1)
    z = model.embed_norm(model.encoder(images.contiguous(memory_format=torch.channels_last))).view(
        t, s + q, -1
    )
    shown = F.one_hot(ep.support_y, model.n_way).float()  # (T, S, M)
    return model.query_forward(z[:, :s], shown, z[:, s:])


def spread_labels(ep: Episode, labels: int, generator: torch.Generator) -> Episode:
    """``ep`` with its ``N`` labels sent to ``N`` distinct labels of ``0..labels-1``, drawn per task, so that
    training on fewer ways than the test's (``task.train_ways < task.ways``) still uses every label input and
    output of the model."""
    t = ep.support_y.shape[0]
    slots = torch.rand(t, labels, generator=generator).argsort(dim=1)[:, : ep.n_way].to(ep.support_y.device)
    return ep._replace(support_y=slots.gather(1, ep.support_y), query_y=slots.gather(1, ep.query_y))


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a SNAIL run."""
    cfg: Config = run.params
    n, k = run.task.ways, run.task.shots
    if (run.task.train_ways or n) > n:
        raise ConfigError(
            "task.train_ways", "the label input has task.ways entries: train_ways must be <= ways"
        )
    model = SNAIL(
        n,
        n * k + 1,
        hidden=cfg.hidden,
        filters=cfg.tc_filters,
        image_size=run.task.image_size,
        tied_qk_init=cfg.tied_qk_init,
        embed_norm=cfg.embed_norm,
        label_head_init=cfg.label_head_init,
    ).to(device)
    model.encoder.to(memory_format=torch.channels_last)
    train = ShuffledSampler(make_sampler(run.task, "train", run.seed, root), run.seed + 1)
    evals = {
        p: ShuffledSampler(make_sampler(run.task, p, run.eval.seed, root), run.eval.seed + 1)
        for p in ("val", "test")
    }

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ep = shard(train.sample(step, run.train.meta_batch))
        if ep.n_way < n:  # fewer train ways: their labels spread over all n label slots, anew every task
            ep = spread_labels(ep, n, generator_for(run.seed + 2, step))
        ep = ep.to(device)
        with autocast(
            run.train.autocast, device
        ):  # train.autocast: bf16 convolutions and products, or a no-op
            logits = query_logits(model, ep).float()
        acc = (logits.argmax(-1) == ep.query_y).float().mean().item()
        return F.cross_entropy(logits.flatten(0, 1), ep.query_y.flatten()), {"train/acc": acc}

    def evaluate(part: str, episodes: int) -> dict[str, float]:
        def per_task(ep: Episode) -> torch.Tensor:
            with autocast(run.train.autocast, device):
                logits = query_logits(model, ep)
            return (logits.argmax(-1) == ep.query_y).float().mean(-1)

        est = evaluate_episodes(per_task, evals[part], episodes, run.eval.batch, device)
        return {f"{part}/acc": est.mean, f"{part}/acc_ci95": est.ci95}

    return Learner(model, loss, evaluate, autocast=True)
