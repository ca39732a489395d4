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
from torch import nn
from torch.func import functional_call

from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, adapt
from metalab.meta.gbml import task_loss
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """MAML hyperparameters (the ``maml`` section of a config); the shared fields are documented in
    :class:`~metalab.meta.gbml.InnerLoopConfig`."""

    first_order: bool = False
    """FOMAML: treat inner gradients as constants."""


def predict(
    model: nn.Module,
    regression: bool,
    inner_lr: float,
    first_order: bool,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    x: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """One task: ``steps`` gradient steps from ``params`` on the support set, then the outputs at ``x``."""
    loss_fn = functools.partial(task_loss, model, regression)
    adapted = adapt(params, loss_fn, (support_x, support_y), steps, inner_lr, first_order)
    return functional_call(model, adapted, (x,))


def adapted_query(
    model: nn.Module,
    regression: bool,
    cfg: Config,
    steps: int,
    first_order: bool,
    params: Params,
    *task: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task ``(support_x, support_y, query_x, query_y)``: adapt on the support set, return (query loss, query
    score: accuracy or MSE)."""
    adapt_predict = functools.partial(predict, model, regression, cfg.inner_lr, first_order)
    return gbml.query_loss(adapt_predict, regression, steps, params, *task)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a MAML run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    model = gbml.network(run, cfg).to(device)
    # A batching that cannot apply is refused here, before any data is read.
    batching = gbml.task_batching(run.algo, cfg, model, not cfg.first_order, grad_loop=True)
    per_task = functools.partial(adapted_query, model, regression, cfg, cfg.inner_steps, cfg.first_order)
    params = gbml.params_of(model)
    train_loss = gbml.mean_query_loss(per_task, batching, params, regression)
    adapt_predict = functools.partial(predict, model, regression, cfg.inner_lr, True)
    return gbml.build_learner(run, root, device, model, params, train_loss, adapt_predict, batching)
