"""REINFORCE with a learned baseline on CartPole-v1 and Pendulum-v1: average return of the trained policy.

    python -m benchmarks.reinforce                       # both environments, seeds 0-2
    python -m benchmarks.reinforce --only cartpole-s0    # one configuration
    python -m benchmarks.reinforce --only pendulum --updates-scale 0.5

Each configuration trains ``configs/reinforce_<env>.yaml`` (seed set per configuration) for a budget of
``BUDGETS`` updates (each on a fresh batch of whole episodes; ``--updates-scale`` scales it), capped by
``--minutes`` of training time, in ``<runs-dir>/<config>``, resuming it when rerun. The trained policy is then
evaluated on 100 fixed test episodes two ways: ``return_greedy`` takes the most likely action (argmax of the
logits, or the Gaussian's mean) and ``return_sampled`` samples from the policy, as during training. Per-seed
records (``return_greedy_s0``; their CI over the test episodes) and the aggregate over seeds recorded so far
(mean with a Student-t 95% CI over seeds, ``per_seed`` and ``n``) are merged into ``<results-dir>/reinforce.json``.
Training evaluates the val episodes only; the test episodes are played once, after training. Provenance flags
(``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.

Targets: CartPole-v1 average greedy return >= 475 over 100 episodes (500 is the cap; the issue's target,
after Gymnasium's 475 reward threshold for v1). Pendulum-v1 has no reward threshold; the config reaches a
greedy return of about -160 within its 300 updates (random policy: about -1200; Williams 1992 is the method).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, add_provenance_args, merge_results, parse_args, record
from benchmarks.rl_common import aggregate, expand, seed_metric, train
from metalab.envs.config import make_env
from metalab.experiment import RunConfig, load_run_config
from metalab.rl import reinforce
from metalab.rl.rollout import derive_seed, run_episodes
from metalab.stats import Estimate, mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.loop import Learner

BENCH = "reinforce"
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
RUNS = Path("runs/bench/reinforce")
ENVS = {"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1"}
SEEDS = (0, 1, 2)
BUDGETS = {"cartpole": 150, "pendulum": 300}  # updates; episodes per update: the config's (8 and 16)
TARGETS = {"cartpole": 475.0}  # greedy return
REFERENCE = {
    "cartpole": "target >= 475 average return over 100 episodes (Gymnasium's CartPole-v1 reward threshold)",
    "pendulum": "configs/reinforce_pendulum.yaml: greedy return about -160 after 300 updates (random: ~-1200)",
}
TEST_EPISODES = 100
CONFIGS = [f"{env}-s{seed}" for env in ENVS for seed in SEEDS]
GROUPS = {env: [f"{env}-s{seed}" for seed in SEEDS] for env in ENVS}


def run_config(env: str, seed: int, updates: int, minutes: float) -> RunConfig:
    overrides = [f"seed={seed}", f"train.steps={updates}", f"train.max_minutes={minutes}",
                 f"train.eval_every={max(updates // 10, 1)}", f"train.checkpoint_every={max(updates // 10, 1)}",
                 f"eval.episodes={TEST_EPISODES}", "train.device=cpu"]  # fmt: skip
    return load_run_config(CONFIGS_DIR / f"reinforce_{env}.yaml", overrides)


def sampled_return(learner: Learner, run: RunConfig, episodes: int) -> Estimate:
    """Average return over the test episodes with actions sampled from the policy (seeded: repeatable)."""
    model: reinforce.PolicyValue = learner.model  # type: ignore[assignment]
    envs = [make_env(run.env) for _ in range(min(run.eval.batch, episodes))]
    params = dict(model.named_parameters())
    generator_state = torch.get_rng_state()
    torch.manual_seed(run.eval.seed)

    def act(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
        with torch.no_grad():
            out, _ = model(torch.cat([torch.from_numpy(obs), torch.from_numpy(goal)], -1))  # (E, A)
            return reinforce.distribution(model, params, out).sample().numpy()

    seeds = [derive_seed(run.eval.seed, PART_INDEX["test"], i) for i in range(episodes)]
    try:
        return mean_ci95([r.ret for r in run_episodes(envs, act, seeds)])
    finally:
        torch.set_rng_state(generator_state)


def benchmark(name: str, updates: int, minutes: float, runs: Path) -> list[dict]:
    """Train (or resume) configuration ``name``; its per-seed records."""
    env, seed = name.rsplit("-s", 1)[0], int(name.rsplit("-s", 1)[1])
    run = run_config(env, seed, updates, minutes)
    learner, fitted = train(run, runs / name)
    greedy = learner.evaluate("test", TEST_EPISODES)
    sampled = sampled_return(learner, run, TEST_EPISODES)
    episodes = run.params.episodes
    print(f"{name}: return greedy {greedy['test/return']:.1f} ± {greedy['test/return_ci95']:.1f}, sampled "
          f"{sampled.mean:.1f} ± {sampled.ci95:.1f} after {fitted.step} updates x {episodes} episodes, "
          f"{fitted.seconds:.0f} s" + (f" (target {TARGETS[env]})" if env in TARGETS else ""))  # fmt: skip
    common = {"seed": seed, "budget_updates": updates, "episodes_per_update": episodes,
              "episodes": fitted.step * episodes, "budget_minutes": minutes, "test_episodes": TEST_EPISODES,
              "config": f"configs/reinforce_{env}.yaml", "reference": REFERENCE[env],
              "threads": torch.get_num_threads()}  # fmt: skip
    return [
        record(BENCH, ENVS[env], "metalab-reinforce", seed_metric("return_greedy", seed), greedy["test/return"],
               ci95=greedy["test/return_ci95"], unit="return", steps=fitted.step, seconds=fitted.seconds,
               target=TARGETS.get(env), actions="greedy (argmax / Gaussian mean)", metric_key="test/return", **common),
        record(BENCH, ENVS[env], "metalab-reinforce", seed_metric("return_sampled", seed), sampled.mean,
               ci95=sampled.ci95, unit="return", steps=fitted.step, seconds=fitted.seconds,
               actions="sampled from the policy", **common),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=[*GROUPS, *CONFIGS], metavar="CONFIG",
                   help=f"configurations ({', '.join(CONFIGS)}) or groups ({', '.join(GROUPS)}); default: all")  # fmt: skip
    p.add_argument("--updates-scale", type=float, default=1.0, help=f"multiply the update budgets {BUDGETS}")
    p.add_argument("--minutes", type=float, default=15.0, help="training time cap per configuration")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny networks: 1 is fastest)")
    p.add_argument("--runs-dir", type=Path, default=RUNS, help=f"where run directories go (default {RUNS})")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where reinforce.json goes")
    add_provenance_args(p)
    args = parse_args(p, argv)  # a dirty tree is refused here, before any training
    for name in expand(args.only, GROUPS, CONFIGS):
        env = name.rsplit("-s", 1)[0]
        updates = max(round(BUDGETS[env] * args.updates_scale), 1)
        path = merge_results(BENCH, benchmark(name, updates, args.minutes, args.runs_dir), args.results_dir)
        records = json.loads(path.read_text())
        summary = [
            aggregate(records, BENCH, ENVS[env], "metalab-reinforce", metric, "return", **extra)
            for metric, extra in (("return_greedy", {"target": TARGETS.get(env)}), ("return_sampled", {}))
        ]
        print(merge_results(BENCH, [r for r in summary if r is not None], args.results_dir))


if __name__ == "__main__":
    main()
