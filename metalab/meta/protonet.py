"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

A class prototype is the mean embedding of its support examples; a query is classified by a softmax over
negative squared Euclidean distances to the prototypes. Training may use more ways than testing (60-way
training for Omniglot in the paper): set ``task.train_ways``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from metalab.config import require
from metalab.data.episodes import Episode
from metalab.data.tasks import make_sampler
from metalab.experiment import RunConfig
from metalab.models import Conv4
from metalab.train.evaluate import evaluate_episodes
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config:
    """ProtoNet hyperparameters (the ``protonet`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters."""

    def __post_init__(self) -> None:
        require(self.hidden >= 1, "hidden", "must be >= 1")


def prototype_logits(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int
) -> torch.Tensor:
    """Logits ``-||q - c_k||^2`` of each query against each class mean ``c_k`` of the support embeddings.

    ``support`` (S, D), ``support_y`` (S,) in ``0..n_way-1``, ``query`` (Q, D) -> (Q, n_way).
    """
    onehot = F.one_hot(support_y, n_way).to(support.dtype)  # (S, N)
    prototypes = onehot.T @ support / onehot.sum(0)[:, None]  # (N, D)
    return -torch.cdist(query, prototypes).pow(2)


def episode_logits(model: nn.Module, params: dict[str, torch.Tensor], ep: Episode) -> torch.Tensor:
    """Query logits ``(T, N*Q, N)`` of a batched episode; each task is embedded as one batch (its own BN stats)."""
    n_support = ep.support_x.shape[1]
    images = torch.cat([ep.support_x, ep.query_x], dim=1)  # (T, N*K + N*Q, C, H, W)
    z = vmap(lambda x: functional_call(model, params, (x,)))(images)  # (T, N*(K+Q), D)
    logits = vmap(prototype_logits, in_dims=(0, 0, 0, None))
    return logits(z[:, :n_support], ep.support_y, z[:, n_support:], ep.n_way)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a ProtoNet run."""
    cfg: Config = run.params
    model = Conv4(1, cfg.hidden, image_size=run.task.image_size).to(device)
    train = make_sampler(run.task, "train", run.seed, root)
    evals = {part: make_sampler(run.task, part, run.eval.seed, root) for part in ("val", "test")}

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ep = train.sample(step, run.train.meta_batch).to(device)
        logits = episode_logits(model, dict(model.named_parameters()), ep)  # (T, NQ, N)
        loss = F.cross_entropy(logits.flatten(0, 1), ep.query_y.flatten())
        acc = (logits.argmax(-1) == ep.query_y).float().mean()
        return loss, {"train/acc": acc.item()}

    def evaluate(part: str) -> dict[str, float]:
        n = run.eval.val_episodes if part == "val" else run.eval.episodes
        params = {k: v.detach() for k, v in model.named_parameters()}

        def per_task(ep: Episode) -> torch.Tensor:
            with torch.no_grad():
                return (episode_logits(model, params, ep).argmax(-1) == ep.query_y).float().mean(-1)

        est = evaluate_episodes(per_task, evals[part], n, run.eval.batch, device)
        return {f"eval/{part}_acc": est.mean, f"eval/{part}_acc_ci95": est.ci95}

    return Learner(model, loss, evaluate)
