"""Model-based RL: multi-task planning on held-out goals (known vs learned reward), and PETS on five tasks.

    python -m benchmarks.mbrl                                      # both configurations, seeds 0 1 2
    python -m benchmarks.mbrl --only multitask-point-mass --seeds 0
    python -m benchmarks.mbrl --only pets-pendulum --seeds 0 --set train.steps=1400 --results-dir /tmp/mb \\
        --runs-dir /tmp/mb/runs --allow-dirty                      # a smoke run

``multitask-point-mass`` trains ``configs/mt_mbrl_point_mass.yaml`` (:mod:`metalab.rl.multitask_mbrl`: one
dynamics ensemble for the point-mass goal family, a reward model ``r_theta(s, a, s', z)`` with a learned
embedding per training goal) and tests it once on the 20 held-out test goals, one episode each, planned two
ways with the same dynamics model: against the goal's true reward (``known``) and against the learned reward
with ``z`` inferred from a few random transitions in the new task (``learned``). ``pets-pendulum`` trains
``configs/mbrl_pendulum.yaml`` (:mod:`metalab.rl.mbrl`, PETS) and tests it on ``eval.episodes`` episodes;
``pets-cartpole-swingup`` trains PETS on metalab's cart-pole swing-up (``metalab/CartPoleSwingUp-v0``,
PETS's cartpole task, :mod:`metalab.envs.cartpole_swingup`; ``configs/mbrl_cartpole_swingup.yaml``: 1 random
and 15 MPC episodes, 3,200 env steps; the best return is about 180, hanging still about 3.5);
``pets-inverted-pendulum`` and ``pets-half-cheetah`` train PETS on the MuJoCo
``InvertedPendulum-v5`` (1,000 steps per episode at most; 1,000 is the best return) and ``HalfCheetah-v5`` at
a CPU-sized budget (``configs/mbrl_half_cheetah.yaml``: 1,000-step episodes, 1 random and 6 MPC episodes,
7,000 env steps, a smaller planner than PETS's; about an hour per seed on one thread, its measured sizing in
the config), and ``pets-reacher`` on the MuJoCo
``Reacher-v5`` goal family (``configs/mbrl_reacher.yaml``: 50-step episodes, each reset drawing a new target,
which is in the observation; 5 random and 20 MPC episodes, 1,250 env steps; tested on 20 episodes, so 20
targets; random actions score about -43, a good controller -4 to -6), all three need the ``mujoco`` extra;
``sac-pendulum-2200`` trains ``configs/sac_pendulum.yaml`` (SAC) for PETS's 2,200 env steps and tests it on as
many episodes (the sample-efficiency comparison); ``sac-cartpole-swingup-3200`` and ``-20000`` train ``configs/sac_cartpole_swingup.yaml`` for
``pets-cartpole-swingup``'s 3,200 env steps and for 20,000 (val every 1,000; about 4 minutes a seed), tested
on its 10 episodes; ``sac-half-cheetah-7000`` likewise trains
``configs/sac_half_cheetah.yaml`` for ``pets-half-cheetah``'s 7,000 env steps (val every 1,000: the return
against env steps; about 2 minutes a seed), tested on its 2 episodes, and ``sac-half-cheetah-100000`` for the
config's own 100,000 env steps (val every 5,000: how many env steps SAC needs to reach PETS's return; about
25 minutes a seed), tested on the same 2 episodes. ``mbrl-lib-pets-pendulum``,
``mbrl-lib-pets-cartpole-swingup`` and ``mbrl-lib-pets-half-cheetah`` are the peers of ``pets-pendulum``,
``pets-cartpole-swingup`` and ``pets-half-cheetah`` (and ``mbrl-lib-pets-cartpole-swingup-metalab-fit``, method
``mbrl-lib-pets-metalab-fit``, the swing-up peer with metalab's model training): mbrl-lib's PETS
(:mod:`benchmarks.mbrl_lib_pets`, its ``--task``) at the same env steps and, where both libraries have the knob,
the same sizes, tested on the same test episodes (reset seeds); the half-cheetah peer takes about as long per
seed as ``pets-half-cheetah`` (its planning call costs about the same). mbrl-lib does not install beside
metalab: ``mbrl`` 0.2.0 pins ``hydra-core==1.0.3``, whose dataclasses fail to import on Python 3.11 ("mutable
default ... for field override_dirname is not allowed"), ``omegaconf<2.1`` and ``gymnasium==0.26.3``
(metalab needs gymnasium 1.x; 0.26.3 has no ``HalfCheetah-v5`` and uses ``np.bool8``, gone in NumPy 2). It runs
in its own environment, with hydra-core, omegaconf and gymnasium raised past the pins (mbrl-lib's code that
these scripts use runs unchanged with them; gymnasium is metalab's version, so both libraries step the same
envs; the pendulum peer's first records, bd045cd, ran gymnasium 0.26.3) and NumPy below 2. pip refuses the raised pins in the same command as ``mbrl``, so they go second::

    python3 -m venv .venv-mbrl
    .venv-mbrl/bin/pip install torch==2.13.0 mbrl==0.2.0 "numpy<2"
    .venv-mbrl/bin/pip install hydra-core==1.3.2 omegaconf==2.3.0 "gymnasium[mujoco]==1.4.0" "numpy<2"
    python -m benchmarks.mbrl --only mbrl-lib-pets-pendulum mbrl-lib-pets-half-cheetah --mbrl-python .venv-mbrl/bin/python

Each run trains in ``<runs-dir>/<config>-s<seed>``, resuming it when rerun (a changed config is refused);
``--set KEY=VALUE`` overrides a key of every selected configuration (pair it with ``--only``).

Records, merged into ``<results-dir>/mbrl.json``: per seed (metric ``..._s<seed>``, ``ci95`` over the test
goals or episodes, ``seconds`` the training wall-clock time with its periodic val evaluations) and the
aggregate over the seeds recorded so far (mean with a Student-t 95% CI over seeds, ``per_seed``, ``n``):
``test_return_known``, ``test_success_known``, ``test_return_learned``, ``test_success_learned``,
``test_reward_rmse`` and ``test_reward_rmse_mean_z`` (the learned reward's error on the known episodes'
transitions with the inferred and with the mean embedding) for the point mass; ``test_return`` for the others.
The planner ablation and planning speed: :mod:`benchmarks.planning`.
Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.

References: success is the final position within 0.1 of the goal (:mod:`metalab.envs.point_mass`); a planner
that stays at the origin scores a return of about -35 and never succeeds. Pendulum-v1 has no reward threshold;
a return above about -200 is what "solved" usually means.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.common import RESULTS, add_set_arg, merge_results, parse_args, parser, record
from benchmarks.rl_common import aggregate, seed_metric, train
from metalab.experiment import RunConfig, load_run_config
from metalab.rl.rollout import derive_seed
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX

BENCH = "mbrl"
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
RUNS = Path("runs/bench/mbrl")
SEEDS = (0, 1, 2)


class Setup(NamedTuple):
    """One benchmark configuration."""

    config: str
    """File in ``configs/``."""
    task: str
    method: str
    metrics: dict[str, str]
    """Record metric -> the learner's ``test/...`` key (its ``_ci95`` key, when it has one, gives the CI)."""
    units: dict[str, str]
    """Record metric -> unit."""
    overrides: tuple[str, ...] = ()
    """Config overrides of this configuration (before ``--set``'s)."""


