"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), true second order by default.

The meta-parameters are an initialisation ``theta``; for each task, ``adapt`` takes a few gradient steps from
``theta`` on the support set, and the query loss at the adapted parameters is minimised over ``theta``,
differentiating through the inner steps (``first_order=True`` drops those second-order terms).

Text tasks (``task.dataset: smlmt``, :mod:`metalab.data.text`): the network is a
:class:`~metalab.models.text.SentenceEncoder` of width ``maml.hidden`` with a linear softmax head, and the inner
loop adapts the head alone, started each task at the class prototypes (weights ``2 c_k``, biases
``-|c_k|^2``: Proto-MAML, Triantafillou et al., ICLR 2020), while the outer loop meta-learns the encoder through
the adapted head. SMLMT's own learners (Bansal et al., EMNLP 2020: LEOPARD, hybrid SMLMT) also adapt a softmax
built from the support set on top of the encoder; a few plain gradient steps on a whole transformer's word
embeddings would move only the words of the support sentences.

Evaluation protocol: BatchNorm is transductive, as in MAML's code: every forward normalises with the statistics
of the batch it is applied to, at test time too (no running statistics); the whole MAML family shares it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, adapt
from metalab.meta.episodic import build_episodic, cross_entropy, embed_sentences, text_parts
from metalab.meta.gbml import Inner, loss_and_score
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """MAML hyperparameters (the ``maml`` section of a config); the shared fields are documented in
    :class:`~metalab.meta.gbml.InnerLoopConfig`."""

    first_order: bool = False
    """FOMAML: treat inner gradients as constants."""


def predict(
    inner: Inner, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """One task: ``inner.steps`` gradient steps from ``params`` on the support set, then the outputs at ``x``."""
    adapted = adapt(params, inner.loss, (support_x, support_y), inner.steps, inner.lr, inner.first_order)
    return functional_call(inner.model, adapted, (x,))


def query_loss(
    inner: Inner,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task: adapt on the support set, then (query loss, query score: accuracy or MSE)."""
    out = predict(inner, params, support_x, support_y, query_x)
    return loss_and_score(out, query_y, inner.regression)


def prototype_head(z: torch.Tensor, y: torch.Tensor, n_way: int) -> Params:
    """The linear head ``{"weight": (N, D), "bias": (N,)}`` whose logits ``2 c_k . z - |c_k|^2`` rank classes
    as negative squared distances to the prototypes ``c_k`` (class means of the support embeddings ``z``)."""
    c = torch.zeros(n_way, z.shape[-1], dtype=z.dtype, device=z.device).index_add(0, y, z)
    c = c / torch.bincount(y, minlength=n_way).clamp(min=1).unsqueeze(-1).to(z.dtype)
    return {"weight": 2 * c, "bias": -(c * c).sum(-1)}


def head_loss(head: Params, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the linear head on embeddings ``z`` with labels ``y``."""
    return F.cross_entropy(F.linear(z, head["weight"], head["bias"]), y)


def text_logits(encoder: nn.Module, inner: Inner, ep: Episode) -> torch.Tensor:
    """Query logits ``(T, N*Q, N)`` of a batched text episode: per task, the prototype head adapted by
    ``inner.steps`` gradient steps of rate ``inner.lr`` on the support embeddings (the encoder is not
    adapted; differentiable through the steps unless ``inner.first_order``)."""
    z = embed_sentences(encoder, ep)
    n_support = ep.support_x.shape[1]
    out = []
    # torch.func.grad differentiates the inner loop under the evaluator's no_grad too (outer no_grad applies
    # to the result, which then carries no graph).
    for zt, yt in zip(z, ep.support_y, strict=True):
        zs = zt[:n_support]
        head = adapt(
            prototype_head(zs, yt, ep.n_way), head_loss, (zs, yt), inner.steps, inner.lr, inner.first_order
        )
        out.append(F.linear(zt[n_support:], head["weight"], head["bias"]))
    return torch.stack(out)


def build_text(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """MAML with a prototype-initialised head on SMLMT text tasks: ``maml.inner_steps`` head steps in training,
    ``maml.eval_inner_steps`` at evaluation; training and evaluation otherwise as
    :func:`~metalab.meta.episodic.build_episodic` (the metric learners' episodic loop)."""
    cfg: Config = run.params
    encoder, samplers = text_parts(run, root, cfg.hidden, "maml.hidden")
    train = Inner(encoder, False, cfg.inner_lr, cfg.inner_steps, cfg.first_order)
    test = Inner(encoder, False, cfg.inner_lr, cfg.eval_inner_steps, cfg.first_order)

    def loss(ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        logits = text_logits(encoder, train, ep)
        return cross_entropy(logits, ep), logits

    return build_episodic(
        run, root, device, encoder, lambda ep: text_logits(encoder, test, ep), loss, samplers=samplers
    )


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a MAML run (text tasks: :func:`build_text`)."""
    cfg: Config = run.params
    if run.task.dataset == "smlmt":
        return build_text(run, root, device)
    regression = run.task.dataset == "sinusoid"
    model = gbml.network(run, cfg).to(device)
    # A batching that cannot apply is refused here, before any data is read.
    batching = gbml.task_batching(run.algo, cfg, model, not cfg.first_order, grad_loop=True)
    inner = Inner(model, regression, cfg.inner_lr, cfg.inner_steps, cfg.first_order)
    params = gbml.params_of(model)
    train_loss = gbml.mean_query_loss(functools.partial(query_loss, inner), batching, params, regression)
    return gbml.build_learner(
        run,
        root,
        device,
        model=model,
        meta=params,
        train_loss=train_loss,
        predict=predict,
        inner=inner,
        batching=batching,
    )
