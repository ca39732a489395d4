"""Sinusoid regression tasks (Finn et al. 2017, MAML section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]``, inputs
``x ~ U[-5, 5]``; K support points and Q query points per task. Like the episode sampler, batch ``index`` of
seed ``s`` is always the same tasks.

Non-mutually-exclusive (NME) family (``task.label_assignment: fixed``; Yin et al., "Meta-Learning without
Memorization", ICLR 2020): a finite set of :data:`NME_TASKS` functions ``y = A_j sin(x)``, amplitudes
``A_j`` evenly spaced over :data:`NME_AMPLITUDE`, and every input carries the task's identity as a one-hot
code: ``x`` is ``(x, onehot(j))``, :data:`NME_FEATURES` numbers. One function of the input then solves every
training task, so a meta-learner can memorise it and ignore the support set. Evaluation tasks are new
functions (``A ~ U[NME_AMPLITUDE]``) whose inputs carry the code of a random training task: a model that
memorised predicts that training task's curve, one that adapts fits the support points.

Why a one-hot code rather than task-specific input intervals: this is the construction of the authors'
released sinusoid experiment (20 amplitudes over [0.1, 4], phase 0, one-hot appended to ``x ~ U[-5, 5]``,
test tasks with a continuous amplitude and a training task's code), and it keeps the regression problem
itself unchanged: every task still spans the whole ``[-5, 5]`` with the same sine shape, and the identity is
in inputs a meta-regularizer can learn to ignore. With intervals the identity would be ``x`` itself, which
the model cannot ignore without ignoring the regression input. Differences from that code: all 20 codes are
training tasks (it drew 16), and targets are noise-free, like the standard family here (it added N(0, 0.1^2)).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from metalab.data.episodes import Episode, generator_for

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
NME_TASKS = 20
"""Training functions of the NME family, one per one-hot code."""
NME_AMPLITUDE = (0.1, 4.0)
"""The NME training amplitudes are ``linspace(*NME_AMPLITUDE, NME_TASKS)``; evaluation draws from the range."""
NME_FEATURES = 1 + NME_TASKS
"""Input width of the NME family: ``x`` and the task's one-hot code."""
SinusoidFamily = Literal["standard", "nme_train", "nme_eval"]
"""``standard``: MAML's family. ``nme_train``: the NME training tasks. ``nme_eval``: new NME functions with a
training task's code (see the module docstring)."""


def _uniform(low: float, high: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (high - low) + low


class SinusoidTasks:
    """Sampler of sinusoid regression episodes: ``support_x`` is ``(T, K, 1)``, ``support_y`` is ``(T, K, 1)``.

    ``family`` (:data:`SinusoidFamily`) other than ``standard`` draws the NME family, whose inputs are
    ``(T, K, NME_FEATURES)``: ``x`` then the task's one-hot code (:meth:`task_codes` reads it back).
    """

    def __init__(self, k_shot: int, q_query: int, seed: int = 0, family: SinusoidFamily = "standard"):
        if k_shot < 1 or q_query < 1:
            raise ValueError(f"need k_shot >= 1 and q_query >= 1, got {k_shot}, {q_query}")
        if family not in ("standard", "nme_train", "nme_eval"):
            raise ValueError(f"unknown sinusoid family {family!r}")
        self.k_shot, self.q_query, self.seed, self.family = k_shot, q_query, seed, family

    def functions(self, index: int, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude and phase ``(T,)`` of the tasks in batch ``index`` (the same ones :meth:`sample` uses)."""
        g = generator_for(self.seed, index)
        if self.family != "standard":
            amplitude, _ = self._nme_tasks(tasks, g)
            return amplitude, torch.zeros(tasks)
        return _uniform(*AMPLITUDE, (tasks,), g), _uniform(*PHASE, (tasks,), g)

    def _nme_tasks(self, tasks: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(amplitude, code)``, each ``(T,)``: a training function and its code, or for ``nme_eval`` a new
        amplitude with a training task's code."""
        code = torch.randint(NME_TASKS, (tasks,), generator=g)
        if self.family == "nme_train":
            return torch.linspace(*NME_AMPLITUDE, NME_TASKS)[code], code
        return _uniform(*NME_AMPLITUDE, (tasks,), g), code

    @staticmethod
    def task_codes(x: torch.Tensor) -> torch.Tensor:
        """The task code (index of the one-hot) of NME inputs ``(..., NME_FEATURES) -> (...)``."""
        return x[..., 1:].argmax(-1)

    def sample(self, index: int, tasks: int) -> Episode:
        g = generator_for(self.seed, index)
        if self.family != "standard":
            return self._sample_nme(tasks, g)
        amplitude = _uniform(*AMPLITUDE, (tasks, 1, 1), g)
        phase = _uniform(*PHASE, (tasks, 1, 1), g)
        x = _uniform(*X_RANGE, (tasks, self.k_shot + self.q_query, 1), g)
        y = amplitude * torch.sin(x - phase)
        k = self.k_shot
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:], 1, k, self.q_query)

    def _sample_nme(self, tasks: int, g: torch.Generator) -> Episode:
        amplitude, code = self._nme_tasks(tasks, g)
        n = self.k_shot + self.q_query
        x = _uniform(*X_RANGE, (tasks, n, 1), g)
        y = amplitude[:, None, None] * torch.sin(x)  # phase 0
        onehot = F.one_hot(code, NME_TASKS).to(x.dtype)[:, None].expand(tasks, n, NME_TASKS)
        inputs = torch.cat([x, onehot], -1)  # (T, K+Q, NME_FEATURES)
        k = self.k_shot
        return Episode(inputs[:, :k], y[:, :k], inputs[:, k:], y[:, k:], 1, k, self.q_query)


def with_task_code(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., 1)`` with the task code of NME inputs ``like`` appended (``like``'s first row's code);
    ``x`` itself when ``like`` has no code or ``x`` has one already. Lets code that draws a curve over plain
    ``x`` (the sinusoid figure) query a model of NME inputs."""
    if like.shape[-1] == 1 or x.shape[-1] == like.shape[-1]:
        return x
    code = like.reshape(-1, like.shape[-1])[0, 1:]  # (NME_TASKS,)
    return torch.cat([x, code.expand(*x.shape[:-1], -1)], -1)


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The true function, broadcasting ``amplitude``/``phase`` over ``x``."""
    return amplitude * torch.sin(x - phase)
