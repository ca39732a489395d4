"""BitFlip with DQN: hindsight relabeling (none / final / future) vs Stable-Baselines3's DQN + HerReplayBuffer.

    python -m benchmarks.bitflip                                  # the whole grid: ~5 h of one CPU core
    python -m benchmarks.bitflip --only future-n15                # one method at one n, all three seeds
    python -m benchmarks.bitflip --only sb3-n25-s1 none-n25-s1    # single configurations
    python -m benchmarks.bitflip --only n7 --steps-scale 0.5      # every method at n = 7, half the budget
    python -m benchmarks.bitflip --only plain-n7 plain-n15        # metalab like-for-like with SB3, 3 seeds each

Published behaviour (Andrychowicz et al., "Hindsight Experience Replay", NeurIPS 2017, sec. 4.1, fig. 1): DQN
without relabeling fails beyond about n = 13 bits; with HER ("future", k = 4) it solves n = 50. This project's
targets for ``metalab-dqn-future``: greedy success >= 0.99 at n = 15, >= 0.95 at n = 25, >= 0.9 at n = 50.

Grid: n in {7, 15, 25, 50} x method x seeds {0, 1, 2}. metalab's methods train ``configs/dqn_her_bitflip.yaml``
with ``dqn.her`` set to none / final / future (one update per env step, so trainer steps are env steps); the
peer ``sb3`` trains SB3's DQN with HerReplayBuffer (future, n_sampled_goal 4) with the same hyperparameters
(mapping in :mod:`benchmarks.bitflip_sb3`). Every method at a given n gets the same env-step budget
(``BUDGETS`` times ``--steps-scale``, or ``--budget N=STEPS``), evaluates greedy success on 100 fixed
validation episodes every ``budget / 40`` env steps (the val learning curve, ``curve_metric`` ``val/success``,
and the env steps at which val greedy success first reaches 90%, null if never), and after training on 100
fixed test episodes (``test/success``; the same episodes for every method, never among the val ones).
``seconds`` is training wall-clock time, periodic evaluations included, across resumes.

The tuned metalab cells differ from SB3's DQN in more than relabeling: metalab uses double DQN
(``dqn.double``) and clips TD targets to the feasible return range (``dqn.clip_target``), SB3 does neither, and
SB3's Q-network reads ``[achieved goal, desired goal, observation]`` (3n inputs; on BitFlip the achieved goal is
the observation) where metalab's reads ``[observation, desired goal]`` (2n). ``plain`` (method
``metalab-dqn-her-plain``) is metalab like-for-like with SB3 on those three: ``future`` relabeling with
``dqn.double=false``, ``dqn.clip_target=false`` and ``dqn.achieved_goal_input=true``. What still differs: SB3
relabels each minibatch anew and keeps a relabeled transition's ``done`` of the real episode, metalab relabels
``her_k`` goals once per transition and ends a relabeled transition where its goal is reached. ``plain`` runs only
when named (``--only plain-n7``); the default grid and the ``n<N>`` groups are the other four methods.

Each configuration trains in ``<runs-dir>/<config>`` and resumes it when rerun; its records (``success_s<seed>``,
``steps_to_90_s<seed>``) are merged into ``<results-dir>/bitflip.json`` together with the aggregate over the
seeds recorded so far (``success``, ``steps_to_90``: mean with a Student-t 95% CI over seeds, ``per_seed`` and
``n``), and ``bitflip.png`` is redrawn from every run directory (mean val greedy success over seeds vs env steps,
band: min to max over seeds). Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from benchmarks.bitflip_sb3 import MISSING, sb3_kwargs, train_sb3
from benchmarks.common import RESULTS, add_provenance_args, current_label, merge_results, parse_args, record
from benchmarks.rl_common import (
    aggregate,
    expand,
    plot_seeds,
    recorded_curves,
    save_figure,
    seed_metric,
    train,
)
from metalab.experiment import RunConfig, load_run_config
from metalab.train.logger import read_metrics

BENCH = "bitflip"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dqn_her_bitflip.yaml"
RUNS = Path("runs/bench/bitflip")
NS = (7, 15, 25, 50)
SEEDS = (0, 1, 2)
METHODS = {
    "none": "metalab-dqn-none",
    "final": "metalab-dqn-final",
    "future": "metalab-dqn-future",
    "sb3": "sb3-dqn-her-future",
    "plain": "metalab-dqn-her-plain",
}
DEFAULT_METHODS = ("none", "final", "future", "sb3")  # ``plain`` runs when named
# ``plain``: metalab's DQN + HER (future) with SB3's target (no double DQN, no clip) and SB3's input layout.
PLAIN_OVERRIDES = [
    "dqn.her=future",
    "dqn.double=false",
    "dqn.clip_target=false",
    "dqn.achieved_goal_input=true",
]
SB3_FACTS = {"double": False, "clip_target": False, "inputs": "achieved goal, desired goal, observation (3n)"}
# Env steps per configuration at each n, the same for every method. Calibration (metalab future, seed 0, on
# this 2-core CPU): 90% greedy success after ~700 env steps at n = 7 and ~5400 at n = 15 (0.99 at ~9000);
# ~36% after 16k at n = 25. Steps to learn grow roughly like n^3, hence ~25k expected at n = 25 and ~200k at
# n = 50; the budgets leave a 2-4x margin at n <= 25 and ~1.5x at n = 50. One update per env step costs
# ~3-4 ms of one CPU core (metalab and SB3 alike), so one n = 50 configuration takes ~18 minutes.
# Measured since: the n^3 guess fails at n = 50. With the first config's 128x128 Q-network, 300k steps of
# metalab future left greedy success at 0.00 (3 seeds), and the greedy policy solved goals 1 / 2 / 3 / 5 bits away
# only 69% / 35% / 20% / 4% of the time; nor did a HER-paper-like schedule help (one update per 16 env steps,
# Polyak tau 0.05 every 40 updates, a 1M buffer, epsilon to 0.2: 0.00 after 2M env steps).
# Two causes, found since:
# 1. The network. Regressing an MLP (Adam 1e-3, Huber, batch 128, one action per sample as in Q-learning) onto
#    the exact optimal Q of goals 1-25 bits away at n = 50, its greedy action at distance 1 / 5 / 20 was right
#    7% / 20% / 46% of the time after 20k steps with two hidden layers of 128 (512x512: 12% at d = 1 after 6k),
#    and 97% / 100% / 99% with the HER paper's single hidden layer of 256 (94% at d = 1 after 18k). At n = 25
#    the 256 layer is also faster: 99% at d = 1 after 8k steps (128x128: 79% after 10k). The config now uses
#    it (dqn.hidden [256]); the none / final / SB3 records at n <= 25 and SB3's at n = 50 were measured with
#    128x128 and say so (``hidden``, ``sb3_hyperparameters``).
# 2. The data. With [256], RL at n = 50 learns which bit differs (greedy action right 98% / 90% / 76% at
#    distance 1 / 5 / 20 after 90k env steps), but success stays 0.00 over 300k. The greedy policy falls
#    into 2-cycles: it flips a differing bit, then flips it back, for the rest of the episode. In the replay
#    buffer at 270k steps, 93% of consecutive actions repeat the previous one. So once the policy is
#    greedy, "future" relabeling yields goals 0-1 bits away, and the mid-distance Q-values decay: the greedy
#    action at distance 10 / 20 was right 80% / 76% at 90k and 66% / 64% at 210k. With epsilon ending at 0.2
#    (dqn.eps_end; about 10 random actions per 50-step episode), a run of the same config was right 96% /
#    89% at distance 10 / 20 after 150k. Its greedy success was 0.02-0.08 up to 300k (test: 0.04), then rose:
#    resumed to 600k, it read 0.57 / 0.90 / 1.00 at 405k / 450k / 525k env steps (seed 0, `metalab train
#    configs/dqn_her_bitflip.yaml --set env.n=50 --set dqn.eps_end=0.2`, 300k, then --resume with 600k steps).
#    So n = 50 needs epsilon 0.2 and ~500k env steps: the config's eps_end is now 0.2 and the n = 50 budget 600k.
#    With both, the grid's future-n50 seeds 0 / 1 / 2 first reached 90% after 225k / 285k / 225k env steps (1.00
#    on the test episodes each); that 300k-budget dev run had decayed epsilon over 60k steps, the grid over 120k.
#    The future and SB3 cells were rerun with these settings; the none / final cells were not (their records say
#    ``eps_end``, ``hidden`` and the budget).
BUDGETS = {7: 10_000, 15: 30_000, 25: 100_000, 50: 600_000}
TARGETS = {15: 0.99, 25: 0.95, 50: 0.9}  # metalab-dqn-future
PUBLISHED = (
    "Andrychowicz et al. 2017 (HER, sec. 4.1, fig. 1): DQN without relabeling fails beyond about n = 13; "
    "DQN + HER (future, k = 4) solves n = 50"
)
THRESHOLD = 0.9
EVAL_EPISODES = 100
CONFIGS = [f"{m}-n{n}-s{s}" for n in NS for m in METHODS for s in SEEDS]
DEFAULT = [f"{m}-n{n}-s{s}" for n in NS for m in DEFAULT_METHODS for s in SEEDS]
GROUPS = {f"{m}-n{n}": [f"{m}-n{n}-s{s}" for s in SEEDS] for n in NS for m in METHODS} | {
    f"n{n}": [f"{m}-n{n}-s{s}" for m in DEFAULT_METHODS for s in SEEDS] for n in NS
}
CURVE_METRIC = "val/success"  # the periodic evaluations: greedy success on the val episodes


def parse(name: str) -> tuple[str, int, int]:
    """``future-n15-s0`` -> ``("future", 15, 0)``."""
    method, n, seed = re.fullmatch(r"(\w+)-n(\d+)-s(\d+)", name).groups()  # type: ignore[union-attr]
    return method, int(n), int(seed)


def run_config(method: str, n: int, seed: int, budget: int) -> RunConfig:
    """metalab's DQN config of one configuration (the SB3 peer reads its settings from the ``future`` one)."""
    eval_every = max(budget // 40, 100)
    her = PLAIN_OVERRIDES if method == "plain" else [f"dqn.her={'future' if method == 'sb3' else method}"]
    overrides = [f"seed={seed}", f"env.n={n}", *her,
                 f"train.steps={budget}", f"train.eval_every={eval_every}", f"train.eval_episodes={EVAL_EPISODES}",
                 f"train.checkpoint_every={max(budget // 10, 100)}", f"train.log_every={max(budget // 200, 10)}",
                 f"eval.episodes={EVAL_EPISODES}", f"eval.batch={EVAL_EPISODES}", "train.device=cpu"]  # fmt: skip
    return load_run_config(CONFIG, overrides)


def first_reaching(curve: list[tuple[int, float]], threshold: float = THRESHOLD) -> int | None:
    """The env steps of the first evaluation with success >= ``threshold`` (None if none)."""
    return next((step for step, success in sorted(curve) if success >= threshold), None)


def metalab_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.csv"
    return [(s, v) for s, k, v in read_metrics(path) if k == CURVE_METRIC] if path.is_file() else []


def sb3_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "state.json"
    return [tuple(p) for p in json.loads(path.read_text())["curve"]] if path.is_file() else []


def benchmark(name: str, budget: int, runs: Path) -> list[dict]:
    """Train (or resume) configuration ``name`` and return its per-seed records."""
    method, n, seed = parse(name)
    run, run_dir = run_config(method, n, seed, budget), runs / name
    if method == "sb3":
        result = train_sb3(run, run_dir, run.train.eval_every, run.train.checkpoint_every)
        test_mean, test_ci = result.test_success.mean, result.test_success.ci95
        curve, steps, seconds = result.curve, result.steps, result.seconds
        settings = {"sb3_hyperparameters": sb3_kwargs(run), **SB3_FACTS}
    else:
        learner, fitted = train(run, run_dir)
        metrics = learner.evaluate("test", EVAL_EPISODES)
        test_mean, test_ci = metrics["test/success"], metrics["test/success_ci95"]
        curve, steps, seconds = metalab_curve(run_dir), fitted.step, fitted.seconds
        cfg = run.params
        settings = {
            "config": f"configs/{CONFIG.name}",
            "her": cfg.her,
            "hidden": list(cfg.hidden),
            "eps_end": cfg.eps_end,
            "double": cfg.double,
            "clip_target": cfg.clip_target,
            "inputs": SB3_FACTS["inputs"] if cfg.achieved_goal_input else "observation, desired goal (2n)",
        }
    reached = first_reaching(curve)
    common = {"bits": n, "seed": seed, "budget_env_steps": budget, "eval_every": run.train.eval_every,
              "eval_episodes": EVAL_EPISODES, "test_episodes": EVAL_EPISODES, "threads": torch.get_num_threads(),
              "published": PUBLISHED, **settings}  # fmt: skip
    target = TARGETS.get(n) if method == "future" else None
    print(f"{name}: greedy success {test_mean:.3f} ± {test_ci:.3f} after {steps} env steps, {seconds:.0f} s; "
          f"90% first reached at {reached if reached is not None else 'never'}"
          + (f" (target {target})" if target is not None else ""))  # fmt: skip
    task, label = f"bitflip-n{n}", METHODS[method]
    return [
        record(BENCH, task, label, seed_metric("success", seed), test_mean, ci95=test_ci, unit="fraction",
               steps=steps, seconds=seconds, target=target, curve=[list(p) for p in sorted(curve)],
               curve_metric=CURVE_METRIC, metric_key="test/success", **common),
        record(BENCH, task, label, seed_metric("steps_to_90", seed), reached, unit="env steps", steps=steps,
               seconds=seconds, threshold=THRESHOLD, threshold_metric=CURVE_METRIC, **common),
    ]  # fmt: skip


def aggregates(path: Path, name: str) -> list[dict]:
    """Records over the seeds of ``name``'s method and n found in the results file at ``path``."""
    method, n, _ = parse(name)
    records = json.loads(path.read_text())
    extra = {"bits": n, "published": PUBLISHED}  # "n" of an aggregate: its seed count
    success = aggregate(records, BENCH, f"bitflip-n{n}", METHODS[method], "success", "fraction",
                        target=TARGETS.get(n) if method == "future" else None, **extra)  # fmt: skip
    reach = aggregate(records, BENCH, f"bitflip-n{n}", METHODS[method], "steps_to_90", "env steps",
                      threshold=THRESHOLD, **extra)  # fmt: skip
    return [r for r in (success, reach) if r is not None]


def plot(runs: Path, results: Path) -> Path | None:
    """Val greedy success vs env steps, one panel per n: mean over seeds, band from min to max over seeds. A seed's
    curve comes from its run directory or, where that is gone, from its ``success_s<seed>`` record."""
    recorded = recorded_curves(results, BENCH, older_too=True)  # older records' curves were val ones too
    fig, axes = plt.subplots(1, len(NS), figsize=(4.2 * len(NS), 3.4), squeeze=False)
    drawn = False
    for ax, n in zip(axes.flat, NS, strict=True):
        for i, (method, label) in enumerate(METHODS.items()):
            read = sb3_curve if method == "sb3" else metalab_curve
            curves = [
                dict(
                    read(runs / f"{method}-n{n}-s{s}")
                    or map(tuple, recorded.get((f"bitflip-n{n}", label, s), []))
                )
                for s in SEEDS
            ]
            drawn = plot_seeds(ax, curves, label, color=f"C{i}") or drawn  # same colour in every panel
        ax.axhline(THRESHOLD, color="gray", ls=":", lw=1)
        ax.set_title(f"BitFlip n = {n}")
        ax.set_xlabel("environment steps")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 4))  # 300000 as 3e5: no overlapping labels
        ax.set_ylabel("val greedy success (100 episodes)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, drawn, results, BENCH)


def budget_arg(text: str) -> tuple[int, int]:
    n, _, steps = text.partition("=")
    if not (n.isdigit() and steps.isdigit()) or int(n) not in NS or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected N=STEPS with N in {NS}, e.g. 50=300000; got {text!r}")
    return int(n), int(steps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=[*GROUPS, *CONFIGS], metavar="CONFIG",
                   help="configurations (none|final|future|sb3|plain-n{7,15,25,50}-s{0,1,2}) or groups of seeds "
                   "(future-n15) or of a whole n (n15: all but plain); default: all but plain")  # fmt: skip
    p.add_argument("--steps-scale", type=float, default=1.0, help=f"multiply the env-step budgets {BUDGETS}")
    p.add_argument("--budget", type=budget_arg, action="append", default=[], metavar="N=STEPS",
                   help="env-step budget for one n (repeatable; overrides --steps-scale for it)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny networks: 1 is fastest)")
    p.add_argument("--runs-dir", type=Path, default=RUNS, help=f"where run directories go (default {RUNS})")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where bitflip.json/.png go")
    add_provenance_args(p)
    args = parse_args(p, argv)  # a dirty tree is refused here, before any training
    names = expand(args.only, GROUPS, DEFAULT)
    if (
        any(parse(name)[0] == "sb3" for name in names)
        and importlib.util.find_spec("stable_baselines3") is None
    ):
        raise SystemExit(MISSING)
    budgets = {n: max(round(steps * args.steps_scale), 1) for n, steps in BUDGETS.items()}
    budgets.update(dict(args.budget))
    for name in names:
        records = benchmark(name, budgets[parse(name)[1]], args.runs_dir)
        path = merge_results(BENCH, records, args.results_dir)
        merge_results(BENCH, aggregates(path, name), args.results_dir)
        print(path)
        if current_label() is None:  # the figure shows the main records only
            plot(args.runs_dir, args.results_dir)


if __name__ == "__main__":
    main()
