"""Metrics to a long-format CSV (``step,key,value``) and TensorBoard, with grouped keys (``train/``, ``val/``,
``test/``)."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from metalab.errors import CheckpointError
from metalab.utils import atomic_path

log = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"
HEADER = ["step", "key", "value"]


class MetricLogger:
    """Appends metrics; on resume from step ``s`` it first drops rows logged after ``s`` by the lost run.

    A process killed mid-write can leave a torn last row (``15000,train/lo``): opening the log drops it, with a
    warning, before appending, so the next row does not run into it.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / CSV_NAME
        if self.path.is_file():
            rows, torn = _read_rows(self.path)
            if torn is not None:
                log.warning("%s: dropped a torn last row %r (a run stopped mid-write)", self.path, torn)
            if resume_step is not None or torn is not None:
                kept = [r for r in rows if resume_step is None or r[0] <= resume_step]
                with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(HEADER)
                    w.writerows((s, k, repr(v)) for s, k, v in kept)
        new = not self.path.is_file()
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(HEADER)
        self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            value = float(value)
            self._csv.writerow([step, key, repr(value)])
            if math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def read_metrics(path: Path) -> list[tuple[int, str, float]]:
    """Rows of a metrics CSV as ``(step, key, value)``, without a torn last row (see :class:`MetricLogger`)."""
    rows, torn = _read_rows(path)
    if torn is not None:
        log.debug("%s: skipped a torn last row %r", path, torn)
    return rows


def _read_rows(path: Path) -> tuple[list[tuple[int, str, float]], str | None]:
    """The parsed rows and the text of a torn last row (or None). A bad row elsewhere is a CheckpointError: the
    log only ever appends whole rows, so only the last one can be cut short."""
    text = path.read_text()
    lines = text.splitlines()
    rows: list[tuple[int, str, float]] = []
    torn: str | None = None
    for number, fields in enumerate(csv.reader(lines), start=1):
        if number == 1 and fields == HEADER:
            continue
        row = _parse(fields)
        last = number == len(lines)
        if row is not None and not (last and not text.endswith("\n")):
            rows.append(row)
        elif last:
            torn = lines[-1]
        else:
            raise CheckpointError(f"{path} line {number} is not a step,key,value row: {lines[number - 1]!r}")
    return rows, torn


def _parse(fields: list[str]) -> tuple[int, str, float] | None:
    """``["15000", "train/loss", "0.12"]`` -> ``(15000, "train/loss", 0.12)``; None for a malformed row."""
    if len(fields) != 3:
        return None
    try:
        return int(fields[0]), fields[1], float(fields[2])
    except ValueError:
        return None
