"""MAML-RL, PEARL and RL² side by side on MAML's 2D navigation at equal env steps (issue 32): one table, one figure.

    python -m benchmarks.nav_side_by_side                                  # all three, seed 0, 2M env steps each
    python -m benchmarks.nav_side_by_side --only pearl rl2 --seeds 0 1 2
    python -m benchmarks.nav_side_by_side --env-steps 40000000 --only maml-rl   # MAML-RL's paper budget
    python -m benchmarks.nav_side_by_side --env-steps 4000 --set env.max_episode_steps=2 \\
        --set pearl:pearl.collect_every=2 --results-dir /tmp/nav --runs-dir /tmp/nav/runs --allow-dirty  # smoke

The task family is :mod:`metalab.envs.navigation` for all three: a hidden goal in ``[-0.5, 0.5]^2``, reward
``-distance``, 100-step episodes, the same 1,000 training, 100 val and 100 test goals. Each method is its own
config, trained on the training goals:

- ``maml-rl``: ``configs/maml_rl_navigation.yaml`` (the paper's batch: 20 goals x 20 episodes before and after
  the inner step, 80,000 env steps per meta-iteration); adapted at test time by policy-gradient steps;
- ``pearl``: ``configs/pearl_navigation.yaml`` (CPU-sized PEARL, the dense reward); adapted by inferring ``z``
  from the episodes played so far on the goal;
- ``rl2``: ``configs/rl2_navigation.yaml``: metalab's RL² is a recurrent double DQN, so it runs on the same task
  with **discrete actions** (``metalab/Navigation2DDiscrete-v0``: stay or one of 8 compass moves of 0.1); a
  meta-episode is a trial of 3 rewarded episodes on one goal; it adapts through the GRU's memory.

Equal env steps: each method trains for the most trainer steps whose data collection fits ``--env-steps``
(:func:`trainer_steps`, counting every episode at its full length; an episode that reaches its goal early ends
sooner, so a run can use slightly fewer, and PEARL, which collects whole episodes until a phase has its steps,
a few more); the env steps a run actually took are recorded (``env_steps``). Evaluation episodes are not counted.
The default, 2M env steps, is CPU-sized: 5% of MAML-RL's 500 paper meta-iterations (500 x 20 goals x 20 episodes
x 2 x 100 steps = 40M), i.e. 25 of them. Every method keeps its final weights (no model selection).

The test (``eval.episodes`` = 100 trials, one per test goal) records per method ``test_return_after{k}`` for
``k = 0, 1, 2`` (per seed ``_s<seed>``, ``ci95`` over trials; then the mean over the seeds recorded so far with a
Student-t CI): the undiscounted return on the goal after ``k`` units of adaptation, where the unit differs and
each record says which (``adaptation``, ``episodes_seen``): for MAML-RL ``k`` policy-gradient steps, each on 20
episodes of the goal (so ``k`` = 1 has seen 20 episodes; the return is the mean over the 20 episodes sampled
after the step, actions drawn from its Gaussian policy as in the paper); for PEARL and RL² ``k`` earlier episodes
of the same trial, acting greedily (PEARL's mean action, RL²'s best Q). The per-seed records keep their
periodic val evaluations (``curve``: ``[trainer step, env steps, val/return_after{k}]``), from which
``nav_side_by_side.png`` is drawn: val return after 0, 1 and 2 vs env steps, one line per method (mean over seeds,
band from min to max). ``nav_side_by_side.md`` is the table. Reference returns (:func:`reference_returns`): staying
at the origin (-37.6 on the test goals), the best continuous agent (-0.50) and the best on the discrete lattice
(-4.4).

``--set KEY=VALUE`` overrides a config key of every selected method, ``--set METHOD:KEY=VALUE`` of one. Each run
trains in ``<runs-dir>/<method>-s<seed>``, resuming when rerun. Provenance flags (``--allow-dirty``,
``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from benchmarks.common import RESULTS, current_label, merge_results, parse_args, parser, record
from benchmarks.meta_rl import curve, last_env_steps
from benchmarks.rl_common import aggregate, plot_seeds, save_figure, seed_metric, train
from metalab.envs.config import make_env
from metalab.envs.navigation import GOALS, HORIZON, tasks
from metalab.experiment import RunConfig, load_run_config

BENCH = "nav_side_by_side"
TASK = "navigation-2d"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = Path("runs/bench/nav_side_by_side")
ENV_STEPS = 2_000_000
"""Default budget per method and seed: 25 of MAML-RL's paper meta-iterations (80,000 env steps each)."""
AFTER = (0, 1, 2)
"""Adaptation steps or episodes before the scored return."""
EVALS = 10
"""Periodic val evaluations per run (about; plus one at the end)."""


