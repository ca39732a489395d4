"""Mixed precision: the context ``train.autocast`` runs a learner's forward passes in, and whether this machine
computes bfloat16 natively (where it does not, bfloat16 is emulated and slower than float32)."""

from __future__ import annotations

from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of a CPU that computes bfloat16 natively (AVX-512 BF16, AMX)."""


def autocast(setting: str, device: torch.device) -> torch.autocast:
    """The context of ``train.autocast`` = ``setting`` on ``device``: bfloat16 autocast for ``bf16``, disabled
    (a no-op) for ``none``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting == "bf16")


def cpu_bf16_flags() -> list[str] | None:
    """The flags among :data:`BF16_FLAGS` this CPU has (empty: bfloat16 is emulated), or None where
    /proc/cpuinfo cannot be read (not Linux)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return [f for f in BF16_FLAGS if f in words]


def emulated_bf16(device: torch.device) -> str | None:
    """Why bfloat16 would be emulated on ``device`` (a CPU without the flags, a GPU without bfloat16 units), or
    None where it is native or cannot be told."""
    if device.type == "cpu" and cpu_bf16_flags() == []:
        return f"a CPU without native bfloat16 (no {' or '.join(BF16_FLAGS)} in /proc/cpuinfo)"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"a GPU without native bfloat16 ({torch.cuda.get_device_name(device)})"
    return None
