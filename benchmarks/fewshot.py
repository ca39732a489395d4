"""Shared steps of the few-shot (Omniglot) benchmark scripts: train a configuration for a time budget in a
resumable run directory, turn a test evaluation into an accuracy record, and draw val accuracy (the periodic
evaluations) against training time from the run directories.

A configuration trains ``configs/<name>.yaml`` (plus overrides) in ``<runs>/<config>`` for ``--minutes`` of
training time (counted across resumes: ``train.max_minutes``) or ``--steps``, whichever comes first, and
resumes that directory when it already holds a checkpoint, so a budget can be spread over several sittings.
Training evaluates the val part only (``val/acc``: the learning curve); the test part is evaluated once, after
training (``test/acc``: the record's value).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from benchmarks.common import RESULTS, add_set_arg, device_name, note_no_curve, record
from metalab.data.root import data_root
from metalab.experiment import RunConfig, algorithm, load_run_config, write_run_config
from metalab.train.logger import read_metrics
from metalab.train.loop import CHECKPOINT, FitResult, Learner, fit
from metalab.utils import resolve_device, seed_everything

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
RUNS_ROOT = Path("runs/bench")


def config_path(stem: str) -> Path:
    """``configs/<stem>.yaml`` of this repository, wherever the script is run from."""
    return CONFIGS_DIR / f"{stem}.yaml"


class Trained(NamedTuple):
    """A configuration after :func:`train`: its learner (final weights, eval mode), fit result, config, device."""

    learner: Learner
    fitted: FitResult
    run: RunConfig
    device: torch.device
    run_dir: Path


def budget_overrides(minutes: float, steps: int | None, episodes: int) -> list[str]:
    """Config overrides for a benchmark budget: training minutes, optional steps, test episodes."""
    overrides = [f"train.max_minutes={minutes}", f"eval.episodes={episodes}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return overrides


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The budget overrides of :func:`add_budget_args`' flags, then the ``--set`` ones of :func:`add_run_args`."""
    return [*budget_overrides(args.minutes, args.steps, args.test_episodes), *getattr(args, "overrides", [])]


def build(config: str | Path, overrides: list[str]) -> tuple[Learner, RunConfig, torch.device]:
    """Load ``config`` with ``overrides``, seed, and build its learner on the data root."""
    run = load_run_config(config, overrides)
    device = resolve_device(run.train.device)
    seed_everything(run.seed)
    return algorithm(run.algo).build(run, data_root(), device), run, device


def train(config: str | Path, overrides: list[str], run_dir: Path) -> Trained:
    """Train ``config`` in ``run_dir``, resuming its checkpoint when there is one.

    The resolved config goes to ``run_dir/config.yaml`` (so ``metalab eval <run_dir>`` works). A finished run
    is not trained again: its final weights and recorded training time come back, ready to be tested.
    """
    learner, run, device = build(config, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run, run_dir)
    fitted = fit(learner, run.train, run_dir, resume=(run_dir / CHECKPOINT).is_file())
    if fitted.interrupted:
        raise SystemExit(
            f"{run_dir.name}: interrupted at step {fitted.step}; rerun the same command to resume"
        )
    learner.model.eval()
    return Trained(learner, fitted, run, device, run_dir)


