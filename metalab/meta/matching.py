"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

A query's label distribution is an attention-weighted sum of the support labels, with attention a softmax over
cosine similarities between the query embedding ``f(x)`` and support embeddings ``g(x_i)``. With full-context
embeddings (``fce: true``) the support embeddings are read by a bidirectional LSTM, and the query embedding is
refined by an attention LSTM over the support set for ``fce_steps`` steps (paper, appendix A.2). In the
attention LSTM the read-out ``r`` is added to the hidden state rather than concatenated, so the hidden size
stays the embedding size.

Cosine similarities lie in [-1, 1] (in [0, 1] after Conv-4's final ReLU), so a plain softmax over them can
never be confident: with 5 supports the best attainable probability of the right one is e / (e + 4) = 0.40, and
training stalls (88.99% on 5-way 1-shot Omniglot in 22 minutes here, against the paper's 98.1). The similarities
are therefore multiplied by a scale (an inverse temperature, learned by default, starting at ``scale``), as in
later cosine-similarity classifiers (e.g. Gidaris & Komodakis, CVPR 2018; Chen et al., ICLR 2019). ``scale: 1``
with ``learn_scale: false`` is the paper's formula.

Evaluation protocol: BatchNorm is inductive by default (running statistics; ``matching.batchnorm``), as the
Matching Networks setting (and the ProtoNet code that reproduced it) evaluates; ``transductive`` normalises
with the episode's statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from metalab.config import MAX_FILTERS, MAX_INNER_STEPS, require, require_between
from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta.episodic import build_episodic, embed_tasks
from metalab.models import BatchNormMode, Conv4
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config:
    """Matching network hyperparameters (the ``matching`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters (the embedding is 64-d on 28x28 Omniglot)."""
    fce: bool = False
    """Full-context embeddings: BiLSTM over the support set, attention LSTM for queries."""
    fce_steps: int = 5
    """Processing steps of the attention LSTM (only with ``fce``)."""
    scale: float = 10.0
    """Initial inverse temperature multiplying the cosine similarities before the attention softmax."""
    learn_scale: bool = True
    """Meta-learn the scale (as a log) with the network; false keeps it at ``scale``."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each query on its own) or ``transductive``
    (the episode's statistics); see :data:`metalab.models.BatchNormMode`."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require(self.scale > 0, "scale", "must be > 0")
        require_between(self.fce_steps, "fce_steps", 1, MAX_INNER_STEPS)


class MatchingNet(nn.Module):
    """Conv-4 encoder, plus the two LSTMs of full-context embeddings when ``fce``."""

    def __init__(
        self,
        hidden: int,
        fce: bool,
        fce_steps: int,
        image_size: int = 28,
        scale: float = 10.0,
        learn_scale: bool = True,
    ):
        super().__init__()
        self.encoder = Conv4(1, hidden, image_size=image_size)
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        d = self.encoder.embedding_dim
        self.fce_steps = fce_steps
        self.support_lstm = nn.LSTM(d, d, bidirectional=True, batch_first=True) if fce else None
        self.query_cell = nn.LSTMCell(d, d) if fce else None

    def context_support(self, g: torch.Tensor) -> torch.Tensor:
        """``g(x_i) = g'(x_i) + h_fwd_i + h_bwd_i``, the support set read in order: ``(T, S, D) -> (T, S, D)``."""
        out, _ = self.support_lstm(g)  # (T, S, 2D)
        fwd, bwd = out.chunk(2, dim=-1)
        return g + fwd + bwd

    def context_query(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention LSTM: ``(T, Q, D)`` query embeddings refined against support ``(T, S, D)``."""
        t, q, d = f.shape
        flat = f.reshape(t * q, d)
        h, c = torch.zeros_like(flat), torch.zeros_like(flat)
        r = torch.zeros_like(flat)
        for _ in range(self.fce_steps):
            h_hat, c = self.query_cell(flat, (h + r, c))
            h = h_hat + flat  # (T*Q, D)
            attn = torch.softmax(torch.einsum("tqd,tsd->tqs", h.view(t, q, d), g), dim=-1)
            r = torch.einsum("tqs,tsd->tqd", attn, g).reshape(t * q, d)
        return h.view(t, q, d)


def attention_log_probs(
    query: torch.Tensor,
    support: torch.Tensor,
    support_y: torch.Tensor,
    n_way: int,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """``log sum_i a(q, s_i) onehot(y_i)``, ``a`` a softmax of ``scale`` times cosine similarities.

    Shapes: ``(Q, D), (S, D) -> (Q, N)``.
    """
    cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T  # (Q, S)
    attention = torch.softmax(scale * cosine, dim=-1)
    probs = attention @ F.one_hot(support_y, n_way).to(attention.dtype)  # (Q, N)
    return torch.log(probs.clamp_min(1e-8))


def episode_log_probs(model: MatchingNet, ep: Episode) -> torch.Tensor:
    """``(T, N*Q, N)`` log-probabilities of each query's class."""
    n_support = ep.support_x.shape[1]
    z = embed_tasks(model.encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, S+Q, D)
    g, f = z[:, :n_support], z[:, n_support:]
    if model.support_lstm is not None:
        g = model.context_support(g)
        f = model.context_query(f, g)
    scale = model.log_scale.exp()
    return vmap(attention_log_probs, in_dims=(0, 0, 0, None, None))(f, g, ep.support_y, ep.n_way, scale)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a Matching network run (loss: NLL of the attention output)."""
    cfg: Config = run.params
    model = MatchingNet(cfg.hidden, cfg.fce, cfg.fce_steps, run.task.image_size, cfg.scale, cfg.learn_scale)
    # log-probabilities sum to one per query, so cross-entropy of them is exactly their negative log-likelihood
    return build_episodic(run, root, device, model, lambda ep: episode_log_probs(model, ep))
