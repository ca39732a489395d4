"""The machine's measured convolution peak, and conv FLOPs counted (for :mod:`benchmarks.throughput`).

``python -m benchmarks.throughput --only peak`` records it. One Conv-4-like layer (64 -> 64 filters, 3x3, padding 1) on a
large batch of 28x28 maps (``--peak-batch`` images, default 256) and of 14x14 maps (4x as many, the same work),
channels-last and contiguous in float32, and channels-last under bfloat16 autocast, forward and backward (the
input requires grad, so both the input and the weight gradients are computed), at 1 and 2 threads. FLOPs are
analytic: ``2 * C_in * C_out * k * k * H_out * W_out`` per image forward (a multiply-add counts 2), backward
twice that, so a step is 3x the forward. The float32 peak at a thread count (``conv-peak-<n>thread``) is the
best of its four float32 layouts, the bfloat16 peak (``conv-peak-bf16-<n>thread``) the better of its two
(GFLOP/s; records per layout).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PEAK_CHANNELS = 64
PEAK_SIDES = (28, 14)
FORMATS = {"channels-last": torch.channels_last, "contiguous": torch.contiguous_format}
PEAK_LAYOUTS = (*FORMATS, "bf16-channels-last")


def conv_forward_flops(c_in: int, c_out: int, kernel: int, out_h: int, out_w: int, groups: int = 1) -> int:
    """FLOPs of one image through a 2-D convolution, forward: ``2 * (C_in / groups) * C_out * k * k * H_out *
    W_out`` (each multiply-add counts 2; the bias is left out)."""
    return 2 * (c_in // groups) * c_out * kernel * kernel * out_h * out_w


def counted_conv_flops(step: Callable[[], Any]) -> int:
    """Convolution FLOPs (forward and backward aten ops) that one call of ``step`` runs, counted by
    ``torch.utils.flop_counter``."""
    with FlopCounterMode(display=False) as counter:
        step()
    counts = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in counts.items() if "convolution" in str(op)))


@dataclass(frozen=True)
class Peak:
    """One measurement of the conv peak: a layout, a thread count, and the seconds of each timed step."""

    side: int
    memory_format: str
    batch: int
    threads: int
    seconds: list[float]

    @property
    def flops(self) -> int:
        """Forward and backward FLOPs of one step (backward = 2x forward)."""
        c = PEAK_CHANNELS
        return 3 * self.batch * conv_forward_flops(c, c, 3, self.side, self.side)

    @property
    def gflops(self) -> float:
        return self.flops / statistics.median(self.seconds) / 1e9


def measure_peak(side: int, batch: int, layout: str, threads: int, repeats: tuple[int, int]) -> Peak:
    """Time forward and backward of a 64 -> 64 3x3 conv on ``batch`` maps of ``side`` x ``side`` in ``layout``
    (:data:`PEAK_LAYOUTS`); ``repeats`` = (warmup, timed) steps."""
    fmt, bf16 = layout.removeprefix("bf16-"), layout.startswith("bf16-")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    conv = nn.Conv2d(PEAK_CHANNELS, PEAK_CHANNELS, 3, padding=1).to(memory_format=FORMATS[fmt])
    x = torch.randn(batch, PEAK_CHANNELS, side, side).contiguous(memory_format=FORMATS[fmt])
    x.requires_grad_(True)
    seconds = []
    for r in range(sum(repeats)):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)  # (B, 64, side, side)
        out.backward(torch.ones_like(out))
        if r >= repeats[0]:
            seconds.append(time.perf_counter() - start)
    return Peak(side, layout, batch, threads, seconds)


PEAKS: dict[int, list[Peak]] = {}
"""Peak measurements of this process by thread count: each configuration uses the same run's peak."""


def peaks_at(threads: int, args: argparse.Namespace) -> list[Peak]:
    """Every peak layout at ``threads`` (measured on first use in this process)."""
    if threads not in PEAKS:
        PEAKS[threads] = [
            measure_peak(side, args.peak_batch * (28 // side) ** 2, fmt, threads, (args.warmup, args.steps))
            for side in PEAK_SIDES
            for fmt in PEAK_LAYOUTS
        ]
    return PEAKS[threads]


def best_peak(threads: int, args: argparse.Namespace, bf16: bool = False) -> Peak:
    """The fastest float32 (or, with ``bf16``, bfloat16-autocast) peak layout at ``threads``."""
    return max((p for p in peaks_at(threads, args) if p.memory_format.startswith("bf16") == bf16),
               key=lambda p: p.gflops)  # fmt: skip