def accuracy_record(
    benchmark: str,
    task: str,
    method: str,
    trained: Trained,
    test: dict[str, float],
    *,
    key: str = "test/acc",
    metric: str = "test_accuracy",
    published: float | None = None,
    target: float | None = None,
    label: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The record of test accuracy ``test[key]`` (a fraction, with ``<key>_ci95`` when known) in percent.

    Steps, training seconds, budget and test episodes come from ``trained``; the learning curve is the val
    counterpart of ``key`` (``val/acc`` for ``test/acc``: ``curve_metric``). ``label`` names the configuration
    in the printed line only. A line is printed as well.
    """
    acc = 100 * test[key]
    ci = test.get(f"{key}_ci95")
    ci = None if ci is None else 100 * ci
    fitted, run = trained.fitted, trained.run
    shown = f"{acc:.2f} ± {ci:.2f}%" if ci is not None else f"{acc:.2f}%"
    print(
        f"{label or method} {metric}: {shown} after {fitted.step} steps, {fitted.seconds / 60:.1f} min "
        f"(published {published if published is not None else '-'}, target {target if target is not None else '-'})"
    )
    return record(
        benchmark,
        task,
        method,
        metric,
        acc,
        ci95=ci,
        unit="%",
        steps=fitted.step,
        seconds=fitted.seconds,
        device=device_name(trained.device),
        published=published,
        target=target,
        test_episodes=run.eval.episodes,
        budget_minutes=run.train.max_minutes,
        **curve_fields(trained.run_dir, key),
        metric_key=key,  # the evaluation's name of the recorded metric
        **extra,
        threads=torch.get_num_threads(),
    )


def curve_fields(run_dir: Path, key: str) -> dict[str, Any]:
    """The val learning curve of a ``val/`` or ``test/`` metric, so the figure can be redrawn from the record
    alone (none for the diagnostic ``train/`` and ``probe/`` evaluations)."""
    if not key.startswith(("val/", "test/")):
        return {}
    return {"curve": eval_curve(run_dir, val_key(key)), "curve_metric": val_key(key)}


def val_key(key: str) -> str:
    """The periodic (val) evaluation's name of a test metric: ``test/acc_inst2`` -> ``val/acc_inst2``."""
    part, sep, metric = key.partition("/")
    if not sep or part not in ("val", "test"):
        raise ValueError(f"expected a <part>/<metric> name, got {key!r}")
    return f"val/{metric}"


def eval_curve(run_dir: Path, key: str = "val/acc") -> list[list[float]]:
    """``[training minutes, accuracy (%)]`` at each periodic evaluation ``key`` logged in ``run_dir``."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    rows = read_metrics(path)
    acc = {s: v for s, k, v in rows if k == key}
    minutes = {s: v / 60 for s, k, v in rows if k == "time/train_seconds"}
    return [[minutes[s], 100 * acc[s]] for s in sorted(set(acc) & set(minutes))]


class Curve(NamedTuple):
    """One line of an accuracy-vs-time panel: the periodic (val) evaluations ``key`` logged in ``run_dir`` or,
    where that run directory is gone, the ``recorded`` ones (a record's ``curve``, see :func:`recorded_curve`)."""

    label: str
    run_dir: Path
    key: str = "val/acc"
    group: str | None = None
    """Curves of one group share a colour in every panel; default: the label up to its first ``-`` (the method
    of ``protonet-1shot``)."""
    recorded: list[list[float]] | None = None


def plot_accuracy(panels: dict[str, list[Curve]], out: Path, xlabel: str = "training minutes") -> Path | None:
    """Accuracy (%) of each curve's periodic evaluations vs training minutes, one panel per title, to ``out``.

    Curves with neither a ``metrics.csv`` nor recorded points are skipped; nothing is written (None) when none
    has any.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    groups = list(
        dict.fromkeys(c.group or c.label.split("-")[0] for curves in panels.values() for c in curves)
    )
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for ax, (title, curves) in zip(axes.flat, panels.items(), strict=True):
        for curve in curves:
            points = eval_curve(curve.run_dir, curve.key) or curve.recorded
            if not points:
                continue
            group = groups.index(curve.group or curve.label.split("-")[0])
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=palette[group % len(palette)],
                marker="o",
                ms=3,
                label=curve.label,
            )
            drawn = True
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            note_no_curve(ax)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def recorded_curve(rec: dict[str, Any]) -> list[list[float]] | None:
    """A record's learning curve if it is a val one (records name it in ``curve_metric`` since the val protocol;
    older records kept test curves, which a val figure leaves out)."""
    return rec.get("curve") if str(rec.get("curve_metric", "")).startswith("val/") else None


def add_budget_args(p: argparse.ArgumentParser, test_episodes: int, minutes: float = 60.0) -> None:
    """``--minutes``, ``--steps`` and ``--test-episodes``."""
    p.add_argument(
        "--minutes", type=float, default=minutes, help="training budget per configuration (minutes)"
    )
    p.add_argument("--steps", type=int, help="training steps per configuration (default: the config's)")
    p.add_argument(
        "--test-episodes", type=int, default=test_episodes, help="test episodes for the final estimate"
    )


def add_run_args(p: argparse.ArgumentParser, benchmark: str) -> None:
    """``--set KEY=VALUE`` (every configuration), ``--runs-dir`` and ``--results-dir``."""
    runs = RUNS_ROOT / benchmark
    add_set_arg(p)
    p.add_argument("--runs-dir", type=Path, default=runs, help=f"where run directories go (default {runs})")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help=f"where {benchmark}.json/.png go (default {RESULTS})",
    )
