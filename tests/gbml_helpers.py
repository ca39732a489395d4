"""Shared helpers of the MAML-variant tests: tiny smooth problems, flat views of parameter dicts, finite
differences, tiny run configs and autograd-graph sizes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from metalab.data.episodes import Episode, EpisodeSampler
from metalab.experiment import RunConfig, run_config_from_dict
from metalab.meta.adapt import Params
from metalab.models import Conv4

D = torch.float64


class TanhNet(nn.Module):
    """2 -> 4 -> 1 with tanh and a ``head``: smooth, so Hessians are rich and finite differences are exact."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(2, 4)
        self.head = nn.Linear(4, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def tiny_problem(seed: int = 0) -> tuple[nn.Module, Params, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    model = TanhNet().double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    xs, xq = torch.randn(6, 2, dtype=D), torch.randn(5, 2, dtype=D)
    return model, params, (xs, torch.sin(xs.sum(-1, keepdim=True)), xq, torch.sin(xq.sum(-1, keepdim=True)))


def flat(params: Params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vec: torch.Tensor, like: Params) -> Params:
    out, i = {}, 0
    for name, p in like.items():
        out[name] = vec[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def finite_difference(
    fn: Callable[[Params], torch.Tensor], params: Params, name: str, index, eps=1e-6
) -> float:
    plus, minus = dict(params), dict(params)
    plus[name], minus[name] = params[name].clone(), params[name].clone()
    plus[name][index] += eps
    minus[name][index] -= eps
    return float((fn(plus) - fn(minus)) / (2 * eps))


def grads_of(loss: torch.Tensor, leaves: dict) -> dict:
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def variant_run(sinusoid_config, algo: str, **section) -> RunConfig:
    """The tiny sinusoid run of conftest with algorithm ``algo`` and its section ``section``."""
    cfg = sinusoid_config()
    del cfg["maml"]
    return run_config_from_dict({**cfg, "algo": algo, algo: section})


def one_task_batch(params: Params) -> Params:
    return {k: v[None] for k, v in params.items()}


def requiring_grad(params: Params) -> Params:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def graph_size(t: torch.Tensor) -> int:
    """Nodes of the autograd graph behind ``t``: what backward will walk and what memory it holds."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def conv4_problem() -> tuple[nn.Module, Episode]:
    torch.manual_seed(0)
    model = Conv4(1, 4, n_classes=3, strided=True, image_size=16).double()
    pool = (torch.rand(6, 20, 1, 16, 16) * 255).to(torch.uint8)
    ep = EpisodeSampler(pool, 3, 2, 2, seed=0).sample(0, 2)
    return model, ep._replace(support_x=ep.support_x.double(), query_x=ep.query_x.double())


def batched_query(
    model: nn.Module, regression: bool, cfg, steps: int, first_order: bool, params: Params, ep: Episode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task (query loss, score) of MAML for a batched episode, each ``(T,)``: the pieces ``maml.build``
    composes, for tests that call them directly."""
    import functools

    from metalab.meta import gbml, maml

    per_task = functools.partial(
        maml.query_loss, gbml.Inner(model, regression, cfg.inner_lr, steps, first_order)
    )
    batching = gbml.task_batching("maml", cfg, model, not first_order, grad_loop=True)
    return gbml.map_tasks(per_task, ep, batching, params)
