"""Gradient-based meta-learners on Omniglot (Vinyals split, Conv-4) vs published accuracies.

MAML (second order), FOMAML, Meta-SGD, ANIL and MAML++:

    python -m benchmarks.omniglot_maml                                  # 5-way 1-shot and 5-shot, 60 min each
    python -m benchmarks.omniglot_maml --only maml-5w1s --minutes 30
    python -m benchmarks.omniglot_maml --only maml-20w1s fomaml-20w1s   # optional 20-way cells

A configuration ``<method>-<cell>`` trains ``configs/<method>_omniglot_5w1s.yaml`` with the cell's overrides
(``5w5s``: ``task.shots=5``; ``20w1s``: ``task.ways=20``, meta-batch 16, and for MAML and FOMAML the paper's
5 inner steps of 0.1) in ``<runs-dir>/<config>`` for ``--minutes`` of training time (counted across resumes) or
``--steps`` meta-steps, whichever comes first, resuming that directory when it holds a checkpoint. Periodic
evaluations use the val characters (``val/acc``: the learning curve; no model selection is made). The trained
model is then tested once, with the config's ``eval_inner_steps``, on ``--test-episodes`` (600) test tasks of 15
queries per class, with a 95% CI, and the adapted predictive's ``ece`` and ``nll`` on those episodes
(``--test-episodes 1000`` makes them the episodes of :mod:`benchmarks.omniglot_metric`'s cell, for the
calibration comparison of issue 29: ``--label ece-peer``). Records go to ``<results-dir>/omniglot_maml.json``, and ``omniglot_maml.png``
(val accuracy vs training time) is redrawn from every run so far. Provenance flags (``--allow-dirty``,
``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import current_label, merge_results, parse_args, parser
from benchmarks.fewshot import (
    Curve,
    accuracy_record,
    add_budget_args,
    add_run_args,
    config_path,
    plot_accuracy,
    run_overrides,
    train,
)

BENCH = "omniglot_maml"
METHODS = ("maml", "fomaml", "metasgd", "anil", "mamlpp")
CELLS = ("5w1s", "5w5s", "20w1s")
DEFAULT_CELLS = ("5w1s", "5w5s")
CELL_OVERRIDES = {
    "5w1s": [],
    "5w5s": ["task.shots=5"],
    "20w1s": ["task.ways=20", "train.meta_batch=16"],  # Finn et al.'s 20-way meta-batch
}
# Finn et al. (2017) train and test 20-way MAML with 5 inner steps of 0.1 (5-way: 1 step of 0.4, tested with 3).
PAPER_20WAY = {
    m: ["maml.inner_steps=5", "maml.inner_lr=0.1", "maml.eval_inner_steps=5"] for m in ("maml", "fomaml")
}
# Published Omniglot accuracies (%) per cell (5w1s, 5w5s, 20w1s) and this project's targets.
PUBLISHED = {
    "maml": (98.7, 99.9, 95.8),
    "fomaml": (98.3, 99.2, 89.4),
    "metasgd": (99.53, 99.93, 95.93),
    "anil": (None, None, 96.2),
    "mamlpp": (99.47, 99.93, 97.65),
}
TARGETS = {"maml": (97.0, 99.0, None)}
REFERENCES = {
    "maml": "Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017, Table 1",
    "fomaml": "Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017, Table 1 (first order approx.)",
    "metasgd": "Li, Zhou, Chen & Li, Meta-SGD, arXiv 2017, Table 1",
    "anil": "Raghu, Raghu, Bengio & Vinyals, Rapid Learning or Feature Reuse?, ICLR 2020, Table 2 (20-way only)",
    "mamlpp": "Antoniou, Edwards & Storkey, How to train your MAML, ICLR 2019, Table 1",
}
CONFIGS = [f"{m}-{c}" for c in CELLS for m in METHODS]
DEFAULT = [f"{m}-{c}" for c in DEFAULT_CELLS for m in METHODS]


def cell_overrides(method: str, cell: str) -> list[str]:
    """What turns ``configs/<method>_omniglot_5w1s.yaml`` into the ``cell`` configuration."""
    return [*CELL_OVERRIDES[cell], *(PAPER_20WAY.get(method, []) if cell == "20w1s" else [])]


def train_and_test(name: str, args: argparse.Namespace) -> list[dict]:
    """Train configuration ``name`` (resuming its run directory) and test it with its eval inner steps."""
    method, cell = name.split("-")
    stem = f"{method}_omniglot_5w1s"
    sets = cell_overrides(method, cell)
    trained = train(config_path(stem), [*sets, *run_overrides(args)], args.runs_dir / name)
    test = trained.learner.evaluate("test", trained.run.eval.episodes)
    i = CELLS.index(cell)
    return [
        accuracy_record(
            BENCH,
            f"omniglot-vinyals-{cell}",
            method,
            trained,
            test,
            published=PUBLISHED[method][i],
            target=TARGETS.get(method, (None,) * len(CELLS))[i],
            label=name,
            config=f"configs/{stem}.yaml",
            overrides=[*sets, *args.overrides],
            eval_inner_steps=trained.run.params.eval_inner_steps,
            reference=REFERENCES[method],
            # calibration of the adapted predictive: with --test-episodes 1000 these are the test episodes of
            # benchmarks.omniglot_metric's cell (the same eval.seed), for VERSA's ECE against MAML's
            ece=test.get("test/ece"),
            ece_interval=[test.get("test/ece_low"), test.get("test/ece_high")],
            nll=test.get("test/nll"),
        )
    ]


def plot(runs: Path, results: Path) -> Path | None:
    """Periodic (val) accuracy vs training minutes, one panel per cell (20w1s once it has a run)."""
    cells = [c for c in CELLS if c in DEFAULT_CELLS or any((runs / f"{m}-{c}").is_dir() for m in METHODS)]
    panels = {f"Omniglot {c}": [Curve(m, runs / f"{m}-{c}") for m in METHODS] for c in cells}
    return plot_accuracy(panels, results / f"{BENCH}.png")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS, DEFAULT)
    add_budget_args(p, test_episodes=600)
    add_run_args(p, BENCH)
    args = parse_args(p, argv)
    for name in args.only or DEFAULT:
        print(merge_results(BENCH, train_and_test(name, args), args.results_dir))
        if current_label() is None:  # the figure shows the main runs only
            plot(args.runs_dir, args.results_dir)


if __name__ == "__main__":
    main()