POINT_MASS_METRICS = ("return_known", "success_known", "return_learned", "success_learned", "reward_rmse",
                      "reward_rmse_mean_z")  # fmt: skip
SETUPS = {
    "multitask-point-mass": Setup(
        "mt_mbrl_point_mass.yaml",
        "point-mass-goals",
        "metalab-mt-mbrl",
        {f"test_{key}": f"test/{key}" for key in POINT_MASS_METRICS},
        {"return": "return", "success": "success rate", "reward": "reward units (RMSE)"},
    ),
    "pets-pendulum": Setup(
        "mbrl_pendulum.yaml", "pendulum", "metalab-pets", {"test_return": "test/return"}, {"return": "return"}
    ),
    "pets-inverted-pendulum": Setup(
        "mbrl_inverted_pendulum.yaml",
        "inverted-pendulum",
        "metalab-pets",
        {"test_return": "test/return"},
        {"return": "return"},
    ),
    "pets-cartpole-swingup": Setup(
        "mbrl_cartpole_swingup.yaml",
        "cartpole-swingup",
        "metalab-pets",
        {"test_return": "test/return"},
        {"return": "return"},
    ),
    "pets-half-cheetah": Setup(
        "mbrl_half_cheetah.yaml",
        "half-cheetah",
        "metalab-pets",
        {"test_return": "test/return"},
        {"return": "return"},
    ),
    "pets-reacher": Setup(
        "mbrl_reacher.yaml", "reacher", "metalab-pets", {"test_return": "test/return"}, {"return": "return"}
    ),
    # Our SAC at PETS's env steps (200 random + 10 MPC episodes = 2,200), tested on as many episodes.
    "sac-pendulum-2200": Setup(
        "sac_pendulum.yaml",
        "pendulum",
        "metalab-sac-2200",
        {"test_return": "test/return"},
        {"return": "return"},
        (
            "train.steps=2200",
            "train.eval_every=1100",
            "train.checkpoint_every=1100",
            "eval.episodes=10",
            "eval.batch=10",
        ),
    ),
    # Our SAC at PETS's env steps (1,000 random + 6 MPC episodes = 7,000), tested on as many episodes; val
    # every 1,000 env steps (the return against env steps).
    "sac-half-cheetah-7000": Setup(
        "sac_half_cheetah.yaml",
        "half-cheetah",
        "metalab-sac-7000",
        {"test_return": "test/return"},
        {"return": "return"},
        (
            "train.steps=7000",
            "train.eval_every=1000",
            "train.checkpoint_every=1000",
            "eval.episodes=2",
            "eval.batch=2",
        ),
    ),
    # Our SAC at PETS's env steps on the swing-up (200 random + 15 MPC episodes = 3,200), tested on as many
    # episodes, and at its config's 20,000 (val every 1,000: how many env steps SAC needs to reach PETS's return).
    "sac-cartpole-swingup-3200": Setup(
        "sac_cartpole_swingup.yaml",
        "cartpole-swingup",
        "metalab-sac-3200",
        {"test_return": "test/return"},
        {"return": "return"},
        ("train.steps=3200", "train.checkpoint_every=800", "train.eval_every=800"),
    ),
    "sac-cartpole-swingup-20000": Setup(
        "sac_cartpole_swingup.yaml",
        "cartpole-swingup",
        "metalab-sac-20000",
        {"test_return": "test/return"},
        {"return": "return"},
    ),
    # Our SAC at its own config's 100,000 env steps (val every 5,000: how many env steps SAC needs to reach
    # PETS's return), tested on PETS's number of episodes.
    "sac-half-cheetah-100000": Setup(
        "sac_half_cheetah.yaml",
        "half-cheetah",
        "metalab-sac-100000",
        {"test_return": "test/return"},
        {"return": "return"},
        ("eval.episodes=2", "eval.batch=2"),
    ),
}


