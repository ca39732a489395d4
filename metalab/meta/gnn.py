"""Few-shot learning with graph neural networks (Garcia & Bruna, "Few-Shot Learning with Graph Neural Networks",
ICLR 2018).

The images of an episode are the nodes of a graph. A node's features are its Conv-4 embedding concatenated with
its label: the one-hot label for a support image, the uniform vector ``1/N`` for a query (the paper's "uniform
distribution over the K-simplex" for unlabelled nodes). Each graph layer learns its adjacency from the node
features, ``A_ij = softmax_j(MLP(|x_i - x_j|))`` with no self-edge (the paper's edge function, each hidden layer
batch-normalised and leaky-ReLU'd), then appends ``leaky_relu(BN(Linear([x, A x])))`` to the node features:
a graph convolution over the operator family ``{I, A}``. The last layer's graph convolution outputs N logits
per node; the loss is cross-entropy on the query nodes.

Graphs (``gnn.graph``): ``per_query`` (default, the paper's few-shot setting) builds one graph per query, the
support set and that one query (``N*K + 1`` nodes), so at evaluation (inductive BatchNorm) a query's logits do
not depend on the other queries; ``episode`` builds one graph of the whole episode, support and all queries,
so queries inform each other (transductive). The episodes of a meta-batch, and the graphs of an episode, are
independent graphs batched as ``(graphs, nodes, features)``; in training, BatchNorm's batch statistics span all
of them (as the official code's batches of episodes do), at evaluation one episode at most (see
:func:`graph_logits`).

Sizes are the paper's Omniglot network (and its official code, read for facts only): 2 graph layers adding 48
features each (``nf / 2`` with ``nf = 96``), edge MLPs of 4 hidden layers of ``(2, 1.5, 1, 1)`` times their
input width, dropout 0.3 after the first hidden layer of the last edge MLP, BatchNorm on the last layer's
logits. Differences: the embedding is metalab's Conv-4 (4 blocks of 64 filters with max-pool, 64-d on 28x28
Omniglot) where the paper's ends with two unpadded convolutions and a fully connected 64-d layer; the last edge
MLP's widths are multiples of its own input width (the official code scales them from the previous layer's);
linear layers followed by BatchNorm, and the edge score before its softmax, have no bias (it could not change
the output).

Evaluation protocol: BatchNorm is inductive by default (running statistics; ``gnn.batchnorm``), so each
graph is classified on its own; ``transductive`` normalises with the episode's statistics (of every graph of
the episode: queries then see each other even with ``per_query`` graphs).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metalab.config import MAX_FILTERS, MAX_LAYERS, MAX_UNITS, require, require_between
from metalab.data.episodes import Episode
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta.episodic import build_episodic, embed_tasks
from metalab.models import BatchNorm2d, BatchNormMode, Conv4
from metalab.train.loop import Learner

GraphMode = Literal["per_query", "episode"]
"""``per_query``: one graph per query (support + that query), the paper's setting; ``episode``: one graph of
the whole episode (transductive)."""
EVAL_EDGES = 1 << 19
"""Most edges (graphs x nodes^2) per forward at evaluation with inductive BatchNorm, where graphs are
independent and may be processed in chunks: this bounds the memory of the edge MLPs (20-way 5-shot has 300
graphs of 101 nodes per episode)."""


@dataclass(frozen=True)
class Config:
    """GNN hyperparameters (the ``gnn`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters (the embedding is 64-d on 28x28 Omniglot)."""
    layers: int = 2
    """Graph layers before the last one (which outputs the logits); the paper's Omniglot network has 2."""
    node_features: int = 48
    """Features each graph layer appends to the nodes (``nf / 2``, ``nf = 96`` in the paper's code)."""
    edge_ratios: tuple[float, ...] = (2.0, 1.5, 1.0, 1.0)
    """Hidden widths of each edge MLP as multiples of its input width (the official Omniglot network)."""
    edge_dropout: float = 0.3
    """Dropout after the first hidden layer of the last edge MLP (the official Omniglot network); 0: none."""
    graph: GraphMode = "per_query"
    """``per_query`` (one graph per query, the paper's few-shot setting: a query's logits do not depend on the
    other queries) or ``episode`` (one graph per episode: transductive)."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each graph on its own) or ``transductive``
    (each episode's statistics); see :data:`metalab.models.BatchNormMode`."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require_between(self.layers, "layers", 0, MAX_LAYERS)
        require_between(self.node_features, "node_features", 1, MAX_UNITS)
        require(
            1 <= len(self.edge_ratios) <= MAX_LAYERS,
            "edge_ratios",
            f"must list 1 to {MAX_LAYERS} hidden layers, got {len(self.edge_ratios)}",
        )
        for i, ratio in enumerate(self.edge_ratios):
            require_between(ratio, f"edge_ratios[{i}]", 0.01, 16.0)
        require_between(self.edge_dropout, "edge_dropout", 0.0, 0.99)


def norm_last(bn: BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm of the last dimension of ``(..., C)``, with statistics over every leading position."""
    return bn(x.reshape(-1, x.shape[-1], 1, 1)).view(x.shape)


class Adjacency(nn.Module):
    """The paper's learned edge features: ``A_ij = softmax_j(MLP(|x_i - x_j|))`` over ``j != i``.

    Each hidden layer of the MLP (a 1x1 convolution over node pairs in the paper) is linear, BatchNorm, leaky
    ReLU; the output is one score per pair, so every row of ``A`` sums to 1. ``|x_i - x_j|`` is symmetric, so
    the MLP runs once per unordered pair ``i < j`` (half the work); its BatchNorm statistics are those of all
    ordered pairs ``i != j`` (each value counted twice changes no mean or variance). The official code also
    counts the self-pairs, whose scores the softmax then masks out."""

    def __init__(self, features: int, widths: tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        # no biases: BatchNorm removes them, and the softmax over j ignores a constant added to a row's scores
        pairs = itertools.pairwise((features, *widths))
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairs)
        self.norms = nn.ModuleList(BatchNorm2d(w) for w in widths)
        self.out = nn.Linear(widths[-1], 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, F)`` node features -> ``(B, n, n)`` row-stochastic adjacency with a zero diagonal."""
        b, n = x.shape[:2]
        i, j = torch.triu_indices(n, n, 1, device=x.device)  # (P,) each: the n(n-1)/2 pairs i < j
        h = (x[:, i] - x[:, j]).abs()  # (B, P, F)
        for layer, (linear, bn) in enumerate(zip(self.linears, self.norms, strict=True)):
            h = F.leaky_relu(norm_last(bn, linear(h)))  # (B, P, width)
            if layer == 0:
                h = self.dropout(h)
        scores = self.out(h).squeeze(-1)  # (B, P)
        # both (i, j) and (j, i) get the pair's score; the diagonal stays -inf: no self-edge in A (the identity
        # is an operator of its own in GraphConv)
        where = torch.cat([i * n + j, j * n + i])  # (2P,) flat positions in an n x n matrix
        full = x.new_full((b, n * n), -math.inf).index_copy(1, where, scores.repeat(1, 2))
        return full.view(b, n, n).softmax(-1)


class GraphConv(nn.Module):
    """The paper's graph convolution over the operator family ``{I, A}``: ``BN(Linear([x, A x]))``."""

    def __init__(self, features: int, out: int, norm: bool = True):
        super().__init__()
        self.linear = nn.Linear(2 * features, out, bias=not norm)  # BatchNorm's shift replaces a bias
        self.norm = BatchNorm2d(out) if norm else None

    def forward(self, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, n)`` adjacency, ``(B, n, F)`` nodes -> ``(B, n, out)``."""
        h = self.linear(torch.cat([x, adjacency @ x], -1))  # (B, n, out)
        return h if self.norm is None else norm_last(self.norm, h)


class GraphNet(nn.Module):
    """``layers`` graph layers, each appending ``leaky_relu(GraphConv(A, x))`` to the node features ``x`` (the
    paper's dense connections), then a last layer whose graph convolution gives ``n_way`` logits per node."""

    def __init__(self, features: int, n_way: int, cfg: Config):
        super().__init__()
        widths = [
            features + i * cfg.node_features for i in range(cfg.layers + 1)
        ]  # input width of each layer

        def adjacency(f: int, dropout: float = 0.0) -> Adjacency:
            return Adjacency(f, tuple(max(1, round(r * f)) for r in cfg.edge_ratios), dropout)

        self.adjacencies = nn.ModuleList(adjacency(f) for f in widths[:-1])
        self.convs = nn.ModuleList(GraphConv(f, cfg.node_features) for f in widths[:-1])
        self.last_adjacency = adjacency(widths[-1], cfg.edge_dropout)
        self.last_conv = GraphConv(widths[-1], n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, features)`` nodes -> ``(B, n, n_way)`` logits."""
        for adjacency, conv in zip(self.adjacencies, self.convs, strict=True):
            x = torch.cat([x, F.leaky_relu(conv(adjacency(x), x))], -1)  # (B, n, F + node_features)
        return self.last_conv(self.last_adjacency(x), x)


class GNN(nn.Module):
    """A Conv-4 embedding and a :class:`GraphNet` over embeddings and labels."""

    def __init__(self, n_way: int, cfg: Config, image_size: int = 28):
        super().__init__()
        self.encoder = Conv4(1, cfg.hidden, image_size=image_size)
        self.graph = GraphNet(self.encoder.embedding_dim + n_way, n_way, cfg)
        self.n_way, self.mode, self.batchnorm = n_way, cfg.graph, cfg.batchnorm


def graph_nodes(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int, mode: GraphMode
) -> torch.Tensor:
    """Node features of the graphs of a batched episode.

    ``support`` ``(T, S, D)`` embeddings with labels ``support_y`` ``(T, S)``, ``query`` ``(T, M, D)``: the
    support nodes carry their one-hot label, the queries the uniform ``1/N``. ``per_query``: ``(T*M, S+1, D+N)``,
    graph ``t*M + m`` the support of task ``t`` then its query ``m``; ``episode``: ``(T, S+M, D+N)``.
    """
    labelled = torch.cat([support, F.one_hot(support_y, n_way).to(support.dtype)], -1)  # (T, S, D+N)
    uniform = query.new_full((*query.shape[:2], n_way), 1.0 / n_way)
    unlabelled = torch.cat([query, uniform], -1)  # (T, M, D+N)
    if mode == "episode":
        return torch.cat([labelled, unlabelled], 1)
    m = query.shape[1]
    nodes = torch.cat(
        [labelled[:, None].expand(-1, m, -1, -1), unlabelled[:, :, None]], 2
    )  # (T, M, S+1, D+N)
    return nodes.flatten(0, 1)


def graph_logits(model: GNN, nodes: torch.Tensor, tasks: int) -> torch.Tensor:
    """``model.graph`` on the ``(B, n, F)`` nodes of ``tasks`` episodes (``B / tasks`` graphs each, in order).

    Training: one batch (BatchNorm statistics over the meta-batch, as the official code's batches of
    episodes). Evaluation: with inductive BatchNorm graphs are independent, so they go through in chunks of at
    most :data:`EVAL_EDGES` edges (the same logits, bounded memory); with transductive BatchNorm each episode's
    graphs go through together, so the statistics are that episode's alone (not the evaluation batch's).
    """
    if model.training:
        return model.graph(nodes)
    if model.batchnorm == "inductive":
        chunk = max(1, EVAL_EDGES // nodes.shape[1] ** 2)
    else:
        chunk = nodes.shape[0] // tasks
    return torch.cat([model.graph(part) for part in nodes.split(chunk)])


def episode_logits(model: GNN, ep: Episode) -> torch.Tensor:
    """Query logits ``(T, N*Q, N)`` of a batched episode (the paper's model; graphs as ``model.mode``)."""
    n_support = ep.support_x.shape[1]
    z = embed_tasks(model.encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, S+M, D)
    nodes = graph_nodes(z[:, :n_support], ep.support_y, z[:, n_support:], ep.n_way, model.mode)
    logits = graph_logits(model, nodes, ep.tasks)  # (B, nodes, N)
    t, m = ep.query_x.shape[:2]
    if model.mode == "episode":
        return logits[:, n_support:]
    return logits[:, -1].view(t, m, ep.n_way)  # each graph's query is its last node


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss (cross-entropy on the query nodes) and evaluation for a GNN run."""
    cfg: Config = run.params
    ways = run.task.train_ways or run.task.ways
    if ways != run.task.ways:
        raise ConfigError(
            "task.train_ways",
            f"the GNN outputs N logits per node: train_ways must equal ways ({run.task.ways})",
        )
    model = GNN(run.task.ways, cfg, run.task.image_size)
    return build_episodic(run, root, device, model, lambda ep: episode_logits(model, ep))
