"""Recurrent Q-learning over whole sequences, the memory of meta-RL agents (RL², DREAM's exploration policy).

A :class:`RecurrentNet` (as a Q-network) reads a sequence of per-step inputs (an observation and whatever history the agent must
remember: previous action, reward, episode boundary) and outputs ``Q(h_t, .)`` at each step. Training replays
whole sequences from the start with a zero hidden state (the sequences of these problems are tens of steps,
so there is no need for stored states or burn-in as in R2D2, Kapturowski et al. ICLR 2019), and regresses
``Q(h_t, a_t)`` on the double-DQN target ``r_t + gamma (1 - terminal_t) Q_target(h_{t+1}, argmax_a Q(h_{t+1}, a))``.

A stored :class:`Sequences` row holds ``T + 1`` inputs for ``T`` actions: the last input is the state after
the last action, read only to bootstrap. Padded steps (``mask`` false) do not count in the loss.

:class:`TransitionNet` reads the same inputs as transitions ``(s, a, s')`` (DREAM's decoder option).
"""

from __future__ import annotations

from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalab.models import MLP
from metalab.rl.common import td_target
from metalab.utils import Params


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


class TransitionNet(nn.Module):
    """``(B, T+1, D)`` history inputs (:func:`metalab.rl.meta_episodes.history_input` rows: ``[obs, one_hot(prev action),
    prev reward, first]``) -> ``(B, T+1, out)``: at each step the transition that led there,
    ``(s_{t-1}, a_{t-1}, s_t)`` (nothing before the first step), through a two-layer MLP, then a GRU and a linear
    head. Observation dimensions whose bounds are integers at most 64 apart are one-hot (grid coordinates, flags);
    others are read as they are."""

    def __init__(self, space: gym.spaces.Box, n_actions: int, out_features: int, hidden: int = 128):
        super().__init__()
        low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
        span = np.where(np.isfinite(low) & np.isfinite(high), high - low, np.inf)
        discrete = (low == np.round(low)) & (high == np.round(high)) & (span <= 64)
        self.sizes = [int(s) + 1 if d else 0 for s, d in zip(span, discrete, strict=True)]
        self.register_buffer("low", torch.as_tensor(np.where(discrete, low, 0.0), dtype=torch.float32))
        feature = sum(max(size, 1) for size in self.sizes)
        self.obs_dim = len(self.sizes)
        self.encoder = MLP(2 * feature + n_actions + 2, (hidden,), hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out_features)

    def featurize(self, obs: torch.Tensor) -> torch.Tensor:
        """``(..., obs_dim)`` observations -> one-hot integer dimensions and raw others."""
        parts = []
        for i, size in enumerate(self.sizes):
            column = obs[..., i] - self.low[i]
            if size:
                parts.append(F.one_hot(column.round().clamp(0, size - 1).long(), size).to(obs.dtype))
            else:
                parts.append(column[..., None])
        return torch.cat(parts, -1)

    def transitions(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T+1, D)`` history inputs -> ``(B, T+1, F)``: ``[featurize(s_{t-1}), a_{t-1} one-hot, r_{t-1},
        first, featurize(s_t)]``, the first part zero on a first step."""
        obs, rest = x[..., : self.obs_dim], x[..., self.obs_dim :]  # rest: prev action one-hot, reward, first
        before = self.featurize(torch.cat([torch.zeros_like(obs[:, :1]), obs[:, :-1]], 1))
        return torch.cat([before * (1 - rest[..., -1:]), rest, self.featurize(obs)], -1)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.gru(F.relu(self.encoder(self.transitions(x))), h)
        return self.head(out), h


def sequence_q(net: nn.Module, params: Params, inputs: torch.Tensor) -> torch.Tensor:
    """``Q`` at every step of ``(B, T, D)`` inputs read from a zero state under ``params``: ``(B, T, A)``."""
    return functional_call(net, params, (inputs,))[0]


class SequenceBatch(NamedTuple):
    """A batch of padded sequences as tensors (:func:`to_tensors`)."""

    inputs: torch.Tensor  # (B, T+1, D) history inputs, the last one after the last step
    action: torch.Tensor  # (B, T) int64
    reward: torch.Tensor  # (B, T)
    terminal: torch.Tensor  # (B, T) bool
    mask: torch.Tensor  # (B, T) bool: real steps (False on padding)


def sequence_td_loss(
    net: nn.Module, online: Params, target: Params, batch: SequenceBatch, gamma: float, double: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked Huber TD loss over the sequences of ``batch`` and the mean Q of the actions taken."""
    inputs, action, reward, terminal, mask = batch
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


def to_tensors(rows: Sequences, device: torch.device) -> SequenceBatch:
    """The sequences as tensors on ``device``."""
    return SequenceBatch(*(torch.from_numpy(a).to(device) for a in rows[:5]))