class Method(NamedTuple):
    config: str
    overrides: tuple[str, ...]
    action_space: str


METHODS = {
    # final weights for all three (MAML-RL's config otherwise keeps its best val model)
    "maml-rl": Method("maml_rl_navigation.yaml", ("maml_rl.eval_inner_steps=2", "train.keep_best=null"),
                      "continuous"),
    "pearl": Method("pearl_navigation.yaml", ("pearl.eval_prior_episodes=1", "pearl.eval_adapt_episodes=2"),
                    "continuous"),
    "rl2": Method("rl2_navigation.yaml", ("rl2.trial_episodes=3",), "discrete (9 moves)"),
}  # fmt: skip


def split_overrides(sets: list[str], method: str) -> list[str]:
    """The ``--set`` values that apply to ``method``: ``KEY=VALUE`` (all methods) and ``METHOD:KEY=VALUE``."""
    out = []
    for s in sets:
        head, sep, rest = s.partition(":")
        if sep and "=" not in head:
            if head not in METHODS:
                raise SystemExit(f"--set {s}: unknown method {head!r} (one of {', '.join(METHODS)})")
            if head == method:
                out.append(rest)
        else:
            out.append(s)
    return out


def episode_length(run: RunConfig) -> int:
    """Steps of a full episode of ``run``'s env: its own limit, or ``env.max_episode_steps`` if shorter."""
    env = make_env(run.env)
    length = int(getattr(env.unwrapped, "max_steps", HORIZON))
    env.close()
    return min(length, run.env.max_episode_steps or length)


