"""Memory-augmented recurrent few-shot learner (after Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, 2016).

An LSTM reads a sequence of (image, label) pairs and predicts labels with no gradient steps at test time;
class-to-label assignments change every episode, so it must bind them in context. Two sequence formats:

- ``offset`` (the paper's): every example of the episode, in random order, each shown with the label of the
  *previous* step; the model predicts every label, and accuracy is reported by instance number (1st, 2nd,
  ... sighting of a class). ``task.shots + task.queries`` is the number of instances per class.
- ``support_query`` (course-homework form): the support pairs (x, y) in random order, then each query as
  (x, 0); the loss and accuracy are on the queries only.

``memory: true`` adds the paper's external memory with least-recently-used access: read keys from the
controller, cosine-softmax read weights, writes interpolated (learned gate) between the last read location
and the least-used slot, which is cleared before writing. Options bring it closer to the paper or past it:
``feed_reads`` (the controller's input holds the previous step's reads, as in the paper), ``least_used:
per_head`` (one least-used slot per head, as the paper marks n least-used slots for n reads),
``key_strength`` (a learned sharpening of the read softmax, which the paper does not have) and
``read_before_write`` (reads see the memory before this step's write, which otherwise always matches best).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metalab.config import MAX_UNITS, require, require_between
from metalab.data.episodes import Episode, ShuffledSampler
from metalab.data.tasks import make_sampler
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.models import Conv4
from metalab.train.distributed import shard
from metalab.train.evaluate import evaluate_episode_columns
from metalab.train.loop import Learner

REPORTED_INSTANCES = (1, 2, 3, 5, 10)


@dataclass(frozen=True)
class Config:
    """MANN-style learner hyperparameters (the ``mann`` section of a config)."""

    mode: Literal["offset", "support_query"] = "offset"
    """Sequence format (see the module docstring)."""
    encoder: Literal["pixels", "conv4"] = "conv4"
    """Image features: raw flattened pixels (the paper) or a Conv-4 embedding trained end to end (with
    per-image normalisation, so no step's output depends on later images through batch statistics)."""
    hidden: int = 200
    """LSTM hidden size."""
    memory: bool = False
    """Add the external memory with least-recently-used access."""
    memory_slots: int = 128
    """Rows of the external memory."""
    memory_width: int = 40
    """Width of a memory row (and of each read key)."""
    read_heads: int = 4
    """Read heads of the external memory."""
    usage_decay: float = 0.95
    """Decay gamma of slot usage."""
    feed_reads: bool = False
    """(``memory: true`` only) Give the controller the previous step's reads as input, as the paper's
    controller has them (its ``r_{t-1}``), so it can form its keys from what it read; false: the LSTM runs
    over the images and labels alone and the reads only reach the output layer (faster: one fused LSTM call)."""
    least_used: Literal["one", "per_head"] = "one"
    """(``memory: true`` only) Least-used slots written per step. ``one``: the single least-used slot, cleared,
    takes every head's key (each by its gate's share), so the heads' keys are summed into one row.
    ``per_head``: head ``i`` writes the ``i``-th least-used slot, all ``read_heads`` of them cleared first (the
    paper marks the n least-used slots, n = the number of reads)."""
    key_strength: float | None = None
    """(``memory: true`` only) Null: reads are a softmax of plain cosines, as in the paper (in [-1, 1], so over
    128 slots no slot gets more than e^2 times another's weight). A number s > 1: each head's cosines are
    multiplied by a learned strength ``1 + softplus(.)`` of the controller state (the Neural Turing Machine's key
    strength), starting at about s. Sharp reads match the slot just written unless ``read_before_write``."""
    read_before_write: bool = False
    """(``memory: true`` only) Read with step t's keys from the memory as step t-1 left it, then write. False
    (as the paper's equations read it: from ``M_t``, after step t's write): the slot just written with the same
    keys is the best match (cosine 1 for a cleared slot), so a sharp read lands on it rather than on an earlier
    step's slot."""

    def __post_init__(self) -> None:
        for key, high in (("hidden", MAX_UNITS), ("memory_slots", 65_536), ("memory_width", MAX_UNITS),
                          ("read_heads", 64)):  # fmt: skip
            require_between(getattr(self, key), key, 1, high)
        require(0 < self.usage_decay < 1, "usage_decay", "must be in (0, 1)")
        for key in ("feed_reads", "key_strength", "read_before_write"):
            require(self.memory or not getattr(self, key), key, "needs memory: true")
        if self.key_strength is not None:
            require_between(self.key_strength, "key_strength", 1.001, 1000.0, " (or null)")
        require(self.memory or self.least_used == "one", "least_used", "needs memory: true")
        require(
            self.least_used == "one" or self.read_heads <= self.memory_slots,
            "least_used",
            "per_head needs read_heads <= memory_slots",
        )


class LRUMemory(nn.Module):
    """External memory written to the least-used or the last-read slots; one step per call of :meth:`step`."""

    def __init__(
        self,
        controller: int,
        slots: int,
        width: int,
        heads: int,
        decay: float,
        least_used: str = "one",
        key_strength: float | None = None,
        read_before_write: bool = False,
    ):
        super().__init__()
        self.slots, self.width, self.heads, self.decay = slots, width, heads, decay
        self.least_used, self.read_before_write = least_used, read_before_write
        self.keys = nn.Linear(controller, heads * width)
        self.gate = nn.Linear(controller, heads)
        self.strength = None
        if key_strength is not None:  # 1 + softplus(bias) = key_strength at zero input
            self.strength = nn.Linear(controller, heads)
            with torch.no_grad():
                excess = key_strength - 1  # the inverse of softplus, log(e^x - 1), without overflow
                self.strength.bias.fill_(excess + math.log(-math.expm1(-excess)))

    def initial(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        memory = torch.full((batch, self.slots, self.width), 1e-6, device=device)
        usage = torch.zeros(batch, self.slots, device=device)
        last_read = torch.zeros(batch, self.heads, self.slots, device=device)
        return memory, usage, last_read

    def step(
        self, h: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        memory, usage, last_read = state  # (B, S, W), (B, S), (B, H, S)
        b = h.shape[0]
        keys = self.keys(h).view(b, self.heads, self.width)  # (B, H, W)
        alpha = torch.sigmoid(self.gate(h))[..., None]  # (B, H, 1)
        if self.least_used == "per_head":  # head i: the i-th least-used slot (distinct slots)
            least = F.one_hot(usage.topk(self.heads, -1, largest=False).indices, self.slots).to(h.dtype)
            cleared = least.sum(1)  # (B, S)
        else:  # the least-used slot (one per batch element), written by every head's gate share
            cleared = F.one_hot(usage.argmin(-1), self.slots).to(h.dtype)  # (B, S)
            least = cleared[:, None]
        write = alpha * last_read + (1 - alpha) * least  # (B, H, S)
        written = memory * (1 - cleared)[..., None] + write.transpose(1, 2) @ keys  # (B, S, W)
        source = memory if self.read_before_write else written
        similarity = F.cosine_similarity(keys[:, :, None], source[:, None], dim=-1)  # (B, H, S)
        if self.strength is not None:
            similarity = similarity * (1 + F.softplus(self.strength(h)))[..., None]
        read = torch.softmax(similarity, dim=-1)  # (B, H, S)
        usage = self.decay * usage + read.sum(1) + write.sum(1)
        return (read @ source).flatten(1), (written, usage, read)  # (B, H*W)


class MANN(nn.Module):
    def __init__(self, cfg: Config, n_way: int, image_size: int = 28):
        super().__init__()
        if cfg.encoder == "conv4":
            self.encoder: nn.Module = Conv4(1, 64, image_size=image_size, norm="layer")  # no batch-stat leaks
            features = self.encoder.embedding_dim
        else:
            self.encoder = nn.Flatten()
            features = image_size * image_size
        self.n_way = n_way
        read = cfg.read_heads * cfg.memory_width if cfg.memory else 0
        self.feed_reads = cfg.feed_reads
        # Without feed_reads the controller's input does not depend on memory reads, so one fused LSTM call runs
        # the whole sequence (1.75x faster forward and backward than a loop of LSTMCell steps at B=16, L=50,
        # H=200). With it, the same LSTM's weights (inputs: image, label, then the previous reads) are stepped.
        self.lstm = nn.LSTM(features + n_way + (read if cfg.feed_reads else 0), cfg.hidden, batch_first=True)
        self.register_load_state_dict_pre_hook(_rename_lstm_cell_keys)  # checkpoints of the LSTMCell version
        self.memory = (
            LRUMemory(
                cfg.hidden,
                cfg.memory_slots,
                cfg.memory_width,
                cfg.read_heads,
                cfg.usage_decay,
                cfg.least_used,
                cfg.key_strength,
                cfg.read_before_write,
            )
            if cfg.memory
            else None
        )
        self.head = nn.Linear(cfg.hidden + read, n_way)

    def forward(self, x: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, N)`` for images ``x`` ``(B, L, C, H, W)`` shown with label one-hots ``(B, L, N)``."""
        b, length = x.shape[:2]
        z = self.encoder(x.flatten(0, 1).contiguous(memory_format=torch.channels_last)).view(b, length, -1)
        inputs = torch.cat([z, shown], dim=-1)
        if self.memory is not None and self.feed_reads:
            return self.head(self._with_reads_fed_back(inputs))
        hs = self.lstm(inputs)[0]  # (B, L, H); causal: step t sees inputs 0..t only
        if self.memory is not None:
            state, reads = self.memory.initial(b, x.device), []
            for t in range(length):
                read, state = self.memory.step(hs[:, t], state)
                reads.append(read)
            hs = torch.cat([hs, torch.stack(reads, dim=1)], dim=-1)
        return self.head(hs)

    def _with_reads_fed_back(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(B, L, H + reads)``: the controller stepped with input ``[x_t, label_{t-1}, r_{t-1}]`` (``r_{-1} = 0``),
        each step's hidden state concatenated with that step's reads."""
        assert self.memory is not None
        b, length, given = inputs.shape
        w_ih, w_hh = self.lstm.weight_ih_l0, self.lstm.weight_hh_l0
        # the image and label part of every step's gates in one matmul; reads and the hidden state step by step
        pre = F.linear(inputs, w_ih[:, :given], self.lstm.bias_ih_l0 + self.lstm.bias_hh_l0)  # (B, L, 4H)
        w_read = w_ih[:, given:]
        h = c = inputs.new_zeros(b, self.lstm.hidden_size)
        read = inputs.new_zeros(b, w_read.shape[1])
        state, outs = self.memory.initial(b, inputs.device), []
        for t in range(length):
            gates = pre[:, t] + F.linear(read, w_read) + F.linear(h, w_hh)
            i, f, g, o = gates.chunk(4, dim=-1)  # nn.LSTM's gate order
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            read, state = self.memory.step(h, state)
            outs.append(torch.cat([h, read], dim=-1))
        return torch.stack(outs, dim=1)


def _rename_lstm_cell_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load a checkpoint saved when the controller was an ``nn.LSTMCell`` (``lstm.weight_ih``, ...): the same
    parameters, named ``lstm.weight_ih_l0``, ... in ``nn.LSTM``."""
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        old = f"{prefix}lstm.{name}"
        if old in state_dict:
            state_dict[f"{old}_l0"] = state_dict.pop(old)


def sequence(ep: Episode, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, shown labels one-hot, target labels, mask of scored steps) for an order-shuffled episode."""
    n = ep.n_way
    if mode == "offset":
        x = torch.cat([ep.support_x, ep.query_x], dim=1)  # (T, L, C, H, W): all instances, in shuffled order
        y = torch.cat([ep.support_y, ep.query_y], dim=1)
        shown = F.pad(F.one_hot(y, n).float(), (0, 0, 1, 0))[
            :, :-1
        ]  # label of the previous step; zeros first
        return x, shown, y, torch.ones_like(y, dtype=torch.bool)
    x = torch.cat([ep.support_x, ep.query_x], dim=1)
    y = torch.cat([ep.support_y, ep.query_y], dim=1)
    shown = torch.cat(
        [F.one_hot(ep.support_y, n).float(), ep.support_x.new_zeros(*ep.query_y.shape, n)], dim=1
    )
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[:, ep.support_y.shape[1] :] = True
    return x, shown, y, mask


def instance_numbers(y: torch.Tensor, n_way: int) -> torch.Tensor:
    """``(T, L)``: 1 for a class's first appearance in the sequence, 2 for its second, ..."""
    onehot = F.one_hot(y, n_way)
    return (onehot.cumsum(1) * onehot).sum(-1)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Model, training loss and evaluation for a MANN-style run."""
    cfg: Config = run.params
    n = run.task.ways
    if run.task.train_ways not in (None, n):
        raise ConfigError(
            "task.train_ways", "the label input has task.ways entries: train_ways must equal ways"
        )
    model = MANN(cfg, n, run.task.image_size).to(device, memory_format=torch.channels_last)
    train = ShuffledSampler(make_sampler(run.task, "train", run.seed, root), run.seed + 1)
    evals = {
        p: ShuffledSampler(make_sampler(run.task, p, run.eval.seed, root), run.eval.seed + 1)
        for p in ("val", "test")
    }

    def scored(ep: Episode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, shown, y, mask = sequence(ep, cfg.mode)
        return model(x, shown), y, mask, instance_numbers(y, n)

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        logits, y, mask, _ = scored(shard(train.sample(step, run.train.meta_batch)).to(device))
        correct = (logits.argmax(-1) == y).float()
        return F.cross_entropy(logits[mask], y[mask]), {"train/acc": correct[mask].mean().item()}

    def evaluate(part: str, episodes: int) -> dict[str, float]:
        def per_task(ep: Episode) -> torch.Tensor:  # (T, 1 + instances): accuracy, then by instance number
            logits, y, mask, inst = scored(ep)
            correct = torch.where(mask, (logits.argmax(-1) == y).float(), torch.nan)
            cols = [correct.nanmean(1)]
            for i in REPORTED_INSTANCES:
                sel = inst == i
                cols.append(torch.where(sel, correct, 0.0).nansum(1) / (sel & mask).sum(1))  # NaN if absent
            return torch.stack(cols, dim=1)

        model.eval()
        ests = evaluate_episode_columns(per_task, evals[part], episodes, run.eval.batch, device)
        out = {f"{part}/acc": ests[0].mean, f"{part}/acc_ci95": ests[0].ci95}
        for i, est in zip(REPORTED_INSTANCES, ests[1:], strict=True):
            if est.n:
                out[f"{part}/acc_inst{i}"] = est.mean
                out[f"{part}/acc_inst{i}_ci95"] = est.ci95
        return out

    return Learner(model, loss, evaluate)