PEER_METHOD, PEER_PACKAGE = "mbrl-lib-pets", "mbrl==0.2.0"


class Peer(NamedTuple):
    """mbrl-lib's PETS on the task of one of metalab's PETS setups (:mod:`benchmarks.mbrl_lib_pets`)."""

    setup: str
    """The metalab setup whose test episodes (reset seeds) the peer is tested on."""
    task: str
    """The script's ``--task``."""
    method: str = PEER_METHOD
    """The records' method (a variant of the peer has its own)."""


PEERS = {
    "mbrl-lib-pets-pendulum": Peer("pets-pendulum", "pendulum"),
    "mbrl-lib-pets-cartpole-swingup": Peer("pets-cartpole-swingup", "cartpole-swingup"),
    "mbrl-lib-pets-cartpole-swingup-metalab-fit": Peer(
        "pets-cartpole-swingup", "cartpole-swingup-metalab-fit", "mbrl-lib-pets-metalab-fit"
    ),
    "mbrl-lib-pets-half-cheetah": Peer("pets-half-cheetah", "half-cheetah"),
}
CONFIGS = [*SETUPS, *PEERS]


def unit(setup: Setup, metric: str) -> str:
    """The unit of ``metric`` (``test_success_known`` -> ``success rate``)."""
    return setup.units[metric.removeprefix("test_").split("_")[0]]


def run_config(name: str, seed: int, overrides: list[str]) -> RunConfig:
    """Configuration ``name``'s config for ``seed``, on the CPU, with ``overrides`` last."""
    setup = SETUPS[name]
    return load_run_config(CONFIGS_DIR / setup.config, [f"seed={seed}", "train.device=cpu", *setup.overrides,
                                                        *overrides])  # fmt: skip


