"""SAC on Pendulum-v1: metalab's ``algo: sac`` against Stable-Baselines3's SAC with its defaults.

    python -m benchmarks.sac                                   # both configurations, seeds 0 1 2
    python -m benchmarks.sac --only metalab-pendulum --seeds 0
    python -m benchmarks.sac --steps 300 --results-dir /tmp/sacx --runs-dir /tmp/sacx/runs --allow-dirty  # smoke

``metalab-pendulum`` trains ``configs/sac_pendulum.yaml`` (SB3's SAC defaults wherever metalab has the same knob:
:func:`sb3_kwargs` is the mapping) in ``<runs-dir>/metalab-pendulum-s<seed>``, resuming it when rerun.
``sb3-pendulum`` trains ``stable_baselines3.SAC("MlpPolicy", ...)`` with the same values, from scratch each
time (a few minutes). Both take the same number of env steps (the config's 20,000, or ``--steps``) with the
same seeds, evaluate the deterministic policy on the same 10 val episodes every ``train.eval_every`` env steps
(the learning curve kept in the record; the time it takes counts in both), and after training on the same
100 test episodes (reset seeds derived from ``eval.seed`` and the test part, as metalab's ``test/return``;
never among the val ones).

Records, merged into ``<results-dir>/sac.json``: per seed ``test_return_s<seed>`` (mean over the test
episodes with their 95% CI; ``seconds`` is training wall-clock time, periodic evaluations included), the
aggregate ``test_return`` over the seeds recorded so far (mean with a Student-t 95% CI over seeds, ``per_seed``,
``n``) and, when both configurations trained from scratch in this process, ``seconds_ratio``: metalab's
training seconds over SB3's, summed over the seeds both trained (above 1: metalab is slower), with the per-seed
ratios. Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.

Pendulum-v1 has no reward threshold; a test return above about -200 is what "solved" usually means.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from benchmarks.common import RESULTS, merge_results, parse_args, parser, record
from benchmarks.rl_common import aggregate, seed_metric, train
from metalab.envs.config import make_env
from metalab.experiment import RunConfig, load_run_config
from metalab.rl import sac
from metalab.rl.rollout import derive_seed, run_episodes
from metalab.stats import Estimate, mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.logger import read_metrics
from metalab.train.loop import CHECKPOINT

BENCH = "sac"
TASK = "pendulum"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sac_pendulum.yaml"
RUNS = Path("runs/bench/sac")
CONFIGS = ["metalab-pendulum", "sb3-pendulum"]
METHODS = {"metalab-pendulum": "metalab-sac", "sb3-pendulum": "sb3-sac"}
SEEDS = (0, 1, 2)
TEST_EPISODES = 100
CURVE_METRIC = "val/return"
MISSING = (
    "stable-baselines3 is not installed: `pip install -e '.[bench]'` (or `pip install stable-baselines3`), "
    "or leave sb3-pendulum out of --only"
)


class Trained(NamedTuple):
    """One configuration's outcome on one seed."""

    test: Estimate
    """Return of the deterministic policy over the test episodes."""
    curve: list[tuple[int, float]]
    """(env steps, mean return over the val episodes) of the periodic evaluations."""
    seconds: float
    """Training wall-clock seconds, periodic evaluations included (across resumes for metalab)."""
    steps: int
    """Env steps trained."""
    fresh: bool
    """Trained from scratch in this process (its seconds may enter the speed ratio)."""


