"""The few-shot evaluation protocol: mean over many fixed test episodes with a 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from metalab.config import require
from metalab.data.episodes import Episode


@dataclass(frozen=True)
class EvalConfig:
    """How runs are evaluated: a fixed set of episodes drawn from ``seed`` (the same for every checkpoint)."""

    episodes: int = 600
    """Test episodes for the final / ``metalab eval`` estimate."""
    batch: int = 32
    """Episodes evaluated together."""
    seed: int = 1_000_003
    """Seed of the evaluation episodes; differs from training seeds so no batch is shared."""

    def __post_init__(self) -> None:
        require(self.episodes >= 1, "episodes", "must be >= 1")
        require(self.batch >= 1, "batch", "must be >= 1")


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence half-width ``1.96 * std / sqrt(n)``."""

    mean: float
    ci95: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.ci95:.4f} (n={self.n})"


def mean_ci95(values: torch.Tensor | Sequence[float]) -> Estimate:
    """Mean and 95% CI (sample standard deviation); ``ci95`` is NaN for fewer than 2 values."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    n = v.numel()
    ci = 1.96 * v.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.nan
    return Estimate(v.mean().item(), ci, n)


class TaskSampler(Protocol):
    def sample(self, index: int, tasks: int) -> Episode: ...


def evaluate_episodes(
    per_task: Callable[[Episode], torch.Tensor],
    sampler: TaskSampler,
    episodes: int,
    batch: int,
    device: torch.device | str = "cpu",
) -> Estimate:
    """Apply ``per_task`` (batched episode -> one value per task) to ``episodes`` fixed episodes."""
    return evaluate_episode_columns(lambda ep: per_task(ep)[:, None], sampler, episodes, batch, device)[0]


def evaluate_episode_columns(
    per_task: Callable[[Episode], torch.Tensor],
    sampler: TaskSampler,
    episodes: int,
    batch: int,
    device: torch.device | str = "cpu",
) -> list[Estimate]:
    """Like :func:`evaluate_episodes` for ``per_task`` giving several values per task ``(T, M)``: M estimates.

    A NaN entry (a metric undefined for that task) is left out of its column.
    """
    values = []
    for index in range(math.ceil(episodes / batch)):
        tasks = min(batch, episodes - index * batch)
        with torch.no_grad():
            values.append(per_task(sampler.sample(index, tasks).to(device)).detach().cpu().double())
    table = torch.cat(values)  # (episodes, M)
    return [
        mean_ci95(kept) if (kept := col[~col.isnan()]).numel() else Estimate(math.nan, math.nan, 0)
        for col in table.T
    ]
