"""MPC planners: planning speed against a Python loop over candidates, and a planner ablation on Pendulum and on
Reacher goals.

    python -m benchmarks.planning                          # all three configurations
    python -m benchmarks.planning --only speed             # about 2 minutes on one core
    python -m benchmarks.planning --only ablation-pendulum --runs-dir runs/bench/mbrl

``speed``: one planning call is PETS's CEM for one start state (5 rounds of 500 candidate sequences of 30
actions, 20 particles per sequence propagated TSinf) through a 5-member probabilistic ensemble of 4 x 200 SiLU
units (PETS's HalfCheetah model) with HalfCheetah's sizes (17-d observations, 6-d actions), randomly
initialised (speed does not depend on the weights). ``metalab`` is :func:`metalab.rl.planners.cem` with
:func:`metalab.rl.dynamics.trajectory_sampling`: every round rolls all candidates and particles out in one
batched pass per time step. ``python-loop`` is the same CEM, the same ensemble code, with the rollout called once
per candidate sequence (what a user writes who loops over candidates). Records: calls per second of each, and
their ratio, measured in the same process.

The ablations (:func:`ablation`, one per row of :data:`ABLATIONS`): one trained PETS model, the seed-0 run of a
:mod:`benchmarks.mbrl` configuration (trained, or reloaded, in ``<runs-dir>/<configuration>-s0``), tested once
on the same test episodes (reset seeds) with each planner at about the same compute per env step, counted in
predicted sequences of the config's horizon and particles: random shooting of 1,000 sequences, CEM 5 x 200 (the
config's), MPPI 5 x 200 (temperature 1, the default: not tuned), and gradient planning: 20 Adam steps (step
size 0.05, the default) from CEM's plan (5 x 200 + 20 forward-backward passes of one sequence, about 1,060
sequences' worth). Everything else is the config's (model, particles, horizon, the warm start).

- ``ablation-pendulum``: ``pets-pendulum`` (``configs/mbrl_pendulum.yaml``: sequences of 25 actions, 10
  particles), 10 test episodes of 200 steps.
- ``ablation-reacher``: ``pets-reacher`` (``configs/mbrl_reacher.yaml``, MuJoCo ``Reacher-v5``: sequences of 15
  actions, 10 particles), 20 test episodes of 50 steps, each reset drawing a new target (the goal family: the
  target is in the observation, so one model and the known reward plan for every goal). Needs the ``mujoco``
  extra.

Records (task ``<env>-pets-model``): test return with its 95% CI over the episodes, and the seconds per env
step (the test episodes' wall-clock time over their env steps; neither task terminates, so every episode runs
to its time limit; the episodes run ``eval.batch`` at a time, so a step's planning is shared by that many start
states). Nothing here was chosen on the test episodes.

Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks import mbrl as mbrl_bench
from benchmarks.common import RESULTS, merge_results, parse_args, parser, record
from benchmarks.mbrl import RUNS
from benchmarks.rl_common import train
from metalab.envs.config import make_env
from metalab.experiment import algorithm
from metalab.rl.dynamics import Ensemble, trajectory_sampling
from metalab.rl.env_models import env_model
from metalab.rl.planners import Bounds, PlannerConfig, RolloutFn, cem

BENCH = "planning"

# PETS's HalfCheetah planning problem (Chua et al. 2018, appendix): model, particles, CEM.
OBS_DIM, ACT_DIM, HIDDEN, MEMBERS, PARTICLES = 17, 6, (200, 200, 200, 200), 5, 20
SPEED_PLANNER = PlannerConfig(method="cem", horizon=30, candidates=500, iterations=5, elites=50)


class Ablation(NamedTuple):
    """One planner ablation: which trained model, which test episodes, which planners."""

    setup: str
    """The :mod:`benchmarks.mbrl` configuration whose seed-0 model every planner plans with."""
    task: str
    """The records' task."""
    episodes: int
    """Test episodes, the same for every planner."""
    planners: dict[str, tuple[str, ...]]
    """Planner -> overrides of the configuration's config, about 1,000 predicted sequences per env step each."""


PLANNERS = {  # overrides of a config whose planner is CEM 5 x 200
    "random": ("mbrl.planner.method=random", "mbrl.planner.candidates=1000"),
    "cem": (),
    "mppi": ("mbrl.planner.method=mppi",),
    "gradient": ("mbrl.planner.method=gradient", "mbrl.planner.grad_init=cem", "mbrl.planner.grad_steps=20"),
}
ABLATIONS = {
    "ablation-pendulum": Ablation("pets-pendulum", "pendulum-pets-model", 10, PLANNERS),
    "ablation-reacher": Ablation("pets-reacher", "reacher-pets-model", 20, PLANNERS),
}
CONFIGS = ["speed", *ABLATIONS]


