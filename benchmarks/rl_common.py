"""Shared plumbing of the RL benchmarks: seed grids, resumable run directories, aggregation over seeds.

A benchmark configuration is one method on one task with one seed (``future-n15-s0``); a group name
(``future-n15``) stands for all its seeds. Each configuration trains in its own run directory, which remembers
the settings it was started with, so rerunning the same command resumes it and a changed budget is refused
instead of silently mixing two runs. Per-seed records carry the seed in the metric name (``success_s0``) so
they survive merging; :func:`aggregate` turns the per-seed records found in the results file into one record
(mean over seeds with a Student-t 95% CI, the per-seed values and their count).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from benchmarks.common import PROTOCOL, current_label, note_no_curve, record
from metalab.experiment import RunConfig, algorithm, run_config_from_dict, write_run_config
from metalab.stats import seed_interval
from metalab.train.loop import CHECKPOINT, FitResult, Learner, fit
from metalab.utils import atomic_path, seed_everything

SETTINGS = "bench.json"
SEED_CI = "student-t over seeds"
"""What an aggregate record's ``ci95`` is (``ci95_kind``); per-seed records' intervals are over episodes."""


def expand(selected: list[str] | None, groups: dict[str, list[str]], default: list[str]) -> list[str]:
    """Configuration names for ``--only`` selections (names or group names), in order, without repeats."""
    names: list[str] = []
    for choice in selected or default:
        for name in groups.get(choice, [choice]):
            if name not in names:
                names.append(name)
    return names


def start_run_dir(
    run_dir: Path, settings: dict[str, Any], normalize: Callable[[dict], dict] | None = None
) -> bool:
    """Create ``run_dir`` for ``settings``, or check that it was started with the same ones.

    Returns whether the directory already held a run (to resume). Settings are compared after a JSON round
    trip, so tuples and lists compare equal, and after ``normalize`` of the saved ones (e.g. a run config parsed
    again, so an option added since, at its default, is no change).
    """
    path = run_dir / SETTINGS
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        saved = json.loads(path.read_text())
        if normalize is not None:
            saved = json.loads(json.dumps(normalize(saved)))
        if saved != settings:
            changed = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
            raise SystemExit(
                f"{run_dir} was started with different settings ({', '.join(changed)}); rerun with the same "
                f"flags to resume it, or delete the directory to start over"
            )
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
    return False


def train(run: RunConfig, run_dir: Path) -> tuple[Learner, FitResult]:
    """Build ``run``'s learner and fit it in ``run_dir``, resuming its checkpoint when there is one.

    A finished run is not trained again: the learner comes back with the final weights and the recorded
    training time, ready to be evaluated.
    """
    same = start_run_dir(
        run_dir, run.to_yaml_dict(), lambda saved: run_config_from_dict(saved).to_yaml_dict()
    )
    if not same:  # config.yaml too, for `metalab eval <run_dir>`
        write_run_config(run, run_dir)
    seed_everything(run.seed)
    learner = algorithm(run.algo).build(run, Path("unused"), torch.device(run.train.device))
    result = fit(learner, run.train, run_dir, resume=(run_dir / CHECKPOINT).is_file())
    if result.interrupted:
        raise SystemExit(f"{run_dir}: interrupted at step {result.step}; rerun the same command to resume")
    learner.model.eval()
    return learner, result


def seed_metric(metric: str, seed: int) -> str:
    """Metric name of one seed's record: ``success`` -> ``success_s0``."""
    return f"{metric}_s{seed}"


