"""Meta-SGD: learning to learn quickly (Li, Zhou, Chen & Li, 2017).

MAML with a learned inner learning rate for every single weight: the inner step is
``phi = theta - alpha * grad L_support(theta)`` with ``alpha`` a tensor shaped like ``theta`` (initialised to
``inner_lr``), and the outer loop trains ``theta`` and ``alpha`` together on the query loss. ``alpha`` is not
constrained to be positive: as in the paper, a negative rate is the meta-learner's choice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, adapt
from metalab.meta.gbml import ParamTable, task_loss
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """Meta-SGD hyperparameters (the ``metasgd`` section); ``inner_lr`` is the rates' initial value."""

    first_order: bool = False
    """Treat inner gradients as constants (the rates still learn: they multiply those gradients)."""


class MetaSGDModel(nn.Module):
    """The network and its learned per-parameter rates, in one module so they are checkpointed together."""

    def __init__(self, net: nn.Module, inner_lr: float):
        super().__init__()
        self.net = net
        self.inner_lr = ParamTable({k: torch.full_like(p, inner_lr) for k, p in net.named_parameters()})

    def meta(self) -> dict[str, Params]:
        return {"theta": dict(self.net.named_parameters()), "alpha": self.inner_lr.as_dict()}


def predict(
    net: nn.Module,
    regression: bool,
    first_order: bool,
    meta: dict[str, Params],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    x: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """One task: ``steps`` steps of ``theta - alpha * grad`` on the support set, then the outputs at ``x``."""
    loss_fn = functools.partial(task_loss, net, regression)
    adapted = adapt(meta["theta"], loss_fn, (support_x, support_y), steps, meta["alpha"], first_order)
    return functional_call(net, adapted, (x,))


def query_loss(
    net: nn.Module,
    regression: bool,
    steps: int,
    first_order: bool,
    meta: dict[str, Params],
    *task: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's (query loss after adaptation, query score), differentiable in ``theta`` and ``alpha``."""
    adapt_predict = functools.partial(predict, net, regression, first_order)
    return gbml.query_loss(adapt_predict, regression, steps, meta, *task)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Network, learned rates, training loss and evaluation for a Meta-SGD run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    model = MetaSGDModel(gbml.network(run, cfg), cfg.inner_lr).to(device)
    batching = gbml.task_batching(run.algo, cfg, model.net, not cfg.first_order, grad_loop=True)
    per_task = functools.partial(query_loss, model.net, regression, cfg.inner_steps, cfg.first_order)
    mean_loss = gbml.mean_query_loss(per_task, batching, model.meta, regression)

    def train_loss(step: int, ep: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = mean_loss(step, ep)
        alpha = torch.cat([a.detach().flatten() for a in model.inner_lr.as_dict().values()])
        return loss, {**metrics, "train/alpha_mean": alpha.mean().item()}

    adapt_predict = functools.partial(predict, model.net, regression, True)
    # The optimizer must see the rates as well as the weights: both are parameters of the model.
    return gbml.build_learner(
        run,
        root,
        device,
        model,
        model.meta,
        train_loss,
        adapt_predict,
        batching,
        parameters=list(model.parameters()),
    )