def per_candidate(rollout: RolloutFn) -> RolloutFn:
    """``rollout`` called once per candidate sequence: the Python loop the batched rollout replaces."""

    def looped(state: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.cat(
            [rollout(state, actions[:, n : n + 1], generator) for n in range(actions.shape[1])], 1
        )

    return looped


def calls_per_second(call: Callable[[], Any], min_seconds: float, min_calls: int) -> tuple[float, int, float]:
    """``(calls per second, calls, seconds)`` of ``call`` repeated until both minimums are met (after one
    warm-up call)."""
    call()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        call()
        calls += 1
    seconds = time.perf_counter() - start
    return calls / seconds, calls, seconds


def speed() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = Ensemble(OBS_DIM, ACT_DIM, HIDDEN, MEMBERS, probabilistic=True)
    params, norm = {k: v.detach() for k, v in model.params().items()}, model.normalizer()

    def rollout(
        state: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return trajectory_sampling(
            params, norm, state, actions, PARTICLES, "tsinf", generator=generator
        ).states

    def reward(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return next_obs[..., 8] - 0.1 * (action**2).sum(-1)  # HalfCheetah's shape: x-velocity, control cost

    bounds = Bounds(-torch.ones(ACT_DIM), torch.ones(ACT_DIM))
    state = torch.randn(1, OBS_DIM)
    generator = torch.Generator().manual_seed(0)
    rates = {}
    with torch.no_grad():
        for method, fn, min_seconds, min_calls in (("metalab", rollout, 20.0, 5),
                                                   ("python-loop", per_candidate(rollout), 20.0, 2)):  # fmt: skip
            rate, calls, seconds = calls_per_second(
                lambda fn=fn: cem(fn, reward, state, bounds, SPEED_PLANNER, None, generator=generator),
                min_seconds,
                min_calls,
            )
            rates[method] = (rate, calls, seconds)
            print(f"speed {method}: {rate:.3f} planning calls/s ({calls} calls in {seconds:.1f} s)")
    task = f"pets-cem-e{MEMBERS}-pop{SPEED_PLANNER.candidates}-h{SPEED_PLANNER.horizon}"
    common = {"particles": PARTICLES, "hidden": list(HIDDEN), "obs_dim": OBS_DIM, "act_dim": ACT_DIM,
              "iterations": SPEED_PLANNER.iterations, "threads": torch.get_num_threads()}  # fmt: skip
    out = [
        record(
            BENCH,
            task,
            method,
            "planning_calls_per_s",
            rate,
            unit="calls/s",
            steps=calls,
            seconds=seconds,
            **common,
        )
        for method, (rate, calls, seconds) in rates.items()
    ]
    ratio = rates["metalab"][0] / rates["python-loop"][0]
    print(f"speed: metalab / python-loop = {ratio:.1f}x")
    out.append(record(BENCH, task, "metalab", "speedup_vs_python_loop", ratio, unit="x", **common))
    return out


def ablation(name: str, runs: Path) -> list[dict[str, Any]]:
    """Ablation ``name`` (:data:`ABLATIONS`): train or reload its model, test it with every planner; the records."""
    setup = ABLATIONS[name]
    run_dir = runs / f"{setup.setup}-s0"
    base = mbrl_bench.run_config(setup.setup, 0, [])
    trained, fitted = train(base, run_dir)
    assert env_model(base.env.id).done is None, f"{base.env.id} terminates: count the env steps instead"
    env = make_env(base.env)
    env_steps = setup.episodes * env.spec.max_episode_steps  # every episode runs to the limit
    env.close()
    out = []
    for method, overrides in setup.planners.items():
        run = mbrl_bench.run_config(setup.setup, 0, list(overrides))
        learner = algorithm(run.algo).build(run, Path("unused"), torch.device("cpu"))
        learner.model.load_state_dict(trained.model.state_dict())
        learner.model.eval()
        start = time.perf_counter()
        test = learner.evaluate("test", setup.episodes)
        seconds = time.perf_counter() - start
        per_step = seconds / env_steps
        print(f"{name} {method}: test return {test['test/return']:.2f} +- {test['test/return_ci95']:.2f}, "
              f"{per_step:.3f} s per env step")  # fmt: skip
        common = {"model": str(run_dir), "model_steps": fitted.step, "model_seconds": fitted.seconds,
                  "config": f"configs/{mbrl_bench.SETUPS[setup.setup].config}", "env": run.env.id,
                  "overrides": list(overrides), "test_episodes": setup.episodes, "env_steps": env_steps,
                  "threads": torch.get_num_threads()}  # fmt: skip
        out += [
            record(BENCH, setup.task, method, "test_return", test["test/return"],
                   ci95=test["test/return_ci95"], unit="return", seconds=seconds, **common),
            record(BENCH, setup.task, method, "seconds_per_env_step", per_step, unit="s", **common),
        ]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    p.add_argument("--runs-dir", type=Path, default=RUNS, help=f"where the PETS runs are (default {RUNS})")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help=f"where {BENCH}.json goes")
    p.set_defaults(threads=1)
    args = parse_args(p, argv)
    for name in args.only or CONFIGS:
        records = speed() if name == "speed" else ablation(name, args.runs_dir)
        path = merge_results(BENCH, records, args.results_dir)
    print(path)


if __name__ == "__main__":
    main()