def aggregate(
    records: list[dict[str, Any]],
    benchmark: str,
    task: str,
    method: str,
    metric: str,
    unit: str,
    **extra: Any,
) -> dict[str, Any] | None:
    """One record for ``metric`` over the seeds of ``task``/``method`` found in ``records`` (None if none).

    Only per-seed records of this run's label (:func:`benchmarks.common.current_label`) and evaluation protocol
    (:data:`benchmarks.common.PROTOCOL`) with the same ``steps`` budget as the newest one count. The value is the mean over seeds with a Student-t 95% CI
    (:func:`metalab.stats.seed_interval`; null for one seed); ``per_seed`` and ``n`` say what it is the mean of.
    If some seed has a null value (e.g. never reached a threshold), the value is null and ``reached`` says how
    many seeds have one, with ``mean_of_reached`` their mean.
    """
    pattern = re.compile(rf"{re.escape(metric)}_s(\d+)")
    label = current_label()
    mine = [
        r
        for r in records
        if r["task"] == task
        and r["method"] == method
        and r.get("label") == label
        and r.get("protocol", 1) == PROTOCOL
        and pattern.fullmatch(r["metric"])
    ]
    if not mine:
        return None
    steps = mine[-1]["steps"]
    mine = sorted(
        (r for r in mine if r["steps"] == steps), key=lambda r: int(pattern.fullmatch(r["metric"])[1])
    )
    seeds = [int(pattern.fullmatch(r["metric"])[1]) for r in mine]
    values = [r["value"] for r in mine]
    known = [v for v in values if v is not None]
    seconds = [r["seconds"] for r in mine if r["seconds"] is not None]
    info: dict[str, Any] = {"seeds": seeds, "per_seed": values, "n": len(values), "ci95_kind": SEED_CI}
    if len(known) == len(values):
        est = seed_interval(known)
        value, ci95 = est.mean, est.ci95
    else:
        value, ci95 = None, None
        info["reached"] = f"{len(known)}/{len(values)}"
        info["mean_of_reached"] = sum(known) / len(known) if known else None
    return record(
        benchmark,
        task,
        method,
        metric,
        value,
        ci95=ci95,
        unit=unit,
        steps=steps,
        seconds=sum(seconds) / len(seconds) if seconds else None,
        **info,
        **extra,
    )


def recorded_curves(
    results: Path, name: str, older_too: bool = False
) -> dict[tuple[str, str, int], list[list[float]]]:
    """``{(task, method, seed): curve}`` of the main (unlabelled) per-seed records in ``<results>/<name>.json``
    that keep their learning curve, so a figure can be redrawn once the run directories are gone.

    Only val curves count: records that name their ``curve_metric`` (all since the val protocol) and, with
    ``older_too`` (for a benchmark whose periodic evaluations were val ones before too), older records; where a
    seed has both, the newer kind wins."""
    path = results / f"{name}.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    kept = [
        r
        for r in records
        if "curve" in r and "seed" in r and r.get("label") is None and ("curve_metric" in r or older_too)
    ]
    kept.sort(key=lambda r: "curve_metric" in r)  # records naming their curve metric last: they win
    return {(r["task"], r["method"], r["seed"]): r["curve"] for r in kept}


def env_steps_to(curve: list[list[float]], level: float, every: float | None = None) -> float | None:
    """Env steps at the first evaluation of a recorded ``[trainer step, env steps, value]`` curve whose value
    reaches ``level`` (None if none does). With ``every``, only evaluations at trainer steps that are multiples of
    it count: curves evaluated on different grids then compare at the same evaluations, and the one evaluated
    more often gets no more chances to cross the level by evaluation noise. A value within 1e-9 below ``level``
    reaches it (a mean of returns that sum to exactly ``level`` may round below it)."""
    hits = (
        e
        for step, e, value in sorted(curve)
        if value >= level - 1e-9 and (every is None or step % every == 0)
    )
    return next(hits, None)


def plot_seeds(
    ax: Any,
    curves: list[dict[float, float]],
    label: str,
    x_of: dict[float, float] | None = None,
    color: str | None = None,
) -> bool:
    """Draw the mean over seeds of ``{x: y}`` curves, with a band from min to max, at the x values every seed has
    reached so far (drawn at ``x_of[x]`` when given; in ``color``, e.g. one per method across panels); returns
    whether anything was drawn."""
    curves = [c for c in curves if c]
    if not curves:
        return False
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    y = np.array([[c[x] for x in xs] for c in curves])  # (seeds, points)
    xs = [x_of[x] for x in xs] if x_of is not None else xs
    seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
    (line,) = ax.plot(xs, y.mean(0), label=f"{label} ({seeds})", color=color)
    ax.fill_between(xs, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
    return True


def save_figure(fig: Any, drawn: bool, results: Path, name: str) -> Path | None:
    """Save ``fig`` as ``<results>/<name>.png`` if anything was ``drawn``; the figure is closed either way."""
    if not drawn:
        plt.close(fig)
        return None
    for ax in fig.axes:
        if not ax.collections:  # plot_seeds draws a band with every curve
            note_no_curve(ax)
    fig.tight_layout()
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
