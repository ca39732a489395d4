"""Meta-learning without labels: training tasks built from unlabeled Omniglot images, tested on labelled tasks.

Augmentation-built tasks (UMTRA, Khodadadeh et al., NeurIPS 2019; AAL, Antoniou & Storkey, 2019): each
training task is N random images of the Vinyals train part, image ``i`` being class ``i``, its query set
augmented views of the same images (:mod:`metalab.data.augment`; ``task.construction: augmented``). No label is
read in meta-training: the sampler keeps the images only, with no class axis. Periodic evaluations (``val/acc``)
and the one test are the real labelled 5-way tasks of the Vinyals val and test characters. ::

    python -m benchmarks.unsupervised                                  # every configuration, 60 min each
    python -m benchmarks.unsupervised --only protonet-umtra-5w1s --minutes 45

Records ``test_accuracy`` (%) with a 95% CI over ``--test-episodes`` test tasks in
``benchmarks/results/unsupervised.json``, and ``unsupervised.png`` (val accuracy vs training minutes).
Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.
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

BENCH = "unsupervised"
CELLS: dict[str, tuple[str, list[str]]] = {
    "protonet-umtra-5w1s": ("protonet_omniglot_5w1s_umtra", []),
    "protonet-umtra-5w5s": ("protonet_omniglot_5w1s_umtra", ["task.shots=5"]),
}
CONFIGS = list(CELLS)
# UMTRA with MAML on Omniglot (Khodadadeh et al. 2019, Table 2 as quoted by issue 27; unverified here): a
# yardstick for augmentation-built tasks, not a like-for-like peer (ProtoNet here).
PUBLISHED = {"protonet-umtra-5w1s": 83.80}
TARGETS = {"protonet-umtra-5w1s": 80.0}
REFERENCE = (
    "Khodadadeh, Boloni & Shah, Unsupervised Meta-Learning for Few-Shot Image Classification, NeurIPS 2019"
)


def train_and_test(name: str, args: argparse.Namespace) -> list[dict]:
    """Train configuration ``name`` on augmentation-built tasks, then test it once on labelled test tasks."""
    method, construction, cell = name.split("-")
    stem, sets = CELLS[name]
    trained = train(config_path(stem), [*sets, *run_overrides(args)], args.runs_dir / name)
    test = trained.learner.evaluate("test", trained.run.eval.episodes)
    return [
        accuracy_record(
            BENCH,
            f"omniglot-vinyals-{cell}",
            f"{method}-{construction}",
            trained,
            test,
            published=PUBLISHED.get(name),
            target=TARGETS.get(name),
            label=name,
            config=f"configs/{stem}.yaml",
            overrides=[*sets, *args.overrides],
            reference=REFERENCE,
        )
    ]


def plot(runs: Path, results: Path) -> Path | None:
    """Val accuracy (labelled val tasks) vs training minutes."""
    curves = [Curve(n, runs / n) for n in CONFIGS]
    return plot_accuracy({"Omniglot, tasks from unlabeled images": curves}, results / f"{BENCH}.png")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS, ["protonet-umtra-5w1s"])
    add_budget_args(p, test_episodes=1000)
    add_run_args(p, BENCH)
    args = parse_args(p, argv)
    for name in args.only or ["protonet-umtra-5w1s"]:
        print(merge_results(BENCH, train_and_test(name, args), args.results_dir))
        if current_label() is None:
            plot(args.runs_dir, args.results_dir)


if __name__ == "__main__":
    main()
