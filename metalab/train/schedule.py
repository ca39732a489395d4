"""The learning-rate schedule of :func:`metalab.train.loop.fit`: a plan of the factor of ``train.lr`` per update,
saved in the checkpoint, and what a resume does to it (a changed ``train.steps`` or ``train.lr``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from metalab.errors import ConfigError

if TYPE_CHECKING:
    from metalab.train.loop import TrainConfig

log = logging.getLogger(__name__)

Extend = Literal["continue", "restart"]
"""How a cosine schedule goes on when a resume changes ``train.steps`` (see :meth:`LrPlan.extend`)."""


def _phase_factor(phase: list, update: int) -> float:
    """The factor of one :class:`LrPlan` phase ``[first_update, length, scale]`` at ``update``."""
    first, length, scale = phase
    if length == 0:
        return float(scale)
    return float(scale) * 0.5 * (1 + math.cos(math.pi * min(update - first, length) / length))


@dataclass
class LrPlan:
    """The learning-rate schedule: the factor of ``train.lr`` as a function of the number of updates made.

    ``phases`` are ``[first_update, length, scale]``: a cosine from ``scale`` down to 0 over ``length`` updates,
    or, with ``length`` 0, the constant factor ``scale``. The factor at update ``u`` comes from the phase added
    last among those begun by ``u``. A run starts with one phase (``constant``: ``[0, 0, 1]``; ``cosine``:
    ``[0, steps, 1]``); a resume that changes ``train.steps`` adds one (:meth:`extend`). The plan is saved in
    the checkpoint, so later resumes follow the same rates.
    """

    kind: str
    steps: int
    """The ``train.steps`` the plan is made for."""
    phases: list[list] = field(default_factory=list)

    @classmethod
    def start(cls, cfg: TrainConfig, steps: int | None = None) -> LrPlan:
        """The plan of a new run: ``cfg.lr_schedule`` over ``steps`` (default ``cfg.steps``)."""
        steps = cfg.steps if steps is None else steps
        return cls(cfg.lr_schedule, steps, [[0, steps if cfg.lr_schedule == "cosine" else 0, 1.0]])

    def factor(self, update: int) -> float:
        """The factor of ``train.lr`` for the update after ``update`` updates."""
        phase = next((p for p in reversed(self.phases) if p[0] <= update), self.phases[0])
        return _phase_factor(phase, update)

    def extend(self, steps: int, step: int, update: int, how: Extend | None) -> str | None:
        """Re-plan for ``steps`` in all, at step ``step`` after ``update`` updates; a line for the log, or None
        when nothing changes.

        A constant schedule just goes on. A cosine one needs ``how``: ``continue`` keeps the old cosine to its
        planned end and then holds the rate of its last update there (``lr * (1 + cos(pi * (n - 1) / n)) / 2``
        for a cosine of ``n`` updates); ``restart`` begins a new cosine from ``train.lr`` now, down to 0 at the
        new ``steps``.
        """
        if steps == self.steps:
            return None
        old, self.steps = self.steps, steps
        if self.kind != "cosine":
            return None
        if how is None:
            self.steps = old
            raise ConfigError(
                "train.steps",
                f"changing it from {old} to {steps} on a cosine schedule needs a choice of how the schedule goes "
                f"on: continue (hold the rate the old cosine ends with) or restart (a new cosine over the "
                f"remaining steps); metalab train --schedule, or fit(extend=...)",
            )
        last = self.phases[-1]
        if how == "restart":
            if steps > step:
                self.phases.append([update, steps - step, 1.0])
            return f"train.steps {old} -> {steps}: a new cosine from train.lr over the {steps - step} remaining steps"
        if last[1] == 0:
            return f"train.steps {old} -> {steps}: the schedule goes on holding {last[2]:.4g} x train.lr"
        end = last[0] + last[1]
        hold = _phase_factor(last, end - 1)
        self.phases.append([end, 0, hold])
        return (
            f"train.steps {old} -> {steps}: the cosine ends at update {end} as planned, then holds "
            f"{hold:.4g} x train.lr (the rate of its last update)"
        )

    def state(self) -> dict:
        """Plain data for the checkpoint."""
        return {"kind": self.kind, "steps": self.steps, "phases": [list(p) for p in self.phases]}

    def load_state(self, state: dict) -> None:
        """Take the plan a checkpoint saved (in place: the scheduler holds this object)."""
        self.kind, self.steps = str(state["kind"]), int(state["steps"])
        self.phases = [[int(p[0]), int(p[1]), float(p[2])] for p in state["phases"]]


def restore_schedule(
    cfg: TrainConfig,
    state: dict,
    sched: torch.optim.lr_scheduler.LambdaLR,
    plan: LrPlan,
    step: int,
    extend: Extend | None,
) -> None:
    """After the optimizer and scheduler states are loaded: bring in the checkpoint's plan, re-plan for a
    changed ``cfg.steps``, and set the rate ``cfg.lr`` (which may differ from the checkpoint's) in every place
    torch keeps it, so the next update uses it."""
    if cfg.steps < step:
        raise ConfigError("train.steps", f"{cfg.steps} is below the {step} steps the checkpoint has done")
    saved = state.get("lr_plan")
    if saved is not None:
        plan.load_state(saved)
    else:  # checkpoints written before plans were saved: their schedule spanned the steps they were run for
        plan.load_state(LrPlan.start(cfg, cfg.steps if extend is None else step).state())
    if plan.kind != cfg.lr_schedule:
        raise ConfigError(
            "train.lr_schedule", f"the checkpoint's schedule is {plan.kind!r}; it cannot change on resume"
        )
    update = sched.last_epoch
    change = plan.extend(cfg.steps, step, update, extend)
    if change is not None:
        log.info("%s", change)
    before = sched.base_lrs[0]
    opt = sched.optimizer
    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * plan.factor(update)
    sched.base_lrs = [cfg.lr for _ in opt.param_groups]
    sched._last_lr = [
        group["lr"] for group in opt.param_groups
    ]  # what get_last_lr() reports until the next step
    if not math.isclose(before, cfg.lr):
        log.info("train.lr %g -> %g from step %d (the optimizer's moments are kept)", before, cfg.lr, step)
