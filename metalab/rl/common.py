"""Pieces every value-based and actor-critic learner here shares: the TD target, Polyak averaging of target
networks, and a linear schedule (exploration, annealed weights). DQN, recurrent Q-learning, RL², DREAM, SAC and
PEARL import them from here."""

from __future__ import annotations

import torch

from metalab.utils import Params


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    """``start`` at ``t = 0``, linearly to ``end`` at ``t = duration``, then ``end``."""
    if duration <= 0:
        return end
    return end + (start - end) * max(0.0, 1.0 - t / duration)


def td_target(
    reward: torch.Tensor,
    done: torch.Tensor,
    next_q_target: torch.Tensor,
    gamma: float,
    next_q_online: torch.Tensor | None = None,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``r + gamma (1 - done) Q_target(s', a*)``, ``(B,)``.

    ``a*`` is ``argmax_a Q_target(s', a)`` (plain DQN) or, given ``next_q_online``, ``argmax_a Q_online(s', a)``
    (double DQN: decoupling selection from evaluation removes the max operator's upward bias). ``clip`` bounds
    the target to a range the true value cannot leave.
    """
    chooser = next_q_target if next_q_online is None else next_q_online  # (B, A)
    best = chooser.argmax(-1, keepdim=True)  # (B, 1)
    next_value = next_q_target.gather(-1, best).squeeze(-1)  # (B,)
    target = reward + gamma * (1.0 - done) * next_value
    return target if clip is None else target.clamp(*clip)


def polyak_update(target: Params, online: Params, tau: float) -> Params:
    """``(1 - tau) * target + tau * online`` for each parameter (Polyak averaging; ``tau = 1`` copies)."""
    return {k: torch.lerp(target[k], online[k].detach(), tau) for k in target}
