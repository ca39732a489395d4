"""Black-box (sequence) meta-learners on Omniglot (Vinyals split): SNAIL and the MANN-style LSTM vs published.

    python -m benchmarks.omniglot_blackbox                                   # every configuration, 60 min each
    python -m benchmarks.omniglot_blackbox --only snail-5w1s --minutes 30
    python -m benchmarks.omniglot_blackbox --only mann-lstm mann-memory --threads 1

``snail-<cell>`` trains ``configs/snail_omniglot_<cell>.yaml`` (Mishra et al., ICLR 2018) and reports test
accuracy with a 95% CI over ``--test-episodes`` (1000) episodes of 15 queries per class from the test characters.
``mann-lstm`` and ``mann-memory`` train ``configs/mann_omniglot_5way.yaml`` and its LRU-memory variant
``mann_omniglot_5way_memory.yaml`` (Santoro et al., ICML 2016: 5-way episodes of 10 instances per class, each
shown with the previous step's label) and report accuracy over the whole sequence (``test_accuracy``) and by
instance number (``acc_instance2`` is the accuracy on the 2nd sighting of a class, ...), on as many test episodes.

Each configuration trains in ``<runs-dir>/<config>`` for ``--minutes`` of training time (counted across
resumes) or ``--steps``, whichever comes first, resuming that directory when it holds a checkpoint. Records go to
``<results-dir>/omniglot_blackbox.json``, and ``omniglot_blackbox.png`` (val accuracy of the periodic
evaluations vs training time) is redrawn from every run so far.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import current_label, device_kind, merge_results, parse_args, parser
from benchmarks.fewshot import (
    Curve,
    accuracy_record,
    add_budget_args,
    add_run_args,
    config_path,
    plot_accuracy,
    recorded_curve,
    run_overrides,
    train,
)
from metalab.meta.mann import REPORTED_INSTANCES

BENCH = "omniglot_blackbox"
CELLS = ("5w1s", "5w5s", "20w1s", "20w5s")
# SNAIL, Omniglot test accuracy (%) per cell (Mishra et al. 2018, Table 1), and this project's targets.
SNAIL_PUBLISHED = (99.07, 99.78, 97.64, 99.36)
SNAIL_TARGETS = (98.0, 99.0, None, None)
SNAIL_REFERENCE = "Mishra, Rohaninejad, Chen & Abbeel, A Simple Neural Attentive Meta-Learner, ICLR 2018"
# MANN configurations: config stem per method.
MANN = {"mann-lstm": "mann_omniglot_5way", "mann-memory": "mann_omniglot_5way_memory"}
# Santoro et al. (2016), Table 1, MANN (LRU access) on 5-way Omniglot: accuracy (%) by instance number; targets.
MANN_PUBLISHED = {2: 82.8, 5: 94.9}
MANN_TARGETS = {2: 85.0, 5: 95.0}
MANN_REFERENCE = (
    "Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, Meta-Learning with Memory-Augmented Neural Networks, "
    "ICML 2016, Table 1 (MANN with LRU memory on raw pixels; mann-lstm has no external memory)"
)
CONFIGS = [*(f"snail-{cell}" for cell in CELLS), *MANN]
PLOTTED_INSTANCES = (2, 5)


def snail(name: str, args: argparse.Namespace) -> list[dict]:
    """Train SNAIL configuration ``snail-<cell>`` and test it."""
    cell = name.split("-", 1)[1]
    stem = f"snail_omniglot_{cell}"
    trained = train(config_path(stem), run_overrides(args), args.runs_dir / name)
    i = CELLS.index(cell)
    test = trained.learner.evaluate("test", trained.run.eval.episodes)
    return [
        accuracy_record(
            BENCH,
            f"omniglot-vinyals-{cell}",
            "snail",
            trained,
            test,
            published=SNAIL_PUBLISHED[i],
            target=SNAIL_TARGETS[i],
            label=name,
            config=f"configs/{stem}.yaml",
            overrides=args.overrides,
            reference=SNAIL_REFERENCE,
        )
    ]


def mann(name: str, args: argparse.Namespace) -> list[dict]:
    """Train MANN configuration ``name`` and test it: whole-sequence accuracy and accuracy by instance number."""
    stem = MANN[name]
    trained = train(config_path(stem), run_overrides(args), args.runs_dir / name)
    task = trained.run.task
    test = trained.learner.evaluate("test", trained.run.eval.episodes)
    common = {"config": f"configs/{stem}.yaml", "overrides": args.overrides, "reference": MANN_REFERENCE}
    task_name = f"omniglot-{task.split}-{task.ways}way-{task.shots + task.queries}inst"
    out = [accuracy_record(BENCH, task_name, name, trained, test, label=name, **common)]
    for i in REPORTED_INSTANCES:
        key = f"test/acc_inst{i}"
        if key in test:  # absent when episodes are shorter than i instances per class
            out.append(
                accuracy_record(
                    BENCH,
                    task_name,
                    name,
                    trained,
                    test,
                    key=key,
                    metric=f"acc_instance{i}",
                    published=MANN_PUBLISHED.get(i),
                    target=MANN_TARGETS.get(i),
                    label=name,
                    instance=i,
                    **common,
                )
            )
    return out


def plot(runs: Path, results: Path) -> Path | None:
    """Periodic (val) accuracy vs training minutes: one panel per SNAIL cell, one for MANN by instance."""
    path = results / f"{BENCH}.json"
    kept = {  # main CPU records' val curves, for runs whose directories are gone
        (r["method"], r["task"] if r["method"] == "snail" else r["metric"]): recorded_curve(r)
        for r in (json.loads(path.read_text()) if path.is_file() else [])
        if recorded_curve(r) and device_kind(r["device"]) == "cpu" and r.get("label") is None
    }
    panels = {
        f"SNAIL, Omniglot {cell}": [
            Curve("snail", runs / f"snail-{cell}", recorded=kept.get(("snail", f"omniglot-vinyals-{cell}")))
        ]
        for cell in CELLS
    }
    panels["MANN, Omniglot 5-way, by instance"] = [
        Curve(f"{name}, instance {i}", runs / name, f"val/acc_inst{i}", group=f"{name}, instance {i}",
              recorded=kept.get((name, f"acc_instance{i}")))
        for name in MANN
        for i in PLOTTED_INSTANCES
    ]  # fmt: skip
    return plot_accuracy(panels, results / f"{BENCH}.png")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    add_budget_args(p, test_episodes=1000)
    add_run_args(p, BENCH)
    args = parse_args(p, argv)
    for name in args.only or CONFIGS:
        records = snail(name, args) if name.startswith("snail-") else mann(name, args)
        print(merge_results(BENCH, records, args.results_dir))
        if current_label() is None:  # the figure shows the main runs only
            plot(args.runs_dir, args.results_dir)


if __name__ == "__main__":
    main()
