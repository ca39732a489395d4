"""Metric-based few-shot learners on Omniglot (Vinyals split): accuracy vs published numbers, and ProtoNet speed.

    python -m benchmarks.omniglot_metric --only protonet-1shot --minutes 60
    python -m benchmarks.omniglot_metric --only speed

Each configuration trains ``configs/<method>_omniglot_<cell>.yaml`` in ``runs/bench/omniglot_metric/<config>``
for a wall-clock budget (``--minutes``, counted across resumes) or ``--steps`` episodes, whichever comes first,
resuming that directory when it already holds a checkpoint, so a budget can be spread over several sittings.
Periodic evaluations use the val characters (``val/acc``, the learning curve). It then reports test accuracy with
a 95% CI over 1000 episodes of 15 queries per class from the test characters (evaluated once, after training),
and redraws ``results/omniglot_metric.png`` (val accuracy vs training time) from every run so far. Each record
also carries the ``ece`` (pooled over all test queries) and ``nll`` of those episodes, the same episodes for
every method of a cell (``eval.seed``): VERSA's (``versa-5w1s``, ``versa-20w1s``) calibration against ProtoNet's.

``speed``: ProtoNet training episodes per second, 20-way 5-shot 15-query, metalab's training step against the
plain PyTorch loop a user would write (:func:`plain_protonet_step`), same model, optimiser and episodes.
Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`; a labelled run trains in
``runs/bench/omniglot_metric/<label>`` and leaves the figure alone. ``--set KEY=VALUE`` overrides a config key of
every selected configuration (recorded as ``overrides``), e.g. a labelled variant::

    python -m benchmarks.omniglot_metric --only imp-alphabet --label seenchars \
        --set task.alphabet_queries=support_characters
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS,
    add_set_arg,
    current_label,
    device_name,
    merge_results,
    parse_args,
    parser,
    record,
    sync,
)
from benchmarks.fewshot import (
    Curve,
    accuracy_record,
    add_budget_args,
    budget_overrides,
    build,
    config_path,
    plot_accuracy,
    train,
)
from metalab.data.root import data_root
from metalab.data.tasks import make_sampler
from metalab.experiment import load_run_config
from metalab.meta import protonet
from metalab.utils import resolve_device, seed_everything

CELLS = ("5w1s", "5w5s", "20w1s", "20w5s")
BATCHNORM_MODES = ("inductive", "transductive")
"""Each trained model is tested in both modes (see :data:`metalab.models.BatchNormMode`); the papers' code
evaluates inductively."""
METHODS = ("protonet", "matching", "relation", "siamese", "gnn", "versa", "imp")
# Published Omniglot accuracies (%) and this project's targets, per cell.
PUBLISHED = {
    "protonet": (98.8, 99.7, 96.0, 98.9),
    "matching": (98.1, 98.9, 93.8, 98.5),
    "relation": (99.6, 99.8, 97.6, 99.1),
    "siamese": (97.3, 98.4, 88.2, 97.0),
    "gnn": (99.2, 99.7, 97.4, 99.0),  # Garcia & Bruna, ICLR 2018
    "imp": (None, None, None, None),  # Allen et al., ICML 2019: figures not entered (not recalled for sure)
    "versa": (99.7, None, 97.66, None),  # Gordon et al., ICLR 2019; the 5-shot cells have no config here
}
TARGETS = {
    # issue 35: the paper's own; records made before it carry the first targets, 98.5 / 99.5 / 95.5 / 98.6
    "protonet": (98.8, 99.7, 96.0, 98.9),
    "matching": (97.5, 98.7, 93.0, 98.0),
    "relation": (99.0, 99.5, 96.5, 98.8),
    "siamese": (96.5, 98.0, None, None),
    "gnn": (99.0, 99.5, 97.0, 98.8),  # issue 30
    "imp": (98.5, 99.5, 95.5, 98.6),  # issue 30: at least ProtoNet's targets of the time
    "versa": (99.0, None, 96.0, None),  # issue 29, and an ECE below ProtoNet's on the same test episodes
}
RUNS = Path("runs/bench/omniglot_metric")
# ProtoNets train 60-way whatever the test ways, so one model per shot serves the 5-way and 20-way cells. A
# Siamese verifier scores pairs, whatever the ways and shots, so one model (trained on 20-way episodes, the
# most negatives per episode) serves all four cells, as one verification net does in the paper.
TRAININGS = {"protonet-1shot": ("5w1s", "20w1s"), "protonet-5shot": ("5w5s", "20w5s"), "siamese": CELLS} | {
    f"{m}-{c}": (c,) for m in ("matching", "relation", "gnn", "imp") for c in CELLS
}
# Alphabet-level Omniglot (task.label_level: alphabet, 10-way 10-shot): a class is an alphabet, its examples
# distinct characters of it; IMP against ProtoNet on the same task (configs/<method>_omniglot_alphabet.yaml).
ALPHABET = "alphabet"
TRAININGS |= {f"{m}-{ALPHABET}": (ALPHABET,) for m in ("imp", "protonet")}
TRAININGS |= {f"versa-{c}": (c,) for c in ("5w1s", "20w1s")}  # VERSA trains with the test ways, as its paper
# Transfer baselines (algo: transfer; Chen et al., ICLR 2019): pretraining does not depend on ways or shots, so
# one network serves all four cells (each episode's head is built from its support set at test time). No
# published Omniglot figures entered (none verified from the paper), no targets yet.
TRANSFER = ("transfer_proto", "transfer_finetune", "baselinepp")
SECTIONS = dict.fromkeys(TRANSFER, "transfer")
"""The config section of a method named other than its algorithm (``<method>`` otherwise)."""
METHODS = (*METHODS, *TRANSFER)
PUBLISHED |= dict.fromkeys(TRANSFER, (None, None, None, None))
TARGETS |= dict.fromkeys(TRANSFER, (None, None, None, None))
TRAININGS |= dict.fromkeys(TRANSFER, CELLS)
CONFIGS = [*TRAININGS, "speed"]


def figures(method: str, cell: str) -> tuple[float | None, float | None]:
    """(published, target) test accuracy of ``method`` on ``cell``; none for the alphabet task (no figure of
    the IMP paper recalled for sure: IMP is judged against ``protonet-alphabet``)."""
    if cell == ALPHABET:
        return None, None
    i = CELLS.index(cell)
    return PUBLISHED[method][i], TARGETS[method][i]


def train_and_test(
    name: str,
    minutes: float,
    steps: int | None,
    episodes: int,
    runs: Path | None = None,
    sets: tuple[str, ...] = (),
) -> list[dict]:
    """Train configuration ``name`` (resuming its run directory in ``runs``, default :data:`RUNS`) with the
    config overrides ``sets`` (``--set``; recorded) and test it on each cell it serves."""
    method, cells = name.split("-")[0], TRAININGS[name]
    overrides = [*budget_overrides(minutes, steps, episodes), *sets]
    trained = train(config_path(f"{method}_omniglot_{cells[0]}"), overrides, (runs or RUNS) / name)
    out = []
    for cell in cells:
        published, target = figures(method, cell)
        # The same trained weights (and running statistics) tested with each BatchNorm mode: the config's mode
        # (inductive) is the method's record, the other one a record of its own beside it.
        for mode in BATCHNORM_MODES:
            tester, _, _ = build(
                config_path(f"{method}_omniglot_{cell}"),
                [*overrides, f"{SECTIONS.get(method, method)}.batchnorm={mode}"],
            )
            tester.model.load_state_dict(trained.learner.model.state_dict())
            tester.model.eval()
            test = tester.evaluate("test", episodes)
            out.append(
                accuracy_record(
                    "omniglot_metric",
                    f"omniglot-vinyals-{cell}",
                    method if mode == "inductive" else f"{method}-transductive",
                    trained,
                    test,
                    published=published,
                    target=target,
                    label=f"{name} on {cell}, {mode} BatchNorm",
                    training=name,
                    batchnorm=mode,
                    # calibration on the same test episodes for every method (VERSA's ECE vs ProtoNet's)
                    ece=test.get("test/ece"),
                    ece_interval=[test.get("test/ece_low"), test.get("test/ece_high")],
                    nll=test.get("test/nll"),
                    **({"overrides": list(sets)} if sets else {}),
                )
            )
    return out


BASELINE = "plain-loop"
BASELINE_NOTE = (
    "plain PyTorch: the whole episode (support and query) through the network in one batch, prototypes as "
    "per-class means, cross-entropy on negative squared distances, backward, Adam step"
)


def plain_protonet_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    support: torch.Tensor,
    query: torch.Tensor,
    query_y: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """One ProtoNet training step as a user would write it in plain PyTorch; returns the loss (detached).

    ``support`` ``(N*K, C, H, W)`` grouped by class, ``query`` ``(N*Q, C, H, W)`` with labels ``query_y``."""
    z = model(torch.cat([support, query]))  # (N*(K+Q), D): one forward pass for the whole episode
    prototypes = z[: support.shape[0]].view(n, support.shape[0] // n, -1).mean(1)  # (N, D)
    logits = -torch.cdist(z[support.shape[0] :], prototypes).pow(2)  # (N*Q, N)
    loss = F.cross_entropy(logits, query_y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def speed(seconds: float = 30.0, device: str = "cpu") -> list[dict]:
    """Training episodes/s of ProtoNet, 20-way 5-shot 15-query: metalab's training step vs the plain PyTorch loop
    (:func:`plain_protonet_step`) on the same model, optimiser and machine, in the same run."""
    dev = resolve_device(device)
    run = load_run_config(
        "configs/protonet_omniglot_20w5s.yaml", ["task.train_ways=20", "task.train_queries=15"]
    )
    seed_everything(0)
    learner = protonet.build(run, data_root(), dev)
    model = learner.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def metalab_step(i: int) -> None:
        loss, _ = learner.loss(i)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sampler = make_sampler(run.task, "train", 0, data_root())

    def plain_step(i: int) -> None:
        ep = sampler.sample(i, 1).task(0)
        plain_protonet_step(
            model, opt, ep.support_x.to(dev), ep.query_x.to(dev), ep.query_y.to(dev), ep.n_way
        )

    rates = {}
    for method, step in (("metalab", metalab_step), (BASELINE, plain_step)):
        step(0)
        sync(dev)
        start, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - start < seconds:
            step(n + 1)
            n += 1
        sync(dev)
        elapsed = time.perf_counter() - start
        rates[method] = (n / elapsed, n, elapsed)
    task = "omniglot-20w5s15q-train"
    on = device_name(dev)
    out = [
        record(
            "omniglot_metric",
            task,
            m,
            "train_episodes_per_s",
            r,
            unit="episodes/s",
            steps=n,
            seconds=s,
            device=on,
            threads=torch.get_num_threads(),
            **({"note": BASELINE_NOTE} if m == BASELINE else {}),
        )
        for m, (r, n, s) in rates.items()
    ]
    ratio = rates["metalab"][0] / rates[BASELINE][0]
    threads = torch.get_num_threads()
    speedup = f"speedup_vs_{BASELINE}"
    out.append(
        record(
            "omniglot_metric",
            task,
            "metalab",
            speedup,
            ratio,
            unit="x",
            device=on,
            threads=threads,
            baseline=BASELINE_NOTE,
        )
    )
    print(
        f"ProtoNet 20w5s15q training: metalab {rates['metalab'][0]:.2f} ep/s, plain PyTorch loop "
        f"{rates[BASELINE][0]:.2f} ep/s: {ratio:.2f}x"
    )
    return out


def plot() -> Path | None:
    """Val accuracy (periodic, 200 episodes) vs training minutes, one panel per cell, from every run so far."""
    panels = {  # periodic evaluations use the first cell's ways
        f"Omniglot {cell}": [
            Curve(name, RUNS / name) for name, served in TRAININGS.items() if served[0] == cell
        ]
        for cell in (*CELLS, ALPHABET)
    }
    return plot_accuracy(panels, RESULTS / "omniglot_metric.png", "training minutes (2-core CPU)")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    add_budget_args(p, test_episodes=1000)
    p.add_argument("--speed-seconds", type=float, default=30.0, help="time per speed measurement")
    p.add_argument("--device", default="cpu", help="device of the speed measurement: cpu, cuda or auto")
    add_set_arg(p)
    args = parse_args(p, argv)  # a dirty tree is refused here, before any training
    label = current_label()
    runs = None if label is None else RUNS / label
    for name in args.only or CONFIGS:
        recs = (
            speed(args.speed_seconds, args.device)
            if name == "speed"
            else train_and_test(
                name, args.minutes, args.steps, args.test_episodes, runs, tuple(args.overrides)
            )
        )
        print(merge_results("omniglot_metric", recs))
        if label is None:  # the figure shows the main runs only
            plot()


if __name__ == "__main__":
    main()
