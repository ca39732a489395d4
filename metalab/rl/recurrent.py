"""Recurrent Q-learning over whole sequences, the memory of meta-RL agents (RL², DREAM's exploration policy).

A :class:`RecurrentNet` (as a Q-network) reads a sequence of per-step inputs (an observation and whatever history the agent must
remember: previous action, reward, episode boundary) and outputs ``Q(h_t, .)`` at each step. Training replays
whole sequences from the start with a zero hidden state (the sequences of these problems are tens of steps,
so there is no need for stored states or burn-in as in R2D2, Kapturowski et al. ICLR 2019), and regresses
``Q(h_t, a_t)`` on the double-DQN target ``r_t + gamma (1 - terminal_t) Q_target(h_{t+1}, argmax_a Q(h_{t+1}, a))``.

A stored :class:`Sequences` row holds ``T + 1`` inputs for ``T`` actions: the last input is the state after
the last action, read only to bootstrap. Padded steps (``mask`` false) do not count in the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalab.rl.dqn import td_target

Params = dict[str, torch.Tensor]


class Sequences(NamedTuple):
    """Replay rows of whole sequences (NumPy; ``R`` rows, ``T`` steps, padded to the longest)."""

    inputs: np.ndarray  # (R, T + 1, D) float32: the network's input before each action, and after the last
    action: np.ndarray  # (R, T) int64
    reward: np.ndarray  # (R, T) float32
    terminal: np.ndarray  # (R, T) bool: no bootstrapping after this step
    mask: np.ndarray  # (R, T) bool: a real step (false: padding)
    task: np.ndarray  # (R,) int64: the problem the sequence was collected on (-1: not recorded)


class RecurrentNet(nn.Module):
    """``(B, T, D)`` inputs -> ``(B, T, out)``: a ReLU layer, a GRU, and a linear head (Q-values, or any per-step output)."""

    def __init__(self, input_dim: int, out_features: int, hidden: int = 128):
        super().__init__()
        self.encoder = nn.Linear(input_dim, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs ``(B, T, out)`` and the final hidden state ``(1, B, H)``, from state ``h`` (zero if None)."""
        out, h = self.gru(F.relu(self.encoder(x)), h)  # (B, T, H)
        return self.head(out), h


def sequence_q(net: nn.Module, params: Params, inputs: torch.Tensor) -> torch.Tensor:
    """``Q`` at every step of ``(B, T, D)`` inputs read from a zero state under ``params``: ``(B, T, A)``."""
    return functional_call(net, params, (inputs,))[0]


def sequence_td_loss(
    net: nn.Module,
    online: Params,
    target: Params,
    inputs: torch.Tensor,
    action: torch.Tensor,
    reward: torch.Tensor,
    terminal: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    double: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked Huber TD loss over sequences and the mean Q of the actions taken.

    Shapes: ``inputs (B, T+1, D)``, ``action``/``reward``/``terminal``/``mask`` ``(B, T)``.
    """
    q_all = sequence_q(net, online, inputs)  # (B, T+1, A)
    q = q_all[:, :-1].gather(-1, action[..., None]).squeeze(-1)  # (B, T)
    with torch.no_grad():
        next_target = sequence_q(net, target, inputs)[:, 1:]  # (B, T, A)
        next_online = q_all[:, 1:].detach() if double else None
        y = td_target(reward, terminal.to(reward.dtype), next_target, gamma, next_online)
    weight = mask.to(q.dtype)
    loss = (F.smooth_l1_loss(q, y, reduction="none") * weight).sum() / weight.sum().clamp_min(1.0)
    return loss, (q.detach() * weight).sum() / weight.sum().clamp_min(1.0)


def pad_sequences(rows: list[Sequences]) -> Sequences:
    """One :class:`Sequences` of the given one-row batches, padded with zeros to the longest."""
    steps = max(r.action.shape[1] for r in rows)

    def pad(a: np.ndarray, length: int) -> np.ndarray:
        widths = [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return np.pad(a, widths)

    return Sequences(
        inputs=np.concatenate([pad(r.inputs, steps + 1) for r in rows]),
        action=np.concatenate([pad(r.action, steps) for r in rows]),
        reward=np.concatenate([pad(r.reward, steps) for r in rows]),
        terminal=np.concatenate([pad(r.terminal, steps) for r in rows]),
        mask=np.concatenate([pad(r.mask, steps) for r in rows]),
        task=np.concatenate([r.task for r in rows]),
    )


def one_hot(index: int, size: int) -> np.ndarray:
    """A float32 one-hot vector (all zeros for ``index < 0``, e.g. "no previous action")."""
    out = np.zeros(size, dtype=np.float32)
    if index >= 0:
        out[index] = 1.0
    return out


def to_tensors(rows: Sequences, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(inputs, action, reward, terminal, mask)`` as tensors on ``device``."""
    return tuple(torch.from_numpy(a).to(device) for a in rows[:5])
