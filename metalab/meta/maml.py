"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), true second order by default.

The meta-parameters are an initialisation ``theta``; for each task, ``adapt`` takes a few gradient steps from
``theta`` on the support set, and the query loss at the adapted parameters is minimised over ``theta``,
differentiating through the inner steps (``first_order=True`` drops those second-order terms).

Evaluation protocol: BatchNorm is transductive, as in MAML's code: every forward normalises with the statistics
of the batch it is applied to, at test time too (no running statistics); the whole MAML family shares it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, adapt
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


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a MAML run."""
    cfg: Config = run.params
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
