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
from metalab.meta.gbml import Inner, ParamTable, loss_and_score
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
    inner: Inner, meta: dict[str, Params], support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """One task: ``inner.steps`` steps of ``theta - alpha * grad`` on the support set, then the outputs at ``x``
    (the learned rates ``alpha`` replace ``inner.lr``)."""
    adapted = adapt(
        meta["theta"], inner.loss, (support_x, support_y), inner.steps, meta["alpha"], inner.first_order
    )
    return functional_call(inner.model, adapted, (x,))


def query_loss(
    inner: Inner,
    meta: dict[str, Params],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's (query loss after adaptation, query score), differentiable in ``theta`` and ``alpha``."""
    out = predict(inner, meta, support_x, support_y, query_x)
    return loss_and_score(out, query_y, inner.regression)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Network, learned rates, training loss and evaluation for a Meta-SGD run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    model = MetaSGDModel(gbml.network(run, cfg), cfg.inner_lr).to(device)
    batching = gbml.task_batching(run.algo, cfg, model.net, not cfg.first_order, grad_loop=True)
    inner = Inner(model.net, regression, cfg.inner_lr, cfg.inner_steps, cfg.first_order)
    mean_loss = gbml.mean_query_loss(functools.partial(query_loss, inner), batching, model.meta, regression)

    def train_loss(step: int, ep: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = mean_loss(step, ep)
        alpha = torch.cat([a.detach().flatten() for a in model.inner_lr.as_dict().values()])
        return loss, {**metrics, "train/alpha_mean": alpha.mean().item()}

    # The optimizer must see the rates as well as the weights: both are parameters of the model.
    return gbml.build_learner(
        run,
        root,
        device,
        model=model,
        meta=model.meta,
        train_loss=train_loss,
        predict=predict,
        inner=inner,
        batching=batching,
        parameters=list(model.parameters()),
    )