def run_config(seed: int, steps: int | None) -> RunConfig:
    """``configs/sac_pendulum.yaml`` for ``seed`` (and ``steps`` env steps, default the config's), on the CPU."""
    overrides = [
        f"seed={seed}",
        f"eval.episodes={TEST_EPISODES}",
        f"eval.batch={TEST_EPISODES}",
        "train.device=cpu",
    ]
    if steps is not None:
        every = max(steps // 10, 1)
        overrides += [f"train.steps={steps}", f"train.eval_every={every}", f"train.checkpoint_every={every}"]
    return load_run_config(CONFIG, overrides)


def sb3_kwargs(run: RunConfig) -> dict[str, Any]:
    """``stable_baselines3.SAC(...)`` keyword arguments equal to ``run``'s settings, knob by knob:

    ========================  ==============================  =============================
    metalab                   SB3 SAC                         configs/sac_pendulum.yaml
    ========================  ==============================  =============================
    train.lr (one Adam)       learning_rate (three Adams)     3e-4
    sac.buffer_size           buffer_size                     1e6
    sac.learning_starts       learning_starts                 100
    sac.batch_size            batch_size                      256
    sac.tau                   tau (target_update_interval 1)  0.005
    sac.gamma                 gamma                           0.99
    one update per env step   train_freq 1, gradient_steps 1  1, 1
    sac.auto_alpha, alpha     ent_coef                        "auto" (learned, from 1.0)
    sac.target_entropy        target_entropy                  "auto" (-dim(A))
    sac.hidden (ReLU)         policy_kwargs net_arch (ReLU)   [256, 256]
    ========================  ==============================  =============================

    SB3 has no reward scale or policy regulariser: those must be off (1 and 0)."""
    cfg: sac.Config = run.params
    if cfg.reward_scale != 1.0 or cfg.policy_reg != 0.0:
        raise ValueError(
            "SB3's SAC has no reward scale or policy regulariser: set sac.reward_scale 1, policy_reg 0"
        )
    if cfg.auto_alpha:
        ent_coef: str | float = "auto" if cfg.alpha == 1.0 else f"auto_{cfg.alpha}"
    else:
        ent_coef = cfg.alpha
    return {
        "learning_rate": run.train.lr,
        "buffer_size": cfg.buffer_size,
        "learning_starts": cfg.learning_starts,
        "batch_size": cfg.batch_size,
        "tau": cfg.tau,
        "gamma": cfg.gamma,
        "train_freq": 1,
        "gradient_steps": 1,
        "ent_coef": ent_coef,
        "target_entropy": "auto" if cfg.target_entropy is None else cfg.target_entropy,
        "policy_kwargs": {"net_arch": list(cfg.hidden)},
    }


def train_metalab(run: RunConfig, run_dir: Path) -> Trained:
    """Train (or resume, or reload a finished) metalab SAC run in ``run_dir`` and test it."""
    fresh = not (run_dir / CHECKPOINT).is_file()
    learner, fitted = train(run, run_dir)
    test = learner.evaluate("test", TEST_EPISODES)
    curve = [(s, v) for s, k, v in read_metrics(run_dir / "metrics.csv") if k == CURVE_METRIC]
    return Trained(
        Estimate(test["test/return"], test["test/return_ci95"], TEST_EPISODES),
        curve,
        fitted.seconds,
        fitted.step,
        fresh,
    )


def train_sb3(run: RunConfig) -> Trained:
    """Train SB3's SAC for ``run.train.steps`` env steps with ``run``'s settings and test it on metalab's test
    episodes (deterministic actions; SB3 maps them onto the env's box itself)."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    envs = [make_env(run.env) for _ in range(min(run.eval.batch, TEST_EPISODES))]
    model = SAC("MlpPolicy", make_env(run.env), seed=run.seed, device="cpu", verbose=0, **sb3_kwargs(run))

    def evaluate(part: str, episodes: int) -> Estimate:
        seeds = [derive_seed(run.eval.seed, PART_INDEX[part], i) for i in range(episodes)]
        return mean_ci95([r.ret for r in run_episodes(envs, act, seeds)])

    def act(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
        return model.predict(obs, deterministic=True)[0]  # (E, A) in the env's box

    curve: list[tuple[int, float]] = []

    class Periodic(BaseCallback):
        """Evaluates the val episodes every ``train.eval_every`` env steps and at the end, as metalab's trainer."""

        def _on_step(self) -> bool:
            t = self.num_timesteps  # counts the env step just taken
            if t % run.train.eval_every == 0 or t == run.train.steps:
                curve.append((t, evaluate("val", run.train.eval_episodes).mean))
            return True

    start = time.perf_counter()
    model.learn(run.train.steps, callback=Periodic())
    seconds = time.perf_counter() - start
    return Trained(evaluate("test", TEST_EPISODES), curve, seconds, run.train.steps, True)


def seed_record(name: str, run: RunConfig, out: Trained) -> dict[str, Any]:
    settings = (
        {"config": f"configs/{CONFIG.name}"} if name.startswith("metalab") else {"sb3": "SAC('MlpPolicy')"}
    )
    return record(BENCH, TASK, METHODS[name], seed_metric("test_return", run.seed), out.test.mean,
                  ci95=out.test.ci95, unit="return", steps=out.steps, seconds=out.seconds, seed=run.seed,
                  env=run.env.id, test_episodes=TEST_EPISODES, eval_every=run.train.eval_every,
                  eval_episodes=run.train.eval_episodes, threads=torch.get_num_threads(), deterministic=True,
                  hyperparameters=sb3_kwargs(run), curve=[list(p) for p in out.curve], curve_metric=CURVE_METRIC,
                  **settings)  # fmt: skip


def speed_ratio(outcomes: dict[str, dict[int, Trained]]) -> dict[str, Any] | None:
    """metalab's training seconds over SB3's, over the seeds both trained from scratch in this process."""
    mine, peer = outcomes.get("metalab-pendulum", {}), outcomes.get("sb3-pendulum", {})
    seeds = sorted(s for s in mine.keys() & peer.keys() if mine[s].fresh and peer[s].fresh)
    if not seeds:
        return None
    ratio = sum(mine[s].seconds for s in seeds) / sum(peer[s].seconds for s in seeds)
    return record(BENCH, TASK, METHODS["metalab-pendulum"], "seconds_ratio", ratio, unit="metalab / sb3 seconds",
                  steps=mine[seeds[0]].steps, seeds=seeds,
                  per_seed=[mine[s].seconds / peer[s].seconds for s in seeds],
                  metalab_seconds=[mine[s].seconds for s in seeds], sb3_seconds=[peer[s].seconds for s in seeds],
                  threads=torch.get_num_threads())  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds of each configuration")
    p.add_argument("--steps", type=int, help="env steps of every run (default: the config's train.steps)")
    p.add_argument("--runs-dir", type=Path, default=RUNS, help=f"where metalab's run directories go ({RUNS})")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where sac.json goes")
    p.set_defaults(threads=1)  # small networks, one env: one thread each is fastest, and fair to both
    args = parse_args(p, argv)  # a dirty tree is refused here, before any training
    names = args.only or CONFIGS
    if "sb3-pendulum" in names:
        try:
            import stable_baselines3  # noqa: F401
        except ImportError:
            raise SystemExit(MISSING) from None
    outcomes: dict[str, dict[int, Trained]] = {}
    for name in names:
        for seed in args.seeds:
            run = run_config(seed, args.steps)
            out = (
                train_metalab(run, args.runs_dir / f"{name}-s{seed}")
                if name.startswith("metalab")
                else train_sb3(run)
            )
            outcomes.setdefault(name, {})[seed] = out
            print(f"{name}-s{seed}: test return {out.test.mean:.1f} ± {out.test.ci95:.1f} over {TEST_EPISODES} "
                  f"episodes after {run.train.steps} env steps, {out.seconds:.0f} s")  # fmt: skip
            path = merge_results(BENCH, [seed_record(name, run, out)], args.results_dir)
            over_seeds = aggregate(json.loads(path.read_text()), BENCH, TASK, METHODS[name], "test_return", "return",
                                   test_episodes=TEST_EPISODES, env=run.env.id)  # fmt: skip
            merge_results(BENCH, [over_seeds], args.results_dir)
    ratio = speed_ratio(outcomes)
    if ratio is not None:
        merge_results(BENCH, [ratio], args.results_dir)
        print(f"speed: metalab takes {ratio['value']:.2f}x SB3's training time (seeds {ratio['seeds']})")
    print(args.results_dir / f"{BENCH}.json")


if __name__ == "__main__":
    main()
