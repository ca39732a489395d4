"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

MAML whose inner loop adapts only the final layer (the parameters named ``head.*``); the body is meta-trained
by the outer loop alone. Since the body does not change during adaptation, each task's support and query
embeddings are computed once and the inner steps run on the head only, which is what makes ANIL cheap. The
outer gradient still reaches the body through those embeddings (second order unless ``first_order``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, adapt
from metalab.meta.gbml import Inner, loss_and_score, output_loss
from metalab.train.loop import Learner

HEAD = "head."


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """ANIL hyperparameters (the ``anil`` section); the inner loop adapts the head only."""

    first_order: bool = False
    """Treat the head's inner gradients as constants."""


def split_head(params: Params) -> tuple[Params, Params]:
    """``(body, head)``: the parameters before the final layer, and those of the layer named ``head``."""
    head = {k: v for k, v in params.items() if k.startswith(HEAD)}
    if not head:
        raise ConfigError(
            "anil",
            "ANIL adapts only the final layer, which must be named 'head'; this model has none "
            f"(parameters: {', '.join(list(params)[:4])}...)",
        )
    return {k: v for k, v in params.items() if not k.startswith(HEAD)}, head


class _Body(nn.Module):
    """A view of ``model`` whose forward is ``model.embed``, so ``functional_call`` runs the body alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def embed(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """The ``(B, D)`` embedding of ``x`` by ``model``'s body under ``params`` (head entries are not used)."""
    return functional_call(_Body(model), {f"model.{k}": v for k, v in params.items()}, (x,))


def apply_head(model: nn.Module, head: Params, z: torch.Tensor) -> torch.Tensor:
    return functional_call(model.head, {k[len(HEAD) :]: v for k, v in head.items()}, (z,))


def head_loss(
    model: nn.Module, regression: bool, head: Params, z: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return output_loss(apply_head(model, head, z), y, regression)


def adapt_task(inner: Inner, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
    """The adapted parameters of one task: the body's unchanged, the head's after ``inner.steps`` inner steps."""
    body, head = split_head(params)
    z = embed(inner.model, body, support_x)  # (N*K, D), once for all inner steps
    loss_fn = functools.partial(head_loss, inner.model, inner.regression)
    return {**body, **adapt(head, loss_fn, (z, support_y), inner.steps, inner.lr, inner.first_order)}


def predict(
    inner: Inner, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """One task: adapt the head on the support set, then the outputs at ``x``."""
    body, head = split_head(adapt_task(inner, params, support_x, support_y))
    return apply_head(inner.model, head, embed(inner.model, body, x))


def query_loss(
    inner: Inner,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's (query loss after adapting the head, query score)."""
    out = predict(inner, params, support_x, support_y, query_x)
    return loss_and_score(out, query_y, inner.regression)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for an ANIL run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    model = gbml.network(run, cfg).to(device)
    split_head(dict(model.named_parameters()))  # refuse a headless model before any data is read
    # The inner loop never differentiates through BatchNorm (it is in the body), so vmap would be exact here.
    batching = gbml.task_batching(run.algo, cfg, model, second_order=False, grad_loop=True)
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
