"""Meta-learning without memorisation: non-mutually-exclusive (NME) tasks, plain learners vs meta-regularised.

Yin, Tucker, Zhou, Levine & Finn (ICLR 2020): when a class keeps its label across training tasks, one
function of the input solves every task, and MAML learns it instead of learning to adapt; MR-MAML (W) puts a
Gaussian posterior on part of the weights with ``beta * KL`` so that task information has to come from the
support set. ::

    python -m benchmarks.memorization                                   # every configuration, 60 min each
    python -m benchmarks.memorization --only mr_maml-omniglot --minutes 45
    python -m benchmarks.memorization --only maml-sinusoid mr_maml-sinusoid

Configurations ``<method>-<family>``:

- ``omniglot``: NME Omniglot 20-way 1-shot (``configs/mr_maml_omniglot_20w1s_nme.yaml``: fixed groups of 20
  training classes, each class always the same label); ``maml`` is the same config with no posterior
  (``mr_maml.stochastic=[]``: MAML exactly, same loss and batches); ``protonet`` is
  ``configs/protonet_omniglot_20w1s.yaml`` on the same NME training tasks (a metric learner compares queries
  with the support set, so it should not be able to ignore it: the control); ``mr_protonet`` adds the
  activation form (A) of meta-regularization, a 64-d Gaussian bottleneck on the embedding
  (``protonet.bottleneck``).
- ``sinusoid``: the NME sinusoid family (``configs/mr_maml_sinusoid.yaml``: 20 amplitudes, a one-hot task code
  on each input), MR-MAML vs MAML; and a conditional neural process (``configs/cnp_sinusoid_nme.yaml``), whose
  decoder can read the task from the target inputs. (MR-CNP, a Gaussian bottleneck on those inputs,
  ``neural_process.bottleneck``, is not a configuration here: on val, no weight in 0.01-1 made it adapt.)

Each configuration trains for ``--minutes`` (or ``--steps``) in a resumable run directory and is then
evaluated once on three sets, all with the config's eval inner steps:

- ``test``: held-out classes (or new functions) with shuffled labels, ``--test-episodes`` tasks (the record);
- ``train``: new episodes of the NME training tasks, labels as in training (how well they were fitted);
- ``probe``: the same training episodes with each support set replaced by another task's
  (:class:`metalab.data.episodes.SupportSwapped`). A learner that adapts to the support set falls to chance
  (or a large error); one that memorised the training tasks does not notice.

Records: ``test_accuracy`` / ``train_accuracy`` / ``probe_accuracy`` (%), or ``test_mse`` / ``train_mse`` /
``probe_mse`` for sinusoid, in ``benchmarks/results/memorization.json``; ``memorization.png`` draws the val
curves. Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import current_label, device_name, merge_results, parse_args, parser, record
from benchmarks.fewshot import (
    Curve,
    Trained,
    accuracy_record,
    add_budget_args,
    add_run_args,
    config_path,
    plot_accuracy,
    recorded_curve,
    run_overrides,
    train,
)

BENCH = "memorization"
PLAIN = ["mr_maml.stochastic=[]"]
NME_PROTONET = ["task.label_assignment=fixed", "train.steps=2000"]  # about 20 minutes on one core
CELLS: dict[str, tuple[str, list[str]]] = {
    "maml-omniglot": ("mr_maml_omniglot_20w1s_nme", PLAIN),
    "mr_maml-omniglot": ("mr_maml_omniglot_20w1s_nme", []),
    "protonet-omniglot": ("protonet_omniglot_20w1s", NME_PROTONET),
    "mr_protonet-omniglot": ("protonet_omniglot_20w1s", [*NME_PROTONET, "protonet.bottleneck=64"]),
    "maml-sinusoid": ("mr_maml_sinusoid", PLAIN),
    "mr_maml-sinusoid": ("mr_maml_sinusoid", []),
    "cnp-sinusoid": ("cnp_sinusoid_nme", []),
}
CONFIGS = list(CELLS)
TASKS = {"omniglot": "omniglot-vinyals-20w1s-nme", "sinusoid": "sinusoid-nme-10s"}
# The anchors for NME Omniglot 20-way 1-shot test accuracy (Yin et al. 2020, Table 2): quoted as
# "about"; the paper's table was not retrievable from this machine, so they are unverified here.
PUBLISHED = {"maml-omniglot": 7.8, "mr_maml-omniglot": 83.0}
TARGETS = {"mr_maml-omniglot": 80.0}
REFERENCE = "Yin, Tucker, Zhou, Levine & Finn, Meta-Learning without Memorization, ICLR 2020"


def regression_records(name: str, trained: Trained, results: dict[str, dict[str, float]], **extra: Any):
    """``<part>_mse`` records of a sinusoid configuration."""
    method, family = name.split("-")
    fitted, run = trained.fitted, trained.run
    out = []
    for part, metrics in results.items():
        mse, ci = metrics[f"{part}/mse"], metrics[f"{part}/mse_ci95"]
        print(
            f"{name} {part}_mse: {mse:.4f} ± {ci:.4f} after {fitted.step} steps, {fitted.seconds / 60:.1f} min"
        )
        out.append(
            record(
                BENCH,
                TASKS[family],
                method,
                f"{part}_mse",
                mse,
                ci95=ci,
                unit="mse",
                steps=fitted.step,
                seconds=fitted.seconds,
                device=device_name(trained.device),
                budget_minutes=run.train.max_minutes,
                **extra,
            )
        )
    return out


def train_and_test(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train configuration ``name``, then evaluate it on the test, train and probe sets."""
    method, family = name.split("-")
    stem, sets = CELLS[name]
    trained = train(config_path(stem), [*sets, *run_overrides(args)], args.runs_dir / name)
    episodes = trained.run.eval.episodes
    results = {part: trained.learner.evaluate(part, episodes) for part in ("test", "train", "probe")}
    extra = {
        "config": f"configs/{stem}.yaml",
        "overrides": [*sets, *args.overrides],
        "reference": REFERENCE,
    }
    if family == "sinusoid":
        return regression_records(name, trained, results, test_episodes=episodes, **extra)
    return [
        accuracy_record(
            BENCH,
            TASKS[family],
            method,
            trained,
            results[part],
            key=f"{part}/acc",
            metric=f"{part}_accuracy",
            published=PUBLISHED.get(name) if part == "test" else None,
            target=TARGETS.get(name) if part == "test" else None,
            label=name,
            **extra,
        )
        for part in ("test", "train", "probe")
    ]


def plot(runs: Path, results: Path) -> Path | None:
    """Val accuracy of the Omniglot configurations vs training minutes: from the run directories, else from the
    curves the test records keep (so the figure can be redrawn from the records alone)."""
    path = results / f"{BENCH}.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    kept = {
        r["method"]: recorded_curve(r)
        for r in records
        if r["metric"] == "test_accuracy" and r.get("label") is None and not r.get("dirty")
    }
    curves = [
        Curve(n.split("-")[0], runs / n, recorded=kept.get(n.split("-")[0]))
        for n in CONFIGS
        if n.endswith("omniglot")
    ]
    return plot_accuracy({"NME Omniglot 20w1s (val: shuffled labels)": curves}, results / f"{BENCH}.png")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS, CONFIGS)
    add_budget_args(p, test_episodes=600)
    add_run_args(p, BENCH)
    args = parse_args(p, argv)
    for name in args.only or CONFIGS:
        print(merge_results(BENCH, train_and_test(name, args), args.results_dir))
        if current_label() is None:
            plot(args.runs_dir, args.results_dir)


if __name__ == "__main__":
    main()
