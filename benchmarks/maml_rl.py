"""MAML-RL on MAML's 2D navigation: adaptation curves on held-out goals, beside the paper's baselines.

    python -m benchmarks.maml_rl                                   # every configuration, seeds 0 1 2
    python -m benchmarks.maml_rl --only maml-navigation --seeds 0
    python -m benchmarks.maml_rl --only pretrained-navigation --seeds 0 --set train.steps=20 \\
        --results-dir /tmp/mr --runs-dir /tmp/mr/runs --allow-dirty       # a smoke run

Every configuration is ``configs/maml_rl_navigation.yaml`` (:mod:`metalab.rl.maml_rl`; goals of
:mod:`metalab.envs.navigation`: 1,000 training, 100 val, 100 test), trained on the training goals with the
model of the best val return after one step kept, then tested once on the test goals:

- ``maml-navigation``: MAML-RL as configured (the paper's inner surrogate, second order);
- ``promp-navigation``: the same with ProMP's low-variance curvature inner objective (``objective: promp``);
- ``trpo-navigation``: the same with the paper's TRPO outer step (``configs/maml_rl_point_trpo.yaml``,
  ``outer: trpo``: KL bound 0.01, conjugate gradient, line search) in place of one Adam step per meta-iteration;
- ``pretrained-navigation``: the paper's *pretrained* baseline, one policy trained by the policy gradient on all
  training goals at once (``inner_steps: 0``), then adapted at test time by the same steps;
- ``random-navigation``: the paper's *random* baseline, the initial policy of the seed, not trained, adapted by
  the same steps;
- ``maml-cheetah-dir``: MAML-RL on the half-cheetah forward/backward family at a CPU-sized budget
  (``configs/maml_rl_half_cheetah_dir.yaml``, :mod:`metalab.envs.half_cheetah`; the ``mujoco`` extra), tested on
  10 trials alternating the directions: ``test_progress_after{k}_forward`` and ``_backward`` are the final x
  position of the episodes after ``k`` steps (the paper's qualitative result: from one initialisation, one
  step sends the cheetah forward or backward as the task asks).

The test (``eval.episodes`` trials, one per test goal) samples ``trajectories`` episodes per goal before
adaptation and after each of 3 policy-gradient steps (step size 0.1, then 0.05) and records, per seed (metric
``..._s<seed>``, ``ci95`` over goals) and over the seeds recorded so far (Student-t over seeds):
``test_return_after{k}`` (mean undiscounted return of the episodes after ``k`` steps) and
``test_distance_after{k}`` (their final distance to the goal). ``maml_rl.png`` draws the curves. Each run trains
in ``<runs-dir>/<config>-s<seed>``, resuming when rerun; ``--set KEY=VALUE`` overrides a key of every selected
configuration. Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.

Reference, on the 100 test goals: an agent that stays at the origin scores -37.6 on average (100 steps at the
goal's distance); one that walks straight to the goal at full speed, the best there is, -0.50.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from benchmarks.common import RESULTS, add_set_arg, merge_results, parse_args, parser, record
from benchmarks.rl_common import aggregate, save_figure, seed_metric, train
from metalab.experiment import RunConfig, algorithm, load_run_config
from metalab.utils import seed_everything

BENCH = "maml_rl"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = Path("runs/bench/maml_rl")
SEEDS = (0, 1, 2)
TASK = "navigation-2d"
STEPS = 3
"""Policy-gradient steps at test time (the paper's figure 5: 0 to 3)."""


def _metrics(names: dict[str, tuple[str, str]], groups: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Record metric ``test_<name>_after{k}<suffix>`` -> (the learner's key ``test/<prefix><key>_after{k}``,
    unit), for ``names`` ``{name: (key, unit)}``, ``groups`` ``{suffix: prefix}`` and ``k = 0 .. STEPS``."""
    return {
        f"test_{name}_after{k}{suffix}": (f"test/{prefix}{key}_after{k}", unit)
        for name, (key, unit) in names.items()
        for suffix, prefix in groups.items()
        for k in range(STEPS + 1)
    }


NAVIGATION = _metrics({"return": ("return", "return"), "distance": ("distance", "distance")}, {"": ""})
CHEETAH = _metrics(
    {"return": ("return", "return"), "progress": ("x_position", "m")},
    {
        "": "",
        "_forward": "task0/",
        "_backward": "task1/",
    },  # the learner's per-task metrics: task 0 runs forward
)


class Setup(NamedTuple):
    method: str
    overrides: tuple[str, ...] = ()
    trained: bool = True
    task: str = TASK
    config: str = "maml_rl_navigation.yaml"
    metrics: dict[str, tuple[str, str]] = NAVIGATION
    """Record metric -> (the learner's ``test/...`` key, unit)."""


SETUPS = {
    "maml-navigation": Setup("maml-rl"),
    "promp-navigation": Setup("maml-rl-promp", ("maml_rl.objective=promp",)),
    "trpo-navigation": Setup("maml-rl-trpo", config="maml_rl_point_trpo.yaml"),
    "pretrained-navigation": Setup("pretrained", ("maml_rl.inner_steps=0",)),
    "random-navigation": Setup("random", trained=False),
    "maml-cheetah-dir": Setup(
        "maml-rl", task="half-cheetah-dir", config="maml_rl_half_cheetah_dir.yaml", metrics=CHEETAH
    ),
}


def run_config(name: str, seed: int, overrides: list[str]) -> RunConfig:
    """Configuration ``name``'s config for ``seed`` on the CPU, with ``overrides`` last."""
    fixed = [f"seed={seed}", "train.device=cpu", f"maml_rl.eval_inner_steps={STEPS}"]
    return load_run_config(CONFIGS / SETUPS[name].config, [*fixed, *SETUPS[name].overrides, *overrides])


def benchmark(name: str, seed: int, overrides: list[str], runs: Path) -> list[dict[str, Any]]:
    """Train (or resume, or reload) configuration ``name`` with ``seed``, test it once; its per-seed records."""
    setup, run = SETUPS[name], run_config(name, seed, overrides)
    if setup.trained:
        learner, fitted = train(run, runs / f"{name}-s{seed}")
        steps, seconds = fitted.step, fitted.seconds
    else:
        seed_everything(run.seed)
        learner = algorithm(run.algo).build(run, Path("unused"), torch.device("cpu"))
        steps, seconds = 0, 0.0
    test = learner.evaluate("test", run.eval.episodes)
    print(f"{name}-s{seed} ({steps} steps, {seconds:.0f} s): return "
          + " / ".join(f"{test[f'test/return_after{k}']:.2f}" for k in range(STEPS + 1)))  # fmt: skip
    common = {"seed": seed, "config": f"configs/{setup.config}", "env": run.env.id, "overrides":
              [*setup.overrides, *overrides], "test_trials": run.eval.episodes}  # fmt: skip
    return [
        record(BENCH, setup.task, setup.method, seed_metric(metric, seed), test[key], ci95=test[f"{key}_ci95"],
               unit=unit, steps=steps, seconds=seconds, metric_key=key, **common)
        for metric, (key, unit) in setup.metrics.items()
    ]  # fmt: skip


def over_seeds(name: str, path: Path) -> list[dict[str, Any]]:
    """The aggregate records over the seeds of ``name`` recorded in ``path``."""
    records, setup = json.loads(path.read_text()), SETUPS[name]
    found = [
        aggregate(records, BENCH, setup.task, setup.method, metric, unit)
        for metric, (_, unit) in setup.metrics.items()
    ]
    return [r for r in found if r is not None]


def plot(path: Path) -> Path | None:
    """``maml_rl.png``: return and final distance vs test-time steps, mean over seeds with the seeds' CI."""
    aggregates = {(r["method"], r["metric"]): r for r in json.loads(path.read_text())
                  if "per_seed" in r and r["task"] == TASK}  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for ax, name in zip(axes, ("return", "distance"), strict=True):
        for setup in (s for s in SETUPS.values() if s.task == TASK):
            found = [aggregates.get((setup.method, f"test_{name}_after{k}")) for k in range(STEPS + 1)]
            if any(r is None for r in found):
                continue
            mean = [r["value"] for r in found]
            ci = [r["ci95"] or 0.0 for r in found]
            ax.errorbar(range(STEPS + 1), mean, yerr=ci, marker="o", capsize=3,
                        label=f"{setup.method} ({found[0]['n']} seeds)")  # fmt: skip
            ax.fill_between(range(STEPS + 1), [m - c for m, c in zip(mean, ci, strict=True)],
                            [m + c for m, c in zip(mean, ci, strict=True)], alpha=0.1)  # fmt: skip
            drawn = True
        ax.set(xlabel="policy-gradient steps on the test goal", xticks=range(STEPS + 1),
               ylabel="average return" if name == "return" else "final distance to the goal")  # fmt: skip
        ax.set_title(f"2D navigation, held-out test goals: {name}")
        if ax.lines:
            ax.legend(fontsize=8)
    return save_figure(fig, drawn, path.parent, BENCH)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], list(SETUPS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds of each configuration")
    add_set_arg(p)
    p.add_argument("--runs-dir", type=Path, default=RUNS, help=f"where run directories go (default {RUNS})")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where maml_rl.json goes")
    p.set_defaults(threads=1)  # a small policy, episodes stepped in NumPy: one thread is fastest
    args = parse_args(p, argv)  # a dirty tree is refused here, before any training
    for name in args.only or SETUPS:
        for seed in args.seeds:
            path = merge_results(
                BENCH, benchmark(name, seed, args.overrides, args.runs_dir), args.results_dir
            )
            merge_results(BENCH, over_seeds(name, path), args.results_dir)
            plot(path)
    print(args.results_dir / f"{BENCH}.json")


if __name__ == "__main__":
    main()
