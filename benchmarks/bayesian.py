"""Bayesian meta-learners on sinusoid regression: accuracy and calibration of the predictive distribution.

Neural processes (:mod:`metalab.meta.neural_process`: ``cnp``, ``np``) are trained once on tasks with 2-10
context points, Bayesian MAML and an ensemble of MAML (:mod:`metalab.meta.bmaml`: ``bmaml``,
``ensemble_maml``) on tasks with K = 5; each is then tested on the same 600 held-out sinusoid tasks for each
context size K in 2, 5 and 10, with 100 query points per task: ``test_mse_k<K>`` (predictive mean), ``test_nll_k<K>`` (nats per point) and
``test_coverage90_k<K>`` (fraction of query targets inside the central 90% predictive interval; nominal 0.9),
each with a 95% CI over tasks. K = 2 is the ambiguous case: many sinusoids pass through two points, and a
calibrated learner says so.

The ambiguity demonstration (K = 1 and 2, where a point estimate is confidently wrong): on the same 600 test
tasks' functions, ``test_function_coverage90_k<K>`` is the fraction of tasks whose *whole true function* lies
inside the learner's central 90% predictive band, by this rule: the true curve is inside the band at at least
90% of a grid of 200 evenly spaced x over the input range [-5, 5] (:func:`function_coverage`). The band is the
one the ``coverage90`` metric uses, from the same predictive (:func:`grid_predictive`, :func:`central_band`).
It is a pointwise band, so a calibrated learner need not reach 0.9 on this whole-curve rule; a point estimate
with a narrow band scores near 0. The figure ``bayesian_ambiguity.png`` shows, for each configuration trained in
the invocation, 4 of these tasks at K = 1 and K = 2: the context points, the true function, the band, and
sample functions (the NP's draws of ``z``, the particles) where the learner has them. ::

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
import functools
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.func import vmap

from benchmarks.common import current_label, device_name, merge_results, parse_args, parser, record
from benchmarks.fewshot import (
    Trained,
    add_budget_args,
    add_run_args,
    build,
    config_path,
    run_overrides,
    train,
)
from metalab.data.episodes import Episode, generator_for
from metalab.data.root import data_root
from metalab.data.sinusoid import X_RANGE, sinusoid
from metalab.data.tasks import make_sampler
from metalab.experiment import RunConfig
from metalab.meta import bmaml, neural_process
from metalab.meta.neural_process import Z90, Gaussian
from metalab.stats import Estimate, mean_ci95

BENCH = "bayesian"
CELLS = {
    "cnp-sinusoid": "cnp_sinusoid",
    "np-sinusoid": "np_sinusoid",
    "bmaml-sinusoid": "bmaml_sinusoid",
    "ensemble-sinusoid": "ensemble_maml_sinusoid",
}
CONTEXTS = (2, 5, 10)
TEST_QUERIES = 100
AMBIGUOUS = (1, 2)
"""Context sizes of the ambiguity demonstration (``test_function_coverage90_k<K>``)."""
GRID = 200
"""Evenly spaced x over the input range at which a true function is compared with the band."""
GRID_FRACTION = 0.9
"""A true function is covered when it is inside the band at at least this fraction of the grid."""
FIGURE_TASKS = 4
MAML_K5 = (
    0.38  # Finn et al. 2017, Fig. 3 (read off the plot, as quoted by the issue): MAML after 5 steps, K = 5
)


def method(run: RunConfig) -> str:
    """A record's method: the NP's ``model`` (``cnp``, ``np``); ``bmaml`` (SVGD) or ``ensemble_maml``."""
    if run.algo == "bmaml":
        return "bmaml" if run.params.inner == "svgd" else "ensemble_maml"
    return run.params.model


def train_and_test(name: str, args: argparse.Namespace, panels: list[Panel] | None = None) -> list[dict]:
    """Train configuration ``name``, then test its weights at each context size and on the ambiguous tasks
    (:func:`ambiguity_records`; their figure panels are appended to ``panels``)."""
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
    ambiguous, drawn = ambiguity_records(name, trained, args)
    out.extend(ambiguous)
    if panels is not None:
        panels.extend(drawn)
    figures = trained.learner.figures(trained.run_dir) if trained.learner.figures else []
    if figures and current_label() is None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figures[0], args.results_dir / f"{BENCH}_{name}.png")
    return out


class Panel(NamedTuple):
    """What the ambiguity figure draws for one configuration at one K, on :data:`FIGURE_TASKS` tasks: the grid
    ``(G,)``, true functions, band and sample functions ``(n, G)`` / ``(n, S, G)``, context points ``(n, K)``."""

    name: str
    k: int
    x: torch.Tensor
    truth: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    samples: torch.Tensor | None
    context_x: torch.Tensor
    context_y: torch.Tensor


def ambiguity_records(
    name: str, trained: Trained, args: argparse.Namespace
) -> tuple[list[dict], list[Panel]]:
    """``test_function_coverage90_k<K>`` for K in :data:`AMBIGUOUS` (one record each) and their figure panels;
    none for the NME family (``task.label_assignment`` other than ``shuffled``), whose inputs carry task codes."""
    out, panels = [], []
    if trained.run.task.label_assignment != "shuffled":
        return out, panels
    for k in AMBIGUOUS:
        est, panel = measure_function_coverage(trained, k, name)
        print(f"{name} K={k} test function_coverage90: {est.mean:.4f} ± {est.ci95:.4f}")
        panels.append(panel)
        out.append(
            record(
                BENCH,
                f"sinusoid-k{k}",
                method(trained.run),
                f"test_function_coverage90_k{k}",
                est.mean,
                ci95=est.ci95,
                unit="fraction",
                steps=trained.fitted.step,
                seconds=trained.fitted.seconds,
                device=device_name(trained.device),
                config=f"configs/{CELLS[name]}.yaml",
                overrides=list(args.overrides),
                test_tasks=est.n,
                grid_points=GRID,
                grid_fraction=GRID_FRACTION,
                budget_minutes=args.minutes,
                threads=torch.get_num_threads(),
            )
        )
    return out, panels


def grid_predictive(trained: Trained, ep: Episode, x: torch.Tensor, g: torch.Generator) -> Gaussian:
    """The learner's predictive at ``x`` ``(T, G, 1)`` given the episode's support points, as its evaluation
    computes it: ``(S, T, G, 1)`` component means and stds of an equal-weight Gaussian mixture (S = 1 for a
    CNP; the NP's ``eval_samples`` draws of ``z``; the M particles after ``eval_inner_steps`` adaptation steps)."""
    run, model = trained.run, trained.learner.model
    cfg = run.params
    with torch.no_grad():  # torch.func.grad still differentiates the inner steps
        if run.algo == "neural_process":
            return neural_process.predictive(model, ep.support_x, ep.support_y, x, cfg.eval_samples, g)
        rule = bmaml.Rule.evaluation(cfg)
        meta = model.meta()
        meta = bmaml.Meta({k: v.detach() for k, v in meta.particles.items()}, meta.log_sigma.detach())
        fit = vmap(functools.partial(bmaml.predictive, rule), in_dims=(None, 0, 0, 0))
        p = fit(meta, ep.support_x, ep.support_y, x)  # (T, M, G, 1)
        return Gaussian(p.mean.movedim(1, 0), p.std.movedim(1, 0))


def central_band(p: Gaussian, interval_samples: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The central 90% interval ``(low, high)``, each ``(T, N, 1)``, of the mixture ``p`` at each point, by the
    rule of :func:`metalab.meta.neural_process.mixture_scores` (``coverage90``): the Gaussian's own
    ``mean +- Z90 * std`` for one component, else the 5% and 95% quantiles of ``interval_samples`` draws."""
    s = p.mean.shape[0]
    if s == 1:
        return p.mean[0] - Z90 * p.std[0], p.mean[0] + Z90 * p.std[0]
    device = p.mean.device
    which = torch.randint(s, (interval_samples, *p.mean.shape[1:]), generator=g).to(device)
    mean, std = p.mean.gather(0, which), p.std.gather(0, which)
    draws = mean + std * torch.randn(which.shape, generator=g).to(device)
    low, high = torch.quantile(draws, torch.tensor([0.05, 0.95], device=device), dim=0)
    return low, high


def function_coverage(
    low: torch.Tensor, high: torch.Tensor, truth: torch.Tensor, fraction: float = GRID_FRACTION
) -> torch.Tensor:
    """Per function ``(T,)``: 1.0 where ``truth`` ``(T, G)`` lies inside ``[low, high]`` ``(T, G)`` at at least
    ``fraction`` of the G grid points, else 0.0."""
    inside = ((truth >= low) & (truth <= high)).sum(-1)  # (T,)
    return (inside >= math.ceil(fraction * truth.shape[-1] - 1e-9)).double()


def measure_function_coverage(trained: Trained, k: int, name: str) -> tuple[Estimate, Panel]:
    """:func:`function_coverage` over the test tasks (``eval.episodes`` of them, the test part's functions)
    conditioned on K context points each, and the figure panel of the first tasks."""
    run = trained.run
    tasks = make_sampler(replace(run.task, shots=k, queries=1), "test", run.eval.seed, data_root())
    g = generator_for(run.eval.seed, k)
    x = torch.linspace(*X_RANGE, GRID)
    values, panel = [], None
    for index in range(math.ceil(run.eval.episodes / run.eval.batch)):
        n = min(run.eval.batch, run.eval.episodes - index * run.eval.batch)
        ep = tasks.sample(index, n).to(trained.device)
        amplitude, phase = tasks.functions(index, n)
        truth = sinusoid(x[None], amplitude[:, None], phase[:, None])  # (n, G)
        grid = x.reshape(1, -1, 1).expand(n, -1, -1).to(trained.device)
        p = grid_predictive(trained, ep, grid, g)
        low, high = (b[..., 0].cpu() for b in central_band(p, run.params.interval_samples, g))
        values.append(function_coverage(low, high, truth))
        if panel is None:
            m = min(n, FIGURE_TASKS)
            samples = p.mean[:8, :m, :, 0].movedim(0, 1).cpu() if p.mean.shape[0] > 1 else None
            cx, cy = ep.support_x[:m, :, 0].cpu(), ep.support_y[:m, :, 0].cpu()
            panel = Panel(name, k, x, truth[:m], low[:m], high[:m], samples, cx, cy)
    return mean_ci95(torch.cat(values)), panel


def ambiguity_figure(panels: list[Panel], path: Path) -> Path:
    """One row per (configuration, K): true function (black), 90% band (shaded), sample functions (thin blue)
    and context points (red) on each panel's tasks."""
    cols = max(p.truth.shape[0] for p in panels)
    fig, axes = plt.subplots(len(panels), cols, figsize=(3.0 * cols, 2.3 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        for col in range(cols):
            ax = axes[row, col]
            if col >= panel.truth.shape[0]:
                ax.axis("off")
                continue
            ax.fill_between(panel.x, panel.low[col], panel.high[col], alpha=0.25, label="90% band")
            for curve in panel.samples[col] if panel.samples is not None else ():
                ax.plot(panel.x, curve, color="tab:blue", alpha=0.35, lw=0.7)
            ax.plot(panel.x, panel.truth[col], color="black", lw=1.2, label="true function")
            ax.scatter(
                panel.context_x[col], panel.context_y[col], color="red", s=16, zorder=3, label="context"
            )
            ax.set_ylim(-6, 6)
            if col == 0:
                ax.set_ylabel(f"{panel.name}\nK = {panel.k}", fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.suptitle("Ambiguous sinusoid tasks: true function, 90% predictive band, sample functions", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], list(CELLS))
    add_budget_args(p, test_episodes=600, minutes=20.0)
    add_run_args(p, BENCH)
    args = parse_args(p, argv)
    panels: list[Panel] = []
    for name in args.only or list(CELLS):
        records = train_and_test(name, args, panels)
        print(merge_results(BENCH, records, args.results_dir))
        if panels and current_label() is None:
            print(ambiguity_figure(panels, args.results_dir / f"{BENCH}_ambiguity.png"))


if __name__ == "__main__":
    main()