def benchmark(name: str, seed: int, overrides: list[str], runs: Path) -> list[dict[str, Any]]:
    """Train (or resume, or reload a finished) run of configuration ``name``, test it once; its records."""
    setup = SETUPS[name]
    run = run_config(name, seed, overrides)
    learner, fitted = train(run, runs / f"{name}-s{seed}")
    test = learner.evaluate("test", run.eval.episodes)
    print(f"{name}-s{seed} ({fitted.step} steps, {fitted.seconds:.0f} s): "
          + ", ".join(f"{m} {test[k]:.3f}" for m, k in setup.metrics.items()))  # fmt: skip
    common = {"seed": seed, "config": f"configs/{setup.config}", "env": run.env.id,
              "test_episodes": run.eval.episodes, "overrides": overrides, "threads": torch.get_num_threads()}  # fmt: skip
    return [
        record(BENCH, setup.task, setup.method, seed_metric(metric, seed), test[key],
               ci95=test.get(f"{key}_ci95"), unit=unit(setup, metric), steps=fitted.step,
               seconds=fitted.seconds, metric_key=key, **common)
        for metric, key in setup.metrics.items()
    ]  # fmt: skip


def over_seeds(name: str, path: Path, run: RunConfig) -> list[dict[str, Any]]:
    """The aggregate records over the seeds of ``name`` recorded in ``path``."""
    setup = SETUPS[name]
    records = json.loads(path.read_text())
    found = [
        aggregate(records, BENCH, setup.task, setup.method, metric, unit(setup, metric),
                  config=f"configs/{setup.config}", env=run.env.id, test_episodes=run.eval.episodes)
        for metric in setup.metrics
    ]  # fmt: skip
    return [r for r in found if r is not None]


def peer_command(name: str, seed: int, python: Path) -> list[str]:
    """The command that runs peer ``name`` for ``seed``: the script with its task and the reset seeds of the test
    episodes of the metalab setup it is the peer of."""
    mine = PEERS[name]
    run = run_config(mine.setup, seed, [])
    seeds = [derive_seed(run.eval.seed, PART_INDEX["test"], i) for i in range(run.eval.episodes)]
    return [str(python), "-m", "benchmarks.mbrl_lib_pets", "--task", mine.task, "--seed", str(seed),
            "--test-seeds", *map(str, seeds)]  # fmt: skip


def peer(name: str, seed: int, python: Path) -> list[dict[str, Any]]:
    """mbrl-lib's PETS (:mod:`benchmarks.mbrl_lib_pets`, run by ``python``) on peer ``name``'s task, tested on
    the episodes its metalab setup is tested on; its records."""
    mine = PEERS[name]
    run = run_config(mine.setup, seed, [])
    command = peer_command(name, seed, python)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # stdout carries the result; stderr (its progress lines, or a traceback) passes through to ours.
    done = subprocess.run(
        command, cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed with exit code {done.returncode} (its stderr is above)")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    test = mean_ci95(out["test_returns"])
    print(
        f"{name}-s{seed} ({out['env_steps']} env steps, {out['seconds']:.0f} s): test_return {test.mean:.3f}"
    )
    return [record(BENCH, SETUPS[mine.setup].task, mine.method, seed_metric("test_return", seed), test.mean,
                   ci95=test.ci95, unit="return", steps=out["env_steps"], seconds=out["seconds"], seed=seed,
                   env=run.env.id, test_episodes=len(out["test_returns"]), train_returns=out["train_returns"],
                   package=PEER_PACKAGE, metric_key="test/return")]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds of each configuration")
    add_set_arg(p)
    p.add_argument("--runs-dir", type=Path, default=RUNS, help=f"where run directories go (default {RUNS})")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where mbrl.json goes")
    p.add_argument("--mbrl-python", type=Path, default=Path(".venv-mbrl/bin/python"),
                   help=f"the Python of an environment with mbrl-lib, for {' and '.join(PEERS)} (see above)")  # fmt: skip
    p.set_defaults(threads=1)  # small networks, one env at a time: one thread is fastest
    args = parse_args(p, argv)  # a dirty tree is refused here, before any training
    for name in args.only or CONFIGS:
        for seed in args.seeds:
            if name in PEERS:
                path = merge_results(BENCH, peer(name, seed, args.mbrl_python), args.results_dir)
                records = json.loads(path.read_text())
                mine, method = PEERS[name].setup, PEERS[name].method
                found = aggregate(records, BENCH, SETUPS[mine].task, method, "test_return", "return",
                                  env=run_config(mine, seed, []).env.id, package=PEER_PACKAGE)  # fmt: skip
                merge_results(BENCH, [found] if found else [], args.results_dir)
                continue
            path = merge_results(
                BENCH, benchmark(name, seed, args.overrides, args.runs_dir), args.results_dir
            )
            merge_results(
                BENCH, over_seeds(name, path, run_config(name, seed, args.overrides)), args.results_dir
            )
    print(args.results_dir / f"{BENCH}.json")


if __name__ == "__main__":
    main()
