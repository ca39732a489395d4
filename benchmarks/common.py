"""Shared plumbing of benchmark scripts: result records, merging into the results file, CLI selection, provenance.

Provenance: a benchmark refuses to start from a tree with uncommitted changes to tracked files (its records could
not be reproduced from their ``commit``) unless ``--allow-dirty`` is given; then its records say ``"dirty": true``.
``--label NAME`` names a variant run: its records carry ``"label": NAME``, which is part of the key
:func:`merge_results` replaces records by, so a variant never replaces the main record. Every record says the
evaluation ``protocol`` it was made under (:data:`PROTOCOL`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metalab.utils import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"
PROTOCOL = 2
"""The evaluation protocol records are made under: 2 since issue 24 (training evaluates only the val part and
selects on val or training data; the test part is evaluated once, after training). Records without the field
predate it (protocol 1: periodic evaluations, and some choices, on test data)."""


OUTPUTS = "benchmarks/results/"
"""What benchmarks write: changes there are results, not code, so they never make a tree dirty (benchmarks
running side by side in one checkout would otherwise mark each other's records)."""


def changed_code(porcelain: str) -> list[str]:
    """The changed tracked paths of ``git status --porcelain`` output, outside :data:`OUTPUTS`."""
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in porcelain.splitlines() if line.strip()]
    return [p for p in paths if not p.startswith(OUTPUTS)]


def commit() -> str:
    """The current git commit (with ``+dirty`` when tracked code has uncommitted changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return sha.stdout.strip() + ("+dirty" if changed_code(status.stdout) else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def is_dirty(sha: str) -> bool:
    """Whether a :func:`commit` string says the tree had uncommitted changes to tracked files."""
    return sha.endswith("+dirty")


@dataclass
class Provenance:
    """What the command line said about this process's records (set by :func:`check_provenance`)."""

    label: str | None = None
    """``--label``: the variant these records belong to (None: the main records)."""


PROVENANCE = Provenance()
"""This process's provenance settings; :func:`record` stamps the label on every record."""

DIRTY_REFUSAL = (
    "refusing to benchmark from a tree with uncommitted changes ({sha}): its records could not be reproduced "
    'from their commit; commit first, or pass --allow-dirty to record them marked "dirty": true'
)


def add_provenance_args(p: argparse.ArgumentParser) -> None:
    """``--allow-dirty`` and ``--label`` (every benchmark's parser; :func:`parser` adds them itself)."""
    p.add_argument(
        "--allow-dirty",
        action="store_true",
        help='record even with uncommitted changes to tracked files (records get "dirty": true); '
        "without it a dirty tree is refused before anything runs",
    )
    p.add_argument(
        "--label",
        metavar="NAME",
        help="name a variant run: its records carry label NAME and never replace the main records (the label "
        "is part of the merge key); it trains in <runs-dir>/NAME and leaves the figures alone",
    )


def add_set_arg(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable, into ``args.overrides``): config overrides of every configuration."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of every selected configuration, e.g. --set train.eval_episodes=50 "
        "(repeatable)",
    )


def check_provenance(args: argparse.Namespace) -> None:
    """Refuse a dirty tree (one line, before any training) unless ``--allow-dirty``; remember the label.

    With a label, ``args.runs_dir`` (where a script has one) becomes ``<runs-dir>/<label>``, so a variant never
    resumes, or is refused by, the main run's directory."""
    sha = commit()
    if is_dirty(sha) and not args.allow_dirty:
        raise SystemExit(DIRTY_REFUSAL.format(sha=sha))
    if args.label is not None and (not args.label or "/" in args.label or args.label.startswith(".")):
        raise SystemExit(f"--label must be a plain name (no '/', not starting with '.'), got {args.label!r}")
    PROVENANCE.label = args.label
    if args.label is not None and isinstance(getattr(args, "runs_dir", None), Path):
        args.runs_dir = args.runs_dir / args.label


def current_label() -> str | None:
    """The ``--label`` of this process's records (None: the main records)."""
    return PROVENANCE.label


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
    """One result record in the agreed shape (NaN becomes null).

    A record made from a tree with uncommitted changes says ``"dirty": true`` (its ``commit`` ends in ``+dirty``);
    one of a labelled run (``--label``) carries ``"label"``."""

    def clean(v: float | None) -> float | None:
        return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

    sha = commit()
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
        "commit": sha,
        "protocol": PROTOCOL,
    }
    if is_dirty(sha):
        rec["dirty"] = True
    if PROVENANCE.label is not None:
        rec["label"] = PROVENANCE.label
    rec.update(extra)
    return rec


def note_no_curve(ax: Any) -> None:
    """Write in an empty plot panel that no curve was recorded (e.g. runs from before records kept their curves,
    whose run directories are gone), so a blank box is not mistaken for a flat line."""
    ax.text(0.5, 0.5, "no curve recorded\n(final numbers in the JSON)", ha="center", va="center",
            transform=ax.transAxes, color="gray")  # fmt: skip


def merge_key(r: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """What a newer record replaces an older one by: task, method, metric, kind of device and label (``""`` for
    the main records, so a labelled variant never replaces them)."""
    return r["task"], r["method"], r["metric"], device_kind(r.get("device")), r.get("label") or ""


def merge_results(name: str, records: list[dict[str, Any]], results: Path = RESULTS) -> Path:
    """Write ``records`` into ``<results>/<name>.json``, replacing older records of the same task, method,
    metric, kind of device and label (a GPU run keeps the CPU records beside it, and the other way round; a
    labelled variant keeps the main records beside it).

    An exclusive lock on ``<results>/.<name>.lock`` serialises the read-merge-write of benchmark processes
    running side by side, so none loses another's records."""
    path = results / f"{name}.json"
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else []
        fresh = {merge_key(r) for r in records}
        merged = [r for r in old if merge_key(r) not in fresh] + records
        merged.sort(key=merge_key)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(merged, indent=2) + "\n")
    return path


def parser(description: str, configs: list[str], default: list[str] | None = None) -> argparse.ArgumentParser:
    """``--only`` (any of ``configs``; without it, ``default`` or else all), ``--threads``, ``--allow-dirty`` and
    ``--label``."""
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
    add_provenance_args(p)
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a benchmark's arguments (``argv``, default the command line), check provenance
    (:func:`check_provenance`: a dirty tree is refused here, before any training) and apply ``--threads``."""
    args = p.parse_args(argv)
    # Progress and the trainer's messages: plain lines in a log file (nohup), a bar on a terminal.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    check_provenance(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
