"""The pretrained baseline of MAML's sinusoid experiment (Finn et al. 2017, sec. 5.1): no meta-learning.

One network is trained by plain regression on points of many tasks pooled together, which makes it predict
roughly the average function (about zero everywhere); at test time it is fine-tuned on each task's K support
points with the same inner loop as MAML. The paper fine-tunes with step size 0.01 for K=5 and 0.02 for K=10.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalab.data.episodes import Episode
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta import gbml, maml
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """Pretrained-baseline hyperparameters (the ``pretrain`` section): ``inner_lr`` and ``eval_inner_steps``
    are the test-time fine-tuning; ``inner_steps`` is unused (training has no inner loop)."""


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """An MLP regressed on all points of each training batch of tasks, fine-tuned per task at evaluation."""
    cfg: Config = run.params
    if run.task.dataset != "sinusoid":
        raise ConfigError("task.dataset", "pretrain is the sinusoid regression baseline; use sinusoid")
    model = gbml.network(run, cfg).to(device)
    batching = gbml.task_batching(run.algo, cfg, model, second_order=False)

    params = gbml.params_of(model)

    def train_loss(step: int, ep: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.cat([ep.support_x, ep.query_x], 1).flatten(0, 1)  # (T*(K+Q), 1): every point of every task
        y = torch.cat([ep.support_y, ep.query_y], 1).flatten(0, 1)
        loss = F.mse_loss(functional_call(model, params(), (x,)), y)
        return loss, {"train/mse": loss.item()}

    # Test-time fine-tuning is MAML's inner loop (sinusoid only: regression); training has none.
    inner = gbml.Inner(model, True, cfg.inner_lr, cfg.inner_steps)
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
