"""Data-parallel meta-training on ``torch.distributed``: one meta-batch split over processes.

Launched by torchrun (``torchrun --nproc-per-node 2 -m metalab train CONFIG``, or ``metalab train --nproc 2
CONFIG``, which calls the same launcher), every process (rank) builds the same learner from the same seed and
runs the same training loop. At each step:

1. every rank draws the whole meta-batch ``step`` (samplers are pure functions of the step, so all ranks draw
   the same one) and keeps its contiguous share of the tasks (:func:`shard`): the union of the shares is
   exactly the single-process meta-batch;
2. every rank computes its tasks' mean loss and its gradient with the algorithm's own functional code
   (second-order MAML included: nothing in the algorithm knows about ranks);
3. an all-reduce averages the gradients (:func:`average_gradients`; gloo on CPU, NCCL on GPU), which, with
   equal shares, is the gradient of the mean over the whole meta-batch; every rank then takes the same
   optimizer step, so the weights stay identical without being sent.

Rank 0 alone logs, evaluates and writes checkpoints; a resume loads the same checkpoint on every rank. The
decisions that must agree (skip a non-finite update, stop on Ctrl-C or on ``train.max_minutes``) are taken
together (:func:`agree`), so no rank waits for a collective the others have left. BatchNorm running
statistics, which each rank updates from its own tasks, are averaged after each update
(:func:`average_buffers`): close to, not bit-equal with, the single process's sequence of updates (the
weights and gradients are unaffected: training uses batch statistics).

Outside torchrun (no ``WORLD_SIZE`` above 1 in the environment) nothing here does anything: :func:`world` is a
single rank and every function is the identity.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from metalab.data.episodes import Episode
from metalab.errors import ConfigError

TIMEOUT_MINUTES = 30
"""How long a rank waits in a collective for the others (rank 0 evaluating, a slow peer) before the job fails."""


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    """Rank within this machine (the GPU a rank uses)."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, evaluates and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()


def world() -> World:
    """The current job's :class:`World` (a single rank unless :func:`init` joined a process group)."""
    return _WORLD


def launched() -> bool:
    """Whether this process was started by torchrun for a job of more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA) and return the
    world; with no torchrun job, a single rank. On CUDA each rank takes GPU ``LOCAL_RANK``."""
    global _WORLD
    if not launched():
        return _WORLD
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
    _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(_WORLD.local_rank)
    return _WORLD


@contextlib.contextmanager
def joined(group_world: World) -> Iterator[World]:
    """Use ``group_world`` as the current world inside the block (for a process group set up by the caller,
    e.g. a test that spawns ranks itself)."""
    global _WORLD
    previous, _WORLD = _WORLD, group_world
    try:
        yield group_world
    finally:
        _WORLD = previous


def shard(ep: Episode) -> Episode:
    """This rank's contiguous share of a batched episode's tasks (all of them on a single rank)."""
    w = _WORLD
    if not w.distributed:
        return ep
    tasks = ep.tasks
    if tasks % w.size:
        raise ConfigError(
            "train.meta_batch",
            f"{tasks} tasks do not split evenly over {w.size} processes; use a multiple of {w.size}",
        )
    per = tasks // w.size
    part = slice(w.rank * per, (w.rank + 1) * per)
    return ep._replace(
        support_x=ep.support_x[part],
        support_y=ep.support_y[part],
        query_x=ep.query_x[part],
        query_y=ep.query_y[part],
    )


def check_meta_batch(meta_batch: int) -> None:
    """Refuse, before training, a meta-batch that does not split evenly over the ranks."""
    w = _WORLD
    if w.distributed and meta_batch % w.size:
        raise ConfigError(
            "train.meta_batch",
            f"{meta_batch} tasks do not split evenly over {w.size} processes; use a multiple of {w.size}",
        )


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the parameters' gradients over the ranks in place, in one flat all-reduce.

    A parameter with no gradient on every rank keeps none (the optimizer skips it, as on one rank); one that
    has a gradient on some ranks only counts zeros for the others."""
    if not _WORLD.distributed:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    if not live:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= _WORLD.size
    offset = 0
    for p, g in zip(live, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks in place."""
    if not _WORLD.distributed:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= _WORLD.size


def agree(flags: Sequence[bool], op: str = "any") -> list[bool]:
    """Decide together: each flag is true on every rank when it is true on ``any`` rank (or on ``all``)."""
    if not _WORLD.distributed:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "any" else dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def average_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The mean over the ranks of each metric (every rank logs the same keys: its own tasks' values)."""
    if not _WORLD.distributed or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / _WORLD.size).tolist(), strict=True))


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a run directory, a decision); pickled, so small objects only."""
    if not _WORLD.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    if _WORLD.distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a torchrun job)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()
