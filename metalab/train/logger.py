"""Metrics to a long-format CSV (``step,key,value``) and TensorBoard, with grouped keys (``train/``, ``eval/``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

CSV_NAME = "metrics.csv"


class MetricLogger:
    """Appends metrics; on resume from step ``s`` it first drops rows logged after ``s`` by the lost run."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / CSV_NAME
        if resume_step is not None and self.path.is_file():
            rows = [r for r in read_metrics(self.path) if r[0] <= resume_step]
            with open(self.path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "key", "value"])
                w.writerows(rows)
        new = not self.path.is_file()
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "key", "value"])
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
    """Rows of a metrics CSV as ``(step, key, value)``."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        return [(int(s), k, float(v)) for s, k, v in reader]
