"""MAML++: "How to train your MAML" (Antoniou, Edwards & Storkey, ICLR 2019).

MAML with the paper's fixes for stability and accuracy:

* LSLR: a learned inner rate per parameter tensor ("layer") and per inner step, initialised to ``inner_lr``.
* BNWB: per-step BatchNorm weights: the forward pass after ``s`` inner steps uses BatchNorm scale and shift
  number ``s``. They are meta-parameters only (not adapted in the inner loop, the paper's default). As in the
  rest of metalab, BatchNorm keeps no running statistics, so the paper's per-step statistics have no object.
* MSL: the multi-step loss, a weighted sum of the query losses after every inner step; the weights anneal
  from uniform to the last step alone over ``msl_epochs`` (linearly; the paper decays them per epoch).
* DA: derivative-order annealing: first-order meta-gradients for the first ``first_order_steps`` training
  steps, then second order.
* CA: cosine annealing of the meta learning rate: ``train.lr_schedule: cosine`` (see the configs).

An evaluation with more inner steps than ``inner_steps`` reuses the last step's rates and BatchNorm weights.
The MLP used for sinusoid has no BatchNorm: there, BNWB is a no-op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from metalab.config import require
from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, adapt
from metalab.meta.gbml import Inner, ParamTable, output_loss, output_score
from metalab.models import BatchNorm2d
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """MAML++ hyperparameters (the ``mamlpp`` section); ``inner_lr`` initialises every learned rate."""

    inner_steps: int = 5
    """Inner steps during meta-training: also the number of learned rates and BatchNorm weights per layer."""
    eval_inner_steps: int = 5
    """Inner steps at evaluation (beyond ``inner_steps`` the last step's rates and BatchNorm weights repeat)."""
    first_order_steps: int = 0
    """Derivative-order annealing: first-order meta-gradients for this many training steps, then second order."""
    msl_epochs: int = 10
    """Multi-step loss: epochs over which the per-step loss weights anneal to the last step; 0: last step only."""
    epoch_steps: int = 500
    """Training steps per epoch, for ``msl_epochs`` (MAML++ counts 500 meta-iterations per epoch)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.first_order_steps >= 0, "first_order_steps", "must be >= 0")
        require(self.msl_epochs >= 0, "msl_epochs", "must be >= 0")
        require(self.epoch_steps >= 1, "epoch_steps", "must be >= 1")


def msl_weights(step: int, cfg: Config) -> torch.Tensor:
    """``(inner_steps,)`` weights of the query losses after each inner step at training step ``step``.

    They sum to 1 and go linearly from uniform (step 0) to all weight on the last inner step (after
    ``msl_epochs`` epochs, and from then on).
    """
    n = cfg.inner_steps
    done = 1.0 if cfg.msl_epochs == 0 else min(step / (cfg.msl_epochs * cfg.epoch_steps), 1.0)
    weights = torch.full((n,), (1.0 - done) / n)
    weights[-1] = 1.0 - weights[:-1].sum()
    return weights


def batchnorm_names(net: nn.Module) -> list[str]:
    return [
        f"{name}.{p}"
        for name, module in net.named_modules()
        if isinstance(module, (BatchNorm2d, nn.modules.batchnorm._BatchNorm))
        for p, _ in module.named_parameters(recurse=False)
    ]


class MAMLPlusPlusModel(nn.Module):
    """The network, its per-step per-layer inner rates and per-step BatchNorm weights, checkpointed together.

    The network's own BatchNorm weights are shadowed by the per-step ones (which start as copies of them) and
    are not trained: :meth:`trained` leaves them out.
    """

    def __init__(self, net: nn.Module, inner_steps: int, inner_lr: float):
        super().__init__()
        self.net = net
        bn = set(batchnorm_names(net))
        weights = {k: p for k, p in net.named_parameters() if k not in bn}
        self.inner_lr = ParamTable({k: torch.full((inner_steps,), inner_lr) for k in weights})
        self.bn = ParamTable(
            {
                k: p.detach().expand(inner_steps + 1, *p.shape).contiguous()
                for k, p in net.named_parameters()
                if k in bn
            }
        )

    def meta(self) -> dict[str, Params]:
        bn = set(self.bn.as_dict())
        weights = {k: p for k, p in self.net.named_parameters() if k not in bn}
        return {"weights": weights, "lr": self.inner_lr.as_dict(), "bn": self.bn.as_dict()}

    def trained(self) -> list[nn.Parameter]:
        meta = self.meta()
        return [*meta["weights"].values(), *self.inner_lr.parameters(), *self.bn.parameters()]


def forward_at(net: nn.Module, bn: Params, weights: Params, step: int, x: torch.Tensor) -> torch.Tensor:
    """The network after ``step`` inner steps: ``weights`` and BatchNorm weights number ``step``."""
    at = {k: v[min(step, v.shape[0] - 1)] for k, v in bn.items()}
    return functional_call(net, {**weights, **at}, (x,))


def adapt_steps(
    inner: Inner, meta: dict[str, Params], support_x: torch.Tensor, support_y: torch.Tensor
) -> list[Params]:
    """The adapted weights after each of the inner steps ``1..inner.steps`` (one task), with the learned rates."""
    weights, trail = meta["weights"], []
    for s in range(inner.steps):
        rates = {k: r[min(s, r.shape[0] - 1)] for k, r in meta["lr"].items()}  # this step's rate per layer

        def loss_fn(p: Params, x: torch.Tensor, y: torch.Tensor, s: int = s) -> torch.Tensor:
            return output_loss(forward_at(inner.model, meta["bn"], p, s, x), y, inner.regression)

        weights = adapt(weights, loss_fn, (support_x, support_y), 1, rates, inner.first_order)
        trail.append(weights)
    return trail


def step_losses(
    inner: Inner,
    meta: dict[str, Params],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task: ``(inner.steps,)`` query losses after each inner step, and the query score after the last."""
    trail = adapt_steps(inner, meta, support_x, support_y)
    outs = [forward_at(inner.model, meta["bn"], w, s + 1, query_x) for s, w in enumerate(trail)]
    losses = torch.stack([output_loss(out, query_y, inner.regression) for out in outs])
    return losses, output_score(outs[-1], query_y, inner.regression).detach()


def predict(
    inner: Inner, meta: dict[str, Params], support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """One task: adapt on the support set, then the outputs at ``x`` with the last step's BatchNorm weights."""
    trail = adapt_steps(inner, meta, support_x, support_y)
    return forward_at(inner.model, meta["bn"], trail[-1] if trail else meta["weights"], inner.steps, x)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model with learned rates and per-step BatchNorm, multi-step training loss and evaluation for MAML++."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    model = MAMLPlusPlusModel(gbml.network(run, cfg), cfg.inner_steps, cfg.inner_lr).to(device)
    second_order = run.train.steps > cfg.first_order_steps
    batching = gbml.task_batching(run.algo, cfg, model.net, second_order)
    inner = Inner(model.net, regression, cfg.inner_lr, cfg.inner_steps)
    score = "mse" if regression else "acc"

    def train_loss(step: int, ep: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        annealed = replace(inner, first_order=step < cfg.first_order_steps)  # derivative-order annealing
        per_task = functools.partial(step_losses, annealed)
        losses, scores = gbml.map_tasks(per_task, ep, batching, model.meta())  # (T, inner_steps), (T,)
        weights = msl_weights(step, cfg).to(losses)
        return (losses.mean(0) * weights).sum(), {
            f"train/{score}": scores.mean().item(),
            "train/final_step_loss": losses[:, -1].mean().item(),
        }

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
        parameters=model.trained(),
    )
