"""The two trainer hooks RL needs: a step may skip the update (loss None), and ``after_update`` runs after it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metalab.train.loop import Learner, TrainConfig, fit


def test_skipped_steps_leave_optimizer_and_schedule_alone(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    updates: list[int] = []
    seen: list[torch.Tensor] = []

    def loss(step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        seen.append(model.weight.detach().clone())
        if step < 3 or step % 2 == 1:  # a warm-up, then every other step only collects
            return None, {"train/collected": float(step)}
        return model(torch.ones(1, 2)).sum(), {}

    learner = Learner(model, loss, lambda part, n: {}, after_update=updates.append)
    cfg = TrainConfig(
        steps=8, lr=0.1, lr_schedule="cosine", log_every=1, eval_every=100, checkpoint_every=100
    )
    fit(learner, cfg, tmp_path)
    assert updates == [4, 6]  # called with the step index, after each optimizer step only
    assert all(torch.equal(seen[0], w) for w in seen[:5])  # no update (not even a zero one) before step 4
    assert not torch.equal(seen[4], seen[5])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["state"][0]["step"].item() == 2  # Adam's count = real updates
    assert state["scheduler"]["last_epoch"] == 2  # so is the schedule's
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert sum(",train/loss," in r for r in rows) == 2 and sum(",train/collected," in r for r in rows) == 6
