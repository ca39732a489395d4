"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), true second order by default.

The meta-parameters are an initialisation ``theta``; for each task, ``adapt`` takes a few gradient steps from
``theta`` on the support set, and the query loss at the adapted parameters is minimised over ``theta``,
differentiating through the inner steps (``first_order=True`` drops those second-order terms).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from metalab.config import require
from metalab.data.episodes import Episode
from metalab.data.sinusoid import SinusoidTasks, sinusoid
from metalab.data.tasks import make_sampler
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta.adapt import Params, adapt
from metalab.models import MLP, Conv4
from metalab.train.evaluate import evaluate_episodes
from metalab.train.loop import Learner
from metalab.train.plots import plot_curves


@dataclass(frozen=True)
class Config:
    """MAML hyperparameters (the ``maml`` section of a config)."""

    inner_lr: float = 0.01
    """Inner-loop (adaptation) step size alpha."""
    inner_steps: int = 1
    """Inner gradient steps during meta-training."""
    eval_inner_steps: int = 10
    """Inner gradient steps at evaluation (may exceed ``inner_steps``)."""
    first_order: bool = False
    """FOMAML: treat inner gradients as constants."""
    batching: Literal["auto", "vmap", "loop"] = "auto"
    """How tasks of a meta-batch are batched: one ``vmap`` (fast for MLPs) or a loop (faster for convs on CPU)."""
    hidden: int = 64
    """Conv-4 filters (Omniglot) ..."""
    mlp_hidden: tuple[int, ...] = (40, 40)
    """... or MLP hidden sizes (sinusoid)."""

    def __post_init__(self) -> None:
        require(self.inner_lr > 0, "inner_lr", "must be > 0")
        require(self.inner_steps >= 1, "inner_steps", "must be >= 1")
        require(self.eval_inner_steps >= 1, "eval_inner_steps", "must be >= 1")


def task_loss(
    model: nn.Module, regression: bool, params: Params, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Loss of ``model`` with ``params`` on one task's ``(x, y)``: MSE for regression, cross-entropy otherwise."""
    out = functional_call(model, params, (x,))
    return F.mse_loss(out, y) if regression else F.cross_entropy(out, y)


def adapted_query(
    model: nn.Module,
    regression: bool,
    cfg: Config,
    steps: int,
    first_order: bool,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task: adapt on the support set, return (query loss, query score: accuracy or MSE)."""
    loss_fn = functools.partial(task_loss, model, regression)
    adapted = adapt(params, loss_fn, (support_x, support_y), steps, cfg.inner_lr, first_order)
    out = functional_call(model, adapted, (query_x,))
    if regression:
        loss = F.mse_loss(out, query_y)
        return loss, loss.detach()
    return F.cross_entropy(out, query_y), (out.argmax(-1) == query_y).float().mean()


def batched_query(
    model: nn.Module,
    regression: bool,
    cfg: Config,
    steps: int,
    first_order: bool,
    params: Params,
    ep: Episode,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task (query loss, score) for a batched episode, each ``(T,)``."""
    per_task = functools.partial(adapted_query, model, regression, cfg, steps, first_order)
    use_vmap = cfg.batching == "vmap" or (cfg.batching == "auto" and isinstance(model, MLP))
    if use_vmap:
        _check_vmap(model, first_order)
        return vmap(per_task, in_dims=(None, 0, 0, 0, 0))(params, *ep[:4])
    outs = [per_task(params, *ep.task(i)[:4]) for i in range(ep.tasks)]
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def _check_vmap(model: nn.Module, first_order: bool) -> None:
    """Refuse second-order MAML through a vmapped BatchNorm: torch's batching rule for batch_norm's backward
    gives silently wrong meta-gradients there (pytorch/functorch#534; the loop is right)."""
    if not first_order and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(
            "maml.batching",
            "vmap gives wrong second-order gradients through BatchNorm (a PyTorch limitation); "
            "use batching: loop (or auto), or first_order: true",
        )


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a MAML run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    if regression:
        model: nn.Module = MLP(1, cfg.mlp_hidden, 1)
    else:
        model = Conv4(1, cfg.hidden, n_classes=run.task.ways, strided=True, image_size=run.task.image_size)
    model.to(device)
    if run.task.train_ways not in (None, run.task.ways):
        raise ConfigError("task.train_ways", "MAML's head has task.ways outputs: train_ways must equal ways")
    if cfg.batching == "vmap":
        _check_vmap(model, cfg.first_order)
    train = make_sampler(run.task, "train", run.seed, root)
    evals = {part: make_sampler(run.task, part, run.eval.seed, root) for part in ("val", "test")}
    score = "mse" if regression else "acc"

    def params() -> Params:
        return dict(model.named_parameters())

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ep = train.sample(step, run.train.meta_batch).to(device)
        losses, scores = batched_query(model, regression, cfg, cfg.inner_steps, cfg.first_order, params(), ep)
        return losses.mean(), {f"train/{score}": scores.mean().item()}

    def evaluate(part: str, n: int) -> dict[str, float]:
        detached = {k: v.detach() for k, v in params().items()}

        def per_task(ep: Episode) -> torch.Tensor:
            with torch.no_grad():  # torch.func.grad still differentiates inside; no outer graph is kept
                return batched_query(model, regression, cfg, cfg.eval_inner_steps, True, detached, ep)[1]

        est = evaluate_episodes(per_task, evals[part], n, run.eval.batch, device)
        return {f"eval/{part}_{score}": est.mean, f"eval/{part}_{score}_ci95": est.ci95}

    def figures(run_dir: Path) -> list[Path]:
        if not regression:
            return []
        return [sinusoid_figure(model, cfg, evals["test"], run_dir / "sinusoid_fits.png")]

    return Learner(model, loss, evaluate, figures=figures)


def sinusoid_figure(model: nn.Module, cfg: Config, tasks: SinusoidTasks, path: Path, n: int = 4) -> Path:
    """Predictions on ``n`` test tasks before and after adaptation on their K support points."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    ep = tasks.sample(0, n)
    amplitude, phase = tasks.functions(0, n)
    x = torch.linspace(-5, 5, 200).reshape(1, -1, 1).expand(n, -1, -1)  # (n, 200, 1)
    loss_fn = functools.partial(task_loss, model, True)
    curves = {"true": sinusoid(x, amplitude[:, None, None], phase[:, None, None])}
    with torch.no_grad():
        curves["before adaptation"] = vmap(lambda p, x: functional_call(model, p, (x,)), (None, 0))(params, x)
        for steps in sorted({1, cfg.eval_inner_steps}):

            def fit_one(
                sx: torch.Tensor, sy: torch.Tensor, xs: torch.Tensor, steps: int = steps
            ) -> torch.Tensor:
                return functional_call(
                    model, adapt(params, loss_fn, (sx, sy), steps, cfg.inner_lr, True), (xs,)
                )

            curves[f"after {steps} step{'s' * (steps > 1)}"] = vmap(fit_one)(ep.support_x, ep.support_y, x)
    points = [(ep.support_x[i, :, 0], ep.support_y[i, :, 0]) for i in range(n)]
    return plot_curves(
        path,
        x[0, :, 0],
        {k: v[..., 0] for k, v in curves.items()},
        points,
        f"MAML on sinusoid tasks, K={ep.k_shot}",
    )
