"""Sinusoid regression tasks (Finn et al. 2017, MAML section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]``, inputs
``x ~ U[-5, 5]``; K support points and Q query points per task. Like the episode sampler, batch ``index`` of
seed ``s`` is always the same tasks.
"""

from __future__ import annotations

import math

import torch

from metalab.data.episodes import Episode, generator_for

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


def _uniform(low: float, high: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (high - low) + low


class SinusoidTasks:
    """Sampler of sinusoid regression episodes: ``support_x`` is ``(T, K, 1)``, ``support_y`` is ``(T, K, 1)``."""

    def __init__(self, k_shot: int, q_query: int, seed: int = 0):
        if k_shot < 1 or q_query < 1:
            raise ValueError(f"need k_shot >= 1 and q_query >= 1, got {k_shot}, {q_query}")
        self.k_shot, self.q_query, self.seed = k_shot, q_query, seed

    def functions(self, index: int, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude and phase ``(T,)`` of the tasks in batch ``index`` (the same ones :meth:`sample` uses)."""
        g = generator_for(self.seed, index)
        return _uniform(*AMPLITUDE, (tasks,), g), _uniform(*PHASE, (tasks,), g)

    def sample(self, index: int, tasks: int) -> Episode:
        g = generator_for(self.seed, index)
        amplitude = _uniform(*AMPLITUDE, (tasks, 1, 1), g)
        phase = _uniform(*PHASE, (tasks, 1, 1), g)
        x = _uniform(*X_RANGE, (tasks, self.k_shot + self.q_query, 1), g)
        y = amplitude * torch.sin(x - phase)
        k = self.k_shot
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:], 1, k, self.q_query)


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The true function, broadcasting ``amplitude``/``phase`` over ``x``."""
    return amplitude * torch.sin(x - phase)