def env_steps_per_collection(run: RunConfig) -> tuple[int, int, int]:
    """``(first, per_collection, trainer steps per collection)``: env steps collected at step 0 on top of a
    collection, by each collection, and how often one comes, for ``run``'s algorithm, with full episodes."""
    cfg, horizon = run.params, episode_length(run)

    def whole(n: int) -> int:  # a collection phase plays whole episodes until it has n steps
        return -(-n // horizon) * horizon

    if run.algo == "maml_rl":  # trajectories per goal before and after each inner step
        return 0, run.train.meta_batch * cfg.trajectories * (cfg.inner_steps + 1) * horizon, 1
    if run.algo == "pearl":
        phases = (cfg.prior_steps, cfg.posterior_steps, cfg.extra_posterior_steps)
        first = len(tasks("train")) * whole(cfg.initial_steps)
        return first, cfg.tasks_per_collect * sum(whole(n) for n in phases if n > 0), cfg.collect_every
    if run.algo == "rl2":
        return 0, cfg.trial_episodes * horizon, cfg.collect_every
    raise SystemExit(f"no env-step count for {run.algo}")


def trainer_steps(run: RunConfig, budget: int) -> int:
    """The most trainer steps whose collections stay within ``budget`` env steps (at least one collection)."""
    first, per, every = env_steps_per_collection(run)
    if per < 1:
        raise SystemExit(f"{run.algo}: a collection takes no env steps; the budget cannot be counted")
    return max((budget - first) // per, 1) * every


def schedule(steps: int) -> dict[str, int]:
    """Logging, evaluation and checkpoints for a run of about ``steps``: about :data:`EVALS` val evaluations,
    each on a logging step (its env steps known), and ``steps`` rounded down to a logging step."""
    log_every = max(steps // (10 * EVALS), 1)
    steps = max(steps // log_every, 1) * log_every
    eval_every = log_every * max(steps // (EVALS * log_every), 1)
    return {"steps": steps, "log_every": log_every, "eval_every": eval_every, "checkpoint_every": eval_every}


def run_config(method: str, seed: int, budget: int, sets: list[str]) -> RunConfig:
    """``method``'s config for ``seed`` on the CPU, trained to ``budget`` env steps, with ``sets`` last."""
    path = CONFIGS / METHODS[method].config
    fixed = [f"seed={seed}", "train.device=cpu", *METHODS[method].overrides]
    mine = split_overrides(sets, method)
    steps = trainer_steps(load_run_config(path, [*fixed, *mine]), budget)
    timing = [f"train.{k}={v}" for k, v in schedule(steps).items()]
    return load_run_config(path, [*fixed, *timing, *mine])


def adaptation(run: RunConfig) -> tuple[str, list[int]]:
    """What ``after{k}`` counts for ``run``, and the episodes of the goal seen before the scored one, per ``k``."""
    if run.algo == "maml_rl":
        n = run.params.trajectories
        return f"policy-gradient steps, each on {n} episodes of the goal", [k * n for k in AFTER]
    memory = "z from the posterior of their transitions" if run.algo == "pearl" else "the GRU's memory"
    return f"earlier episodes of the same trial ({memory})", list(AFTER)


def benchmark(method: str, seed: int, budget: int, sets: list[str], runs: Path) -> list[dict[str, Any]]:
    """Train (or resume) ``method`` with ``seed`` to ``budget`` env steps, test it once; its per-seed records."""
    run = run_config(method, seed, budget, sets)
    run_dir = runs / f"{method}-s{seed}"
    learner, fitted = train(run, run_dir)
    test = learner.evaluate("test", run.eval.episodes)
    unit, seen = adaptation(run)
    common = {"seed": seed, "config": f"configs/{METHODS[method].config}", "env_id": run.env.id,
              "overrides": [*METHODS[method].overrides, *split_overrides(sets, method)],
              "action_space": METHODS[method].action_space, "env_step_budget": budget,
              "env_steps": last_env_steps(run_dir), "adaptation": unit, "test_trials": run.eval.episodes,
              "selection": "final weights", "steps": fitted.step, "seconds": fitted.seconds}  # fmt: skip
    out = []
    for k in AFTER:
        values, env_steps = curve(run_dir, f"val/return_after{k}")
        rows = [[s, env_steps[s], v] for s, v in sorted(values.items())]
        key = f"test/return_after{k}"
        out.append(record(BENCH, TASK, method, seed_metric(f"test_return_after{k}", seed), test.get(key),
                          ci95=test.get(f"{key}_ci95"), unit="return", metric_key=key, episodes_seen=seen[k],
                          curve=rows, curve_metric=f"val/return_after{k}", **common))  # fmt: skip
    returns = " / ".join(f"{test.get(f'test/return_after{k}', float('nan')):.2f}" for k in AFTER)
    print(f"{method}-s{seed}: {fitted.step} steps, {common['env_steps']} env steps, {fitted.seconds:.0f} s; "
          f"test return after {'/'.join(map(str, AFTER))}: {returns}")  # fmt: skip
    return out


def over_seeds(method: str, path: Path) -> list[dict[str, Any]]:
    """The aggregate records over the seeds of ``method`` recorded in ``path``."""
    records = json.loads(path.read_text())
    found = [aggregate(records, BENCH, TASK, method, f"test_return_after{k}", "return") for k in AFTER]
    return [r for r in found if r is not None]


def _records(results: Path) -> list[dict[str, Any]]:
    path = results / f"{BENCH}.json"
    label = current_label()
    return [r for r in (json.loads(path.read_text()) if path.is_file() else []) if r.get("label") == label]


def reference_returns(split: str) -> dict[str, float]:
    """Mean return on ``split``'s goals of staying at the origin, of the best continuous agent (each coordinate
    moves up to 0.1 toward the goal every step: the closest reachable point at every step) and of the best agent on
    the discrete env's 0.1 lattice (a coordinate moves 0.1 toward the goal while that brings it closer)."""
    goals = GOALS[tasks(split)]  # (G, 2)
    # (H, 1, 1): the farthest a coordinate can have moved after each step
    steps = np.arange(1, HORIZON + 1)[:, None, None] * 0.1
    continuous = np.clip(goals[None], -steps, steps)  # (H, G, 2) position after each step
    lattice_goal = np.sign(goals) * np.floor(np.abs(goals) / 0.1 + 0.5) * 0.1  # the nearest lattice point
    discrete = np.clip(lattice_goal[None], -steps, steps)

    def ret(positions: np.ndarray) -> float:
        return float(-np.linalg.norm(positions - goals[None], axis=2).sum(0).mean())

    stay = -HORIZON * float(np.linalg.norm(goals, axis=1).mean())
    return {"stay at the origin": stay, "best, continuous": ret(continuous), "best, discrete": ret(discrete)}


def plot(results: Path) -> Path | None:
    """``nav_side_by_side.png``: val return after 0, 1, 2 vs env steps, one line per method (mean over its
    recorded seeds, band from min to max), from the per-seed records' curves."""
    curves: dict[tuple[str, int], list[dict[float, float]]] = {}
    x_of: dict[tuple[str, int], dict[float, list[float]]] = {}
    for r in _records(results):
        if "curve" in r and "seed" in r and r["metric"].startswith("test_return_after"):
            k = int(r["metric"].removeprefix("test_return_after").split("_")[0])
            curves.setdefault((r["method"], k), []).append({row[0]: row[2] for row in r["curve"]})
            for row in r["curve"]:
                x_of.setdefault((r["method"], k), {}).setdefault(row[0], []).append(row[1])
    references = reference_returns("val")
    fig, axes = plt.subplots(1, len(AFTER), figsize=(5 * len(AFTER), 3.8), sharey=True)
    drawn = False
    for ax, k in zip(axes, AFTER, strict=True):
        for method in METHODS:
            xs = {s: float(np.mean(v)) for s, v in x_of.get((method, k), {}).items()}
            drawn = plot_seeds(ax, curves.get((method, k), []), method, xs) or drawn
        for (name, level), style in zip(references.items(), (":", "--", "-."), strict=True):
            ax.axhline(level, color="gray", ls=style, lw=1, label=name)
        ax.set(xlabel="environment steps of training", title=f"after {k} (MAML-RL: steps; others: episodes)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("val return (periodic evaluation)")
    fig.suptitle("2D navigation, equal env steps: return of the episode after k adaptation steps or episodes")
    return save_figure(fig, drawn, results, BENCH)


def table(results: Path) -> Path | None:
    """``nav_side_by_side.md``: per method, the test return after 0 / 1 / 2 (mean over seeds, with the seeds'
    Student-t CI, or with one seed its CI over trials), the env steps, trainer steps and CPU seconds of a seed."""
    records = _records(results)
    rows, budgets, trials = [], set(), set()
    for method, spec in METHODS.items():
        mine = {r["metric"]: r for r in records if r["method"] == method}
        seeds = [r for m, r in mine.items() if m.startswith("test_return_after0_s")]
        if "test_return_after0" not in mine or not seeds:
            continue
        cells = []
        for k in AFTER:
            r = mine.get(f"test_return_after{k}")
            one = r is not None and r.get("n") == 1 and f"test_return_after{k}_s{r['seeds'][0]}" in mine
            ci = mine[f"test_return_after{k}_s{r['seeds'][0]}"]["ci95"] if one else (r or {}).get("ci95")
            value = None if r is None else r["value"]
            cells.append("-" if value is None else f"{value:.1f}" + (f" ± {ci:.1f}" if ci else ""))
        env_steps = [r["env_steps"] for r in seeds if r.get("env_steps") is not None]
        budgets |= {r["env_step_budget"] for r in seeds}
        trials |= {r["test_trials"] for r in seeds}
        rows.append(f"| {method} | {spec.action_space} | {' / '.join(cells)} | {seeds[0]['adaptation']} | "
                    f"{np.mean(env_steps) if env_steps else float('nan'):,.0f} | {seeds[0]['steps']} | "
                    f"{np.mean([r['seconds'] for r in seeds]):.0f} | {len(seeds)} |")  # fmt: skip
    if not rows:
        return None
    head = ("| method | actions | test return after 0 / 1 / 2 | after k = | env steps | trainer steps | "
            "seconds | seeds |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")  # fmt: skip
    references = ", ".join(f"{name} {v:.2f}" for name, v in reference_returns("test").items())
    note = (f"\n{'/'.join(map(str, sorted(trials)))} test trials (cycling through the 100 test goals); ± is the "
            "95% CI over seeds (over trials with one seed). "
            f"Reference returns on the test goals: {references}. Budget: "
            f"{', '.join(f'{b:,}' for b in sorted(budgets))} env steps per method and seed.\n")  # fmt: skip
    path = results / f"{BENCH}.md"
    path.write_text(head + "\n".join(rows) + "\n" + note)
    return path


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of each method (default 0)")
    p.add_argument(
        "--env-steps", type=int, default=ENV_STEPS, help=f"per method and seed (default {ENV_STEPS:,})"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="override a config key of every selected method, or of METHOD only (repeatable)")  # fmt: skip
    p.add_argument("--runs-dir", type=Path, default=RUNS, help=f"where run directories go (default {RUNS})")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help=f"where {BENCH}.json/.png/.md go")
    p.set_defaults(threads=1)  # small networks, episodes stepped in NumPy: one thread is fastest
    args = parse_args(p, argv)  # a dirty tree is refused here, before any training
    if args.env_steps < 1:
        raise SystemExit("--env-steps must be >= 1")
    for method in args.only or METHODS:
        for seed in args.seeds:
            records = benchmark(method, seed, args.env_steps, args.overrides, args.runs_dir)
            path = merge_results(BENCH, records, args.results_dir)
            merge_results(BENCH, over_seeds(method, path), args.results_dir)
            plot(args.results_dir)
            table(args.results_dir)
    print(args.results_dir / f"{BENCH}.json")


if __name__ == "__main__":
    main()
