"""CAVIA: fast context adaptation via meta-learning (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson, ICML 2019).

The network takes a small context vector ``c`` as an extra input. For each task ``c`` starts at zero and only
``c`` is adapted in the inner loop; the network weights are shared by all tasks and trained by the outer loop
alone (through the adapted context: second order unless ``first_order``). The task-specific part is a handful
of numbers, which is cheap to adapt and hard to overfit.

How the context enters the network:

* MLP (sinusoid): concatenated to the input, ``net([x, c])``, as in the paper's regression experiments.
* Conv-4 (images): FiLM. A linear map of ``c`` gives a per-channel scale and shift for each block, applied
  after its BatchNorm: ``h = BN(conv(h)) * (1 + gamma(c)) + beta(c)``. Concatenating ``c`` as constant input
  channels would be nearly inert here: a constant channel only adds a per-channel constant to the first
  convolution's output (away from the zero-padded border), which the following BatchNorm subtracts again. The
  paper, too, conditions its image network on the context with FiLM. ``film`` starts at zero bias, so the
  zero context is the identity modulation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from metalab.config import MAX_UNITS, require_between
from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, adapt
from metalab.meta.gbml import Inner, loss_and_score, output_loss
from metalab.models import MLP, Conv4
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """CAVIA hyperparameters (the ``cavia`` section); ``inner_lr`` is the context's step size."""

    inner_lr: float = 1.0
    """Context step size: large, since only the context moves (the paper uses 1.0)."""
    context_dim: int = 4
    """Size of the context vector: a few numbers describe a sinusoid; image tasks need more (e.g. 100)."""
    first_order: bool = False
    """Treat the context's inner gradients as constants."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_between(self.context_dim, "context_dim", 1, MAX_UNITS)


class ContextMLP(nn.Module):
    """An MLP on ``[x, c]``: the context is appended to every input."""

    def __init__(self, in_features: int, context_dim: int, hidden: tuple[int, ...], out_features: int):
        super().__init__()
        self.net = MLP(in_features + context_dim, hidden, out_features)
        self.context_dim = context_dim

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, context.expand(x.shape[0], -1)], -1))  # (B, in + context_dim)


class ContextConv4(nn.Module):
    """Conv-4 with FiLM: each block's BatchNorm output is scaled by ``1 + gamma(c)`` and shifted by ``beta(c)``."""

    def __init__(self, context_dim: int, hidden: int, n_classes: int, image_size: int):
        super().__init__()
        self.net = Conv4(1, hidden, n_classes=n_classes, strided=True, image_size=image_size)
        self.hidden = hidden
        self.context_dim = context_dim
        self.film = nn.Linear(context_dim, 2 * len(self.net.features) * hidden)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(context).view(
            2, len(self.net.features), self.hidden, 1, 1
        )  # (4, C, 1, 1) each
        h = x
        for i, (conv, norm, *rest) in enumerate(self.net.features):
            h = norm(conv(h)) * (1 + gamma[i]) + beta[i]
            for layer in rest:  # ReLU (and max-pool)
                h = layer(h)
        return self.net.head(h.flatten(1))


def context_model(run: RunConfig, cfg: Config) -> nn.Module:
    if run.task.dataset == "sinusoid":
        return ContextMLP(run.task.input_features, cfg.context_dim, cfg.mlp_hidden, 1)
    gbml.check_ways(run)
    return ContextConv4(cfg.context_dim, cfg.hidden, run.task.ways, run.task.image_size)


def context_loss(
    model: nn.Module,
    regression: bool,
    params: Params,
    ctx: Params,
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    return output_loss(functional_call(model, params, (x, ctx["context"])), y, regression)


def adapt_context(
    inner: Inner, params: Params, support_x: torch.Tensor, support_y: torch.Tensor
) -> torch.Tensor:
    """One task's context after ``inner.steps`` inner steps from zero; the network ``params`` stay as they are."""
    zero = {"context": torch.zeros(inner.model.context_dim, dtype=support_x.dtype, device=support_x.device)}

    def loss_fn(ctx: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return context_loss(inner.model, inner.regression, params, ctx, x, y)

    return adapt(zero, loss_fn, (support_x, support_y), inner.steps, inner.lr, inner.first_order)["context"]


def predict(
    inner: Inner, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """One task: adapt the context on the support set, then the outputs at ``x``."""
    context = adapt_context(inner, params, support_x, support_y)
    return functional_call(inner.model, params, (x, context))


def query_loss(
    inner: Inner,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's (query loss with the adapted context, query score)."""
    out = predict(inner, params, support_x, support_y, query_x)
    return loss_and_score(out, query_y, inner.regression)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Context network, training loss and evaluation for a CAVIA run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    model = context_model(run, cfg).to(device)
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
