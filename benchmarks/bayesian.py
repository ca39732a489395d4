"""Bayesian meta-learners on sinusoid regression: accuracy and calibration of the predictive distribution.

Neural processes (:mod:`metalab.meta.neural_process`: ``cnp``, ``np``) are trained once on tasks with 2-10
context points, Bayesian MAML and an ensemble of MAML (:mod:`metalab.meta.bmaml`: ``bmaml``,
``ensemble_maml``) on tasks with K = 5; each is then tested on the same 600 held-out sinusoid tasks for each
context size K in 2, 5 and 10, with 100 query points per task: ``test_mse_k<K>`` (predictive mean), ``test_nll_k<K>`` (nats per point) and
``test_coverage90_k<K>`` (fraction of query targets inside the central 90% predictive interval; nominal 0.9),
each with a 95% CI over tasks. K = 2 is the ambiguous case: many sinusoids pass through two points, and a
calibrated learner says so. ::

    python -m benchmarks.bayesian                                   # every configuration, 20 min each
    python -m benchmarks.bayesian --only np-sinusoid --minutes 10
    python -m benchmarks.bayesian --only bmaml-sinusoid --minutes 20

Periodic evaluations during training use val tasks (the config's K: 10 for the NPs, 5 for the MAMLs). Records go to ``benchmarks/results/bayesian.json``
and each configuration's predictive bands on 4 test tasks to ``bayesian_<configuration>.png``. The MAML figure
the issue names as the bar (0.38 after 5 steps at K = 5) is Finn et al.'s; metalab's own MAML K = 5 record is
in ``sinusoid.json``. Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import shutil

import torch

from benchmarks.common import current_label, device_name, merge_results, parse_args, parser, record
from benchmarks.fewshot import add_budget_args, add_run_args, build, config_path, run_overrides, train
from metalab.experiment import RunConfig

BENCH = "bayesian"
CELLS = {
    "cnp-sinusoid": "cnp_sinusoid",
    "np-sinusoid": "np_sinusoid",
    "bmaml-sinusoid": "bmaml_sinusoid",
    "ensemble-sinusoid": "ensemble_maml_sinusoid",
}
CONTEXTS = (2, 5, 10)
TEST_QUERIES = 100
MAML_K5 = (
    0.38  # Finn et al. 2017, Fig. 3 (read off the plot, as quoted by the issue): MAML after 5 steps, K = 5
)


def method(run: RunConfig) -> str:
    """A record's method: the NP's ``model`` (``cnp``, ``np``); ``bmaml`` (SVGD) or ``ensemble_maml``."""
    if run.algo == "bmaml":
        return "bmaml" if run.params.inner == "svgd" else "ensemble_maml"
    return run.params.model


def train_and_test(name: str, args: argparse.Namespace) -> list[dict]:
    """Train configuration ``name``, then test its weights at each context size."""
    stem = CELLS[name]
    trained = train(config_path(stem), run_overrides(args), args.runs_dir / name)
    out = []
    for k in CONTEXTS:
        tester, run, _ = build(config_path(stem), [*run_overrides(args), f"task.shots={k}",
                                                   f"task.queries={TEST_QUERIES}"])  # fmt: skip
        tester.model.load_state_dict(trained.learner.model.state_dict())
        tester.model.eval()
        test = tester.evaluate("test", run.eval.episodes)
        for metric in ("mse", "nll", "coverage90"):
            value, ci = test[f"test/{metric}"], test[f"test/{metric}_ci95"]
            print(f"{name} K={k} test {metric}: {value:.4f} ± {ci:.4f}")
            out.append(
                record(
                    BENCH,
                    f"sinusoid-k{k}",
                    method(run),
                    f"test_{metric}_k{k}",
                    value,
                    ci95=ci,
                    unit="nats" if metric == "nll" else ("fraction" if metric == "coverage90" else "mse"),
                    steps=trained.fitted.step,
                    seconds=trained.fitted.seconds,
                    device=device_name(trained.device),
                    published=MAML_K5 if (metric, k) == ("mse", 5) else None,
                    target=0.9 if metric == "coverage90" else None,
                    config=f"configs/{stem}.yaml",
                    overrides=list(args.overrides),
                    test_tasks=run.eval.episodes,
                    test_queries=TEST_QUERIES,
                    budget_minutes=args.minutes,
                    threads=torch.get_num_threads(),
                )
            )
    figures = trained.learner.figures(trained.run_dir) if trained.learner.figures else []
    if figures and current_label() is None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figures[0], args.results_dir / f"{BENCH}_{name}.png")
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], list(CELLS))
    add_budget_args(p, test_episodes=600, minutes=20.0)
    add_run_args(p, BENCH)
    args = parse_args(p, argv)
    for name in args.only or list(CELLS):
        print(merge_results(BENCH, train_and_test(name, args), args.results_dir))


if __name__ == "__main__":
    main()
