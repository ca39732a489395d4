"""The evaluation protocol: mean over many fixed episodes of a part (``val`` or ``test``) with a 95% CI.

Metrics are named ``<part>/<metric>`` (``val/acc``, ``test/mse``); metrics measured on training data during
an evaluation are named ``train/...``. Model selection (``train.keep_best``) may only read those two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from metalab.config import MAX_EPISODES, MAX_SEED, require_between
from metalab.data.episodes import Episode
from metalab.stats import Estimate, mean_ci95

MAX_EVAL_BATCH = 4_096
"""Most episodes evaluated together (an RL run makes an environment for each)."""


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
        require_between(self.episodes, "episodes", 1, MAX_EPISODES)
        require_between(self.batch, "batch", 1, MAX_EVAL_BATCH)
        require_between(self.seed, "seed", 0, MAX_SEED)


PARTS = ("val", "test")
"""The evaluation parts. Training evaluates ``val`` only; ``test`` is evaluated once, after training."""
PART_INDEX = {"val": 0, "test": 1}
SEED_KEYS = {"val": 1, "train": 2}
"""Keys of the seeds derived from ``eval.seed``: ``val``, and ``train`` (episodes of the training tasks drawn
for diagnosis after training, :data:`metalab.data.tasks.EVAL_PARTS`)."""
"""A key per part for deriving per-episode seeds (RL): the two parts never share an episode seed."""


def part_seed(eval_seed: int, part: str) -> int:
    """The seed of ``part``'s fixed evaluation episodes: ``test`` uses ``eval.seed`` itself, ``val`` a seed
    derived from it, so the test episodes are never among the periodic (val) ones, even for a task family
    that is one infinite distribution (sinusoid) where the parts differ only by seed."""
    if part == "test":
        return eval_seed
    if part in SEED_KEYS:
        return int(np.random.SeedSequence([eval_seed, SEED_KEYS[part]]).generate_state(1)[0])
    raise ValueError(f"unknown evaluation part {part!r}; choose one of {', '.join([*PARTS, *SEED_KEYS])}")


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
