"""Reptile: a first-order meta-learner (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018).

For each task, run ``inner_steps`` steps of SGD from the initialisation ``theta`` to ``phi``; then move ``theta``
towards the adapted weights: ``theta <- theta + epsilon * mean_tasks(phi - theta)``.

How it meets the trainer: the trainer minimises a loss with its optimizer, so the Reptile direction is handed
over as the gradient of a surrogate, ``0.5 * ||theta - stopgrad(phi)||^2`` summed over parameters and averaged
over tasks, whose gradient is exactly ``mean_tasks(theta - phi)``. With ``train.lr`` as epsilon and plain SGD
that is the paper's update; the trainer's Adam rescales the direction per coordinate (the paper suggests
treating ``theta - phi`` as a gradient for an adaptive optimizer like Adam). Its value is half the mean squared distance the tasks pulled the
weights, a useful diagnostic. The inner loop is computed without any graph: memory does not grow with
``inner_steps``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from metalab.data.episodes import Episode
from metalab.experiment import RunConfig
from metalab.meta import gbml, maml
from metalab.meta.adapt import Params, adapt
from metalab.meta.gbml import Inner, output_score
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """Reptile hyperparameters (the ``reptile`` section)."""

    inner_steps: int = 5
    """SGD steps per task during meta-training (Reptile needs more than one: with one it is joint training)."""
    inner_query: bool = True
    """Also train the inner loop on the task's query points. Reptile needs no support/query split, so by default
    it learns from all K+Q points of a training task; test-time adaptation still sees only the K support points."""


def adapt_task(
    inner: Inner,
    theta: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    *,
    inner_query: bool = True,
) -> tuple[Params, torch.Tensor]:
    """One task: (the adapted weights ``phi``, the query score at ``phi``), with no graph back to ``theta``.

    ``inner_query``: the inner loop trains on the query points too (``Config.inner_query``)."""
    x, y = support_x, support_y
    if inner_query:
        x, y = torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
    theta = {k: v.detach() for k, v in theta.items()}
    phi = adapt(theta, inner.loss, (x, y), inner.steps, inner.lr, first_order=True)
    score = output_score(functional_call(inner.model, phi, (query_x,)), query_y, inner.regression)
    return {k: v.detach() for k, v in phi.items()}, score.detach()


def surrogate(theta: Params, phi: Params) -> torch.Tensor:
    """``0.5 * sum ||theta - phi_t||^2`` averaged over the task dimension of ``phi``: its gradient in ``theta``
    is ``mean_t(theta - phi_t)``, the (negated) Reptile direction."""
    tasks = next(iter(phi.values())).shape[0]
    return sum(0.5 * (theta[k] - phi[k]).pow(2).sum() for k in theta) / tasks


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, surrogate training loss and evaluation for a Reptile run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    model = gbml.network(run, cfg).to(device)
    batching = gbml.task_batching(run.algo, cfg, model, second_order=False)
    inner = Inner(model, regression, cfg.inner_lr, cfg.inner_steps, first_order=True)
    per_task = functools.partial(adapt_task, inner, inner_query=cfg.inner_query)
    score = "mse" if regression else "acc"

    params = gbml.params_of(model)

    def train_loss(step: int, ep: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        theta = params()
        with torch.no_grad():  # nothing of the inner loop is kept for backward
            phi, scores = gbml.map_tasks(per_task, ep, batching, theta)  # each phi[k]: (T, *theta[k].shape)
        return surrogate(theta, phi), {f"train/{score}": scores.mean().item()}

    # Test-time adaptation is plain SGD with the inner rate, as in MAML.
    return gbml.build_learner(
        run,
        root,
        device,
        model=model,
        meta=params,
        train_loss=train_loss,
        predict=maml.predict,
        inner=inner,
        batching=batching,
    )
