"""What the multi-task envs share: checking ``reset`` options, picking the episode's task from them, checking
an action. Each env keeps its own task list; these functions only read it."""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection
from typing import Any

import numpy as np


def check_options(options: dict[str, Any] | None, valid: Collection[str]) -> dict[str, Any]:
    """A copy of ``reset``'s ``options`` (``{}`` for None); a key outside ``valid`` raises ValueError naming it."""
    options = dict(options or {})
    unknown = set(options) - set(valid)
    if unknown:
        raise ValueError(f"unknown reset option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return options


def choose_task(
    options: dict[str, Any], n_tasks: int, tasks: Callable[[str], list[int]], rng: np.random.Generator
) -> int:
    """The episode's task: ``options["task"]`` (an int in ``[0, n_tasks)``, else ValueError), or one drawn by
    ``rng`` from ``tasks(options.get("split", "train"))``."""
    if "task" in options:
        task = operator.index(options["task"])
        if not 0 <= task < n_tasks:
            raise ValueError(f"task must be an int in [0, {n_tasks}), got {options['task']!r}")
        return task
    pool = tasks(options.get("split", "train"))
    return pool[int(rng.integers(len(pool)))]


def check_action(action: Any, dim: int) -> np.ndarray:
    """``action`` as float64 ``(dim,)``; anything else, or a non-finite entry, raises ValueError."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (dim,) or not np.all(np.isfinite(a)):
        raise ValueError(f"action must be {dim} finite numbers, got {action!r}")
    return a
