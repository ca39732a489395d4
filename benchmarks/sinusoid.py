"""Gradient-based meta-learners on sinusoid regression (Finn et al. 2017, sec. 5.1): test MSE after 1, 5 and 10
inner steps, against the published MAML and pretrained-baseline curves.

    python -m benchmarks.sinusoid                                  # every configuration
    python -m benchmarks.sinusoid --only maml-k10 --minutes 30     # one configuration

A configuration ``<method>-k<K>`` trains ``configs/<method>_sinusoid.yaml`` with K support and K query points
per task (MAML's setup) in ``runs/bench/sinusoid/<configuration>`` for ``--steps`` meta-steps or ``--minutes``
of training, whichever comes first, resuming that directory when it holds a checkpoint (so a budget can be
spread over sittings; ``metalab eval`` works on it too). ``pretrained`` is the paper's baseline: one MLP
regressed on the points of all tasks, fine-tuned per task with step 0.01 (K=5) or 0.02 (K=10) as in the paper.
Every model is then tested on the same 600 held-out tasks (100 query points each) after 1, 5 and 10 steps of
its own inner loop, with a 95% CI; records go to ``results/sinusoid.json``, and ``results/sinusoid_k<K>.png``
stacks each method's panel from ``results/sinusoid_fits/``: its fits (true curve, K points, predictions before
and after adaptation) on 4 test tasks.
Periodic evaluations during training use val tasks (``val/mse``; a seed of their own, never the test tasks').
Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from benchmarks.common import RESULTS, current_label, merge_results, parse_args, parser, record
from metalab.errors import NonFiniteLossError
from metalab.experiment import RunConfig, algorithm, load_run_config, write_run_config
from metalab.train.loop import CHECKPOINT, fit
from metalab.utils import resolve_device, seed_everything

METHODS = ("maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp", "cavia", "imaml", "pretrained")
SHOTS = (5, 10)
CONFIGS = [f"{m}-k{k}" for k in SHOTS for m in METHODS]
STEPS = (1, 5, 10)
RUNS = Path("runs/bench/sinusoid")
TEST_QUERIES = 100
# Finn et al. (2017) give these curves only as a plot (Fig. 3); the values are read off its k=5 panel as quoted in
# the issue that asked for this benchmark (approximate). Targets: this project's bar for MAML.
PUBLISHED = {"maml-k5": (0.67, 0.38, 0.35), "pretrained-k5": (2.41, 2.23, 2.19)}
TARGETS = {"maml-k5": (0.6, 0.38, 0.35)}


def run_config(name: str, overrides: list[str]) -> RunConfig:
    method, k = name.rsplit("-k", 1)
    config = "pretrain" if method == "pretrained" else method
    sets = [f"task.shots={k}", f"task.queries={k}", *overrides]
    if method == "pretrained":  # the paper's fine-tuning step for each K
        sets.append(f"pretrain.inner_lr={0.01 if k == '5' else 0.02}")
    return load_run_config(f"configs/{config}_sinusoid.yaml", sets)


def train_and_test(
    name: str, minutes: float, steps: int | None, tasks: int, runs: Path | None = None
) -> list[dict]:
    """Train configuration ``name`` (resuming its run directory in ``runs``, default :data:`RUNS`) and test it after
    each of ``STEPS`` inner steps."""
    overrides = [f"train.max_minutes={minutes}", f"eval.episodes={tasks}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    run = run_config(name, overrides)
    device = resolve_device(run.train.device)
    seed_everything(run.seed)
    learner = algorithm(run.algo).build(run, Path("."), device)
    run_dir = (runs or RUNS) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run, run_dir)
    try:
        result = fit(learner, run.train, run_dir, resume=(run_dir / CHECKPOINT).is_file())
    except NonFiniteLossError as e:
        print(f"{name}: {e}")
        return []
    if result.interrupted:
        raise SystemExit(f"{name}: interrupted at step {result.step}; rerun the same command to resume")
    learner.model.eval()
    learner.figures(run_dir)
    section = run.algo
    published, target = PUBLISHED.get(name), TARGETS.get(name)
    out = []
    for i, n in enumerate(STEPS):
        tester = algorithm(run.algo).build(
            run_config(name, [*overrides, f"task.queries={TEST_QUERIES}", f"{section}.eval_inner_steps={n}"]),
            Path("."),
            device,
        )
        tester.model.load_state_dict(learner.model.state_dict())
        tester.model.eval()
        test = tester.evaluate("test", tasks)
        mse, ci = test["test/mse"], test["test/mse_ci95"]
        shown = f"{mse:.3f} ± {ci:.3f}" if math.isfinite(mse) else "diverged"
        print(
            f"{name}: test MSE after {n} step{'s' * (n > 1)} = {shown} ({result.step} steps, "
            f"{result.seconds / 60:.1f} min; published {published[i] if published else '-'}, "
            f"target {target[i] if target else '-'})"
        )
        out.append(
            record(
                "sinusoid",
                f"sinusoid-k{run.task.shots}",
                name.rsplit("-k", 1)[0],
                f"test_mse_{n}_steps",
                mse,
                ci95=ci,
                unit="mse",
                steps=result.step,
                seconds=result.seconds,
                published=published[i] if published else None,
                target=target[i] if target else None,
                test_tasks=tasks,
                test_queries=TEST_QUERIES,
                metric_key="test/mse",
                budget_minutes=minutes,
                threads=torch.get_num_threads(),
            )
        )
    return out


def plot(k: int) -> Path | None:
    """Render each K-shot run's fit figure as a titled panel in ``results/sinusoid_fits/<configuration>.png``
    (a panel stays when later runs cover other methods) and stack every method's panel, in :data:`METHODS`
    order, into ``results/sinusoid_k<K>.png``."""
    panels = RESULTS / "sinusoid_fits"
    panels.mkdir(parents=True, exist_ok=True)
    for method in METHODS:
        fits = RUNS / f"{method}-k{k}" / "sinusoid_fits.png"
        if not fits.is_file():
            continue
        fig, ax = plt.subplots(figsize=(14, 3.1))
        ax.imshow(plt.imread(fits))
        ax.set_title(f"{method}-k{k}", fontsize=9, loc="left")
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(panels / f"{method}-k{k}.png", dpi=100)
        plt.close(fig)
    images = [plt.imread(f) for m in METHODS if (f := panels / f"{m}-k{k}.png").is_file()]
    if not images:
        return None
    out = RESULTS / f"sinusoid_k{k}.png"
    plt.imsave(out, np.concatenate(images))
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per configuration (minutes)")
    p.add_argument("--steps", type=int, default=70000, help="meta-steps per configuration (MAML: 70000)")
    p.add_argument("--test-tasks", type=int, default=600, help="held-out test tasks for each estimate")
    args = parse_args(p)  # a dirty tree is refused here, before any training
    label = current_label()
    for name in args.only or CONFIGS:
        records = train_and_test(
            name, args.minutes, args.steps, args.test_tasks, None if label is None else RUNS / label
        )
        if records:
            print(merge_results("sinusoid", records))
        if label is None:  # the figure shows the main runs only
            plot(int(name.rsplit("-k", 1)[1]))


if __name__ == "__main__":
    main()
