"""Shared plumbing of benchmark scripts: result records, merging into the results file, CLI selection."""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from metalab.utils import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """The current git commit (with ``+dirty`` when the tree has uncommitted changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device | str = "cpu") -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU), so that a host clock read after it times the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_kind(device: str | None) -> str:
    """``cpu`` for any CPU description of :func:`device_name` (core and thread counts aside), else the GPU's name."""
    return "cpu" if device is None or device.startswith("cpu") else device


def record(
    benchmark: str,
    task: str,
    method: str,
    metric: str,
    value: float,
    *,
    unit: str,
    ci95: float | None = None,
    steps: int | None = None,
    seconds: float | None = None,
    device: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result record in the agreed shape (NaN becomes null)."""

    def clean(v: float | None) -> float | None:
        return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

    rec = {
        "benchmark": benchmark,
        "task": task,
        "method": method,
        "metric": metric,
        "value": clean(value),
        "ci95": clean(ci95),
        "unit": unit,
        "steps": steps,
        "seconds": clean(seconds),
        "device": device or device_name(),
        "torch": torch.__version__,
        "commit": commit(),
    }
    rec.update(extra)
    return rec


def note_no_curve(ax: Any) -> None:
    """Write in an empty plot panel that no curve was recorded (e.g. runs from before records kept their curves,
    whose run directories are gone), so a blank box is not mistaken for a flat line."""
    ax.text(0.5, 0.5, "no curve recorded\n(final numbers in the JSON)", ha="center", va="center",
            transform=ax.transAxes, color="gray")  # fmt: skip


def merge_results(name: str, records: list[dict[str, Any]], results: Path = RESULTS) -> Path:
    """Write ``records`` into ``<results>/<name>.json``, replacing older records of the same task, method,
    metric and kind of device (a GPU run keeps the CPU records beside it, and the other way round).

    An exclusive lock on ``<results>/.<name>.lock`` serialises the read-merge-write of benchmark processes
    running side by side, so none loses another's records."""
    path = results / f"{name}.json"
    key = lambda r: (r["task"], r["method"], r["metric"], device_kind(r.get("device")))  # noqa: E731
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else []
        fresh = {key(r) for r in records}
        merged = [r for r in old if key(r) not in fresh] + records
        merged.sort(key=key)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(merged, indent=2) + "\n")
    return path


def parser(description: str, configs: list[str], default: list[str] | None = None) -> argparse.ArgumentParser:
    """``--only`` (any of ``configs``; without it, ``default`` or else all) and ``--threads``."""
    p = argparse.ArgumentParser(description=description)
    chosen = (
        f"all of {', '.join(configs)}"
        if default is None
        else f"{', '.join(default)}; also {', '.join(c for c in configs if c not in default)}"
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=configs,
        metavar="CONFIG",
        help=f"run only these configurations (default: {chosen})",
    )
    p.add_argument(
        "--threads", type=int, help="torch threads (default: torch's; 1 to run two configs side by side)"
    )
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a benchmark's arguments (``argv``, default the command line) and apply ``--threads``."""
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
