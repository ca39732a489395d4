"""MPC planners: planning speed against a Python loop over candidates, and a planner ablation on Pendulum.

    python -m benchmarks.planning                          # both configurations
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

``ablation-pendulum``: one trained PETS model (``benchmarks.mbrl``'s ``pets-pendulum`` seed 0 run, trained or
reloaded from ``<runs-dir>/pets-pendulum-s0``), tested once on the same 10 test episodes with each planner at
about the same compute per env step, counted in predicted sequences (each of 10 particles and 25 steps):
random shooting of 1,000 sequences, CEM 5 x 200 (the config's), MPPI 5 x 200 (temperature 1, the default: not
tuned), and gradient planning: 20 Adam steps from CEM's plan (5 x 200 + 20 forward-backward passes of one
sequence, about 1,060 sequences' worth). Records: test return with its 95% CI over the episodes, and the
seconds per env step of planning. Nothing here was chosen on the test episodes.

Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import merge_results, parse_args, parser, record
from benchmarks.mbrl import RUNS
from benchmarks.mbrl import run_config as mbrl_run_config
from benchmarks.rl_common import train
from metalab.experiment import algorithm, load_run_config
from metalab.rl.dynamics import Ensemble, trajectory_sampling
from metalab.rl.planners import Bounds, PlannerConfig, RolloutFn, cem

BENCH = "planning"
CONFIGS = ["speed", "ablation-pendulum"]
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

# PETS's HalfCheetah planning problem (Chua et al. 2018, appendix): model, particles, CEM.
OBS_DIM, ACT_DIM, HIDDEN, MEMBERS, PARTICLES = 17, 6, (200, 200, 200, 200), 5, 20
SPEED_PLANNER = PlannerConfig(method="cem", horizon=30, candidates=500, iterations=5, elites=50)

ABLATION = {  # planner overrides of configs/mbrl_pendulum.yaml, about 1,000 predicted sequences per env step
    "random": ["mbrl.planner.method=random", "mbrl.planner.candidates=1000"],
    "cem": [],
    "mppi": ["mbrl.planner.method=mppi"],
    "gradient": ["mbrl.planner.method=gradient", "mbrl.planner.grad_init=cem", "mbrl.planner.grad_steps=20"],
}
ABLATION_EPISODES = 10
ENV_STEPS = 200  # per Pendulum episode


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


def ablation(runs: Path) -> list[dict[str, Any]]:
    base = mbrl_run_config("pets-pendulum", 0, [])
    trained, fitted = train(base, runs / "pets-pendulum-s0")
    out = []
    for method, overrides in ABLATION.items():
        run = load_run_config(CONFIGS_DIR / "mbrl_pendulum.yaml", ["seed=0", "train.device=cpu", *overrides])
        learner = algorithm(run.algo).build(run, Path("unused"), torch.device("cpu"))
        learner.model.load_state_dict(trained.model.state_dict())
        learner.model.eval()
        start = time.perf_counter()
        test = learner.evaluate("test", ABLATION_EPISODES)
        seconds = time.perf_counter() - start
        per_step = seconds / (ABLATION_EPISODES * ENV_STEPS)
        print(f"ablation {method}: test return {test['test/return']:.1f} +- {test['test/return_ci95']:.1f}, "
              f"{per_step:.3f} s per env step")  # fmt: skip
        common = {"model": str(runs / "pets-pendulum-s0"), "model_steps": fitted.step, "overrides": overrides,
                  "test_episodes": ABLATION_EPISODES, "threads": torch.get_num_threads()}  # fmt: skip
        out += [
            record(BENCH, "pendulum-pets-model", method, "test_return", test["test/return"],
                   ci95=test["test/return_ci95"], unit="return", seconds=seconds, **common),
            record(BENCH, "pendulum-pets-model", method, "seconds_per_env_step", per_step, unit="s", **common),
        ]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    p.add_argument("--runs-dir", type=Path, default=RUNS, help=f"where the PETS runs are (default {RUNS})")
    p.set_defaults(threads=1)
    args = parse_args(p, argv)
    for name in args.only or CONFIGS:
        path = merge_results(BENCH, speed() if name == "speed" else ablation(args.runs_dir))
    print(path)


if __name__ == "__main__":
    main()
