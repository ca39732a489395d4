"""CPU training throughput of the Conv-4 learners: metalab's step against a plain PyTorch loop and the conv peak.

    python -m benchmarks.throughput                                          # every configuration
    python -m benchmarks.throughput --only protonet-60w5s5q --candidates compile,bf16
    python -m benchmarks.throughput --only peak maml-5w1s-mb32 --threads 1 --candidates none

Run it on an otherwise idle machine: ratios are taken within one run, but a busy CPU distorts them too.

``peak``: the machine's measured convolution peak (:mod:`benchmarks.conv_peak`).

Training steps, each the shipped config's (``configs/*.yaml``) learner as ``algorithm(run.algo).build`` makes
it: ``learner.loss(step)``, backward, an Adam step.

* ``protonet-60w5s5q``: ProtoNet, 60-way 5-shot 5 queries per class, one episode per step (600 images).
* ``relation-5w1s``: Relation network, 5-way 1-shot 19 queries, one episode (100 images, 95x5 pairs).
* ``snail-5w1s``: SNAIL, 5-way 1-shot 5 queries, meta-batch 16 (480 images).
* ``maml-5w1s-mb32`` / ``fomaml-5w1s-mb32``: MAML second / first order, strided Conv-4, 5-way 1-shot 15
  queries, one inner step, meta-batch 32 (2560 images), metalab's default task batching on CPU.

Each against ``plain-loop``, the loop a user would write for the same network (a copy of the learner's model at
the same initial weights, default memory format, its own Adam): the whole episode through the ``nn.Module``s in
one batch, the loss, backward, step (:func:`plain_relation_step`, :func:`plain_snail_step`; ProtoNet's is
:func:`benchmarks.omniglot_metric.plain_protonet_step`, MAML's :func:`benchmarks.maml_speed.torch_loop_maml`,
a loop over tasks since each task has its own adapted weights). Same shapes, same thread count, same run.
Records per method: ``seconds_per_step`` (median of ``--steps`` steps after ``--warmup``, methods interleaved
step by step so that a change of machine load hits them alike), ``images_per_s``, ``episodes_per_s`` (tasks/s),
``init_loss_rel_diff`` (first-step loss against metalab's, same episode and initial weights); metalab's
``speedup_vs_plain-loop`` and ``fraction_of_conv_peak``: conv FLOPs of one step / median time / the peak at
that thread count measured in the same run, of the precision the step computes in (``conv_peak_dtype``: the
bfloat16 peak for a step under bfloat16 autocast). A step's conv FLOPs are counted once by
``torch.utils.flop_counter.FlopCounterMode`` on the aten convolution ops the step actually runs (forward,
backward, MAML's double backward; a backward counts only the gradients it computes, so no input gradient for
the first layer); other ops (linear layers, attention, pooling) are not counted, so the fraction is a lower
bound of the machine's use.

Data loading is excluded and measured separately: while the learner is built its training sampler is replaced
by one that replays episodes drawn before timing (``--pool`` of them, cycled), and drawing them is timed as
method ``sampler`` (``seconds_per_step``: one meta-batch). The plain loop gets the same episodes.

Candidate fast paths (``--candidates``, comma-separated, default all; ``none``), each measured against the
default step on the ProtoNet and MAML configurations (method ``metalab+<candidate>``, ``speedup_vs_metalab``;
Relation and SNAIL take ``bf16`` only); ``compile`` and ``layout`` run under the default step's autocast, so
that only the candidate differs. A candidate whose first step raises is recorded as
``runs`` 0 with the error:

* ``compile``: ``torch.compile`` of ProtoNet's embedding, and of MAML's per-task loss (inner step included:
  dynamo refuses a compiled module called inside an eager ``torch.func.grad``). Records ``compiles``: 1 where
  the compiled function became graphs without a graph break or a frame dynamo ran eagerly, else 0, with the
  graphs (``compiled_graphs``), the breaks and the reasons dynamo gave (``eager_fallback``); the first step's
  time, compilation included, is ``first_step_s`` of ``seconds_per_step``.
* ``layout``: the other memory format (contiguous for ProtoNet, which trains channels-last; channels-last for
  MAML, which trains contiguous).
* ``bf16``: for ProtoNet, Relation and SNAIL, the learner rebuilt with the other ``train.autocast`` setting
  (method ``metalab+autocast-none`` where the shipped config trains under bfloat16 autocast, as theirs do
  since this benchmark measured it, ``metalab+autocast-bf16`` otherwise), on the same episodes; for MAML and
  FOMAML (no ``train.autocast``), the whole step under ``torch.autocast("cpu", torch.bfloat16)``. Records
  whether the CPU has native bf16 (``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo).
* ``threads``: the default step and the plain loop again at the other of 1 and 2 intra-op threads
  (``torch.set_num_threads``), interleaved with the rest; their records go under that thread count's task.
  Inter-op threads can only be set once per process: ``--interop-threads`` (recorded in every record).

``--ways`` / ``--queries`` / ``--meta-batch`` shrink a configuration for a quick look (the task name says the
shape). Records go to ``results/throughput.json``; provenance flags (``--allow-dirty``, ``--label``):
:mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS, merge_results, parse_args, parser, record
from benchmarks.conv_peak import best_peak, counted_conv_flops, peaks_at
from benchmarks.maml_speed import Problem, torch_loop_maml
from benchmarks.omniglot_metric import plain_protonet_step
from metalab.data import tasks
from metalab.data.episodes import Episode
from metalab.data.root import data_root
from metalab.errors import DataError
from metalab.experiment import RunConfig, algorithm, load_run_config
from metalab.meta import episodic, gbml, maml, protonet, snail
from metalab.meta.relation import RelationNet
from metalab.train.loop import Learner
from metalab.train.precision import cpu_bf16_flags
from metalab.utils import seed_everything

BENCH = "throughput"
REPO = Path(__file__).resolve().parents[1]
PLAIN = "plain-loop"
CANDIDATES = ("compile", "layout", "bf16", "threads")
"""The peak's layouts: float32 in either memory format, and channels-last under bfloat16 autocast."""
DATA_NOTE = "excluded: episodes drawn before timing and replayed (method 'sampler' times drawing them)"

PlainStep = Callable[[nn.Module, torch.optim.Optimizer, Episode], torch.Tensor | None]
"""(model, optimiser, batched episode) -> the loss before the update (None where the loop does not return it)."""


def bf16_native() -> dict[str, Any]:
    """Whether the CPU computes bfloat16 natively (:func:`~metalab.train.precision.cpu_bf16_flags`): for records."""
    flags = cpu_bf16_flags()
    return {"bf16_native": None if flags is None else bool(flags), "bf16_flags": flags or []}


class Replay:
    """A training sampler that hands out episodes drawn beforehand (:meth:`fill`), cycling through them, so that
    timed steps do not draw data; batch ``step`` is the wrapped sampler's batch ``step % pool``."""

    def __init__(self, base: Any):
        self.base = base
        self.pool: list[Episode] = []

    def fill(self, count: int, batch: int) -> list[float]:
        """Draw batches ``0 .. count-1`` of ``batch`` tasks; returns the seconds each draw took."""
        seconds = []
        for i in range(count):
            start = time.perf_counter()
            self.pool.append(self.base.sample(i, batch))
            seconds.append(time.perf_counter() - start)
        return seconds

    def sample(self, step: int, batch: int) -> Episode:
        if not self.pool:
            return self.base.sample(step, batch)
        return self.pool[step % len(self.pool)]


@contextlib.contextmanager
def replayed_samplers() -> Iterator[list[tuple[str, Replay]]]:
    """While open, the learners' ``make_sampler`` returns :class:`Replay` wrappers; yields ``(part, replay)``
    of every one made."""
    made: list[tuple[str, Replay]] = []

    def make(cfg: tasks.TaskConfig, part: str, seed: int, root: Path) -> Replay:
        made.append((part, Replay(tasks.make_sampler(cfg, part, seed, root))))
        return made[-1][1]

    with contextlib.ExitStack() as stack:
        for module in (episodic, gbml, snail):
            stack.enter_context(mock.patch.object(module, "make_sampler", make))
        yield made


def with_autocast(run: RunConfig, setting: str) -> RunConfig:
    """``run`` with ``train.autocast`` set to ``setting``."""
    return dataclasses.replace(run, train=dataclasses.replace(run.train, autocast=setting))


def build_learner(run: RunConfig, root: Path, name: str) -> tuple[Learner, Replay]:
    """The learner ``algorithm(run.algo).build`` makes, with its training sampler replayed. A missing data set
    ends the run with a message naming the configuration and the data root."""
    seed_everything(run.seed)
    try:
        with replayed_samplers() as made:
            learner = algorithm(run.algo).build(run, root, torch.device("cpu"))
    except DataError as e:
        raise SystemExit(
            f"{name}: Omniglot is missing under the data root {root} (--data-root or $METALAB_DATA): {e}"
        ) from None
    return learner, next(r for part, r in made if part == "train")


# --------------------------------------------------------------------------------------------- plain loops


def plain_protonet(model: nn.Module, opt: torch.optim.Optimizer, ep: Episode) -> torch.Tensor:
    """:func:`~benchmarks.omniglot_metric.plain_protonet_step` on the one task of ``ep``."""
    task = ep.task(0)
    return plain_protonet_step(model, opt, task.support_x, task.query_x, task.query_y, ep.n_way)


def plain_relation_step(model: RelationNet, opt: torch.optim.Optimizer, ep: Episode) -> torch.Tensor:
    """One Relation Network step as a user would write it: the episode's images through the embedding in one
    batch, class maps summed over shots, every (class, query) pair through the relation module in one batch,
    MSE of the sigmoid scores to the one-hot match."""
    task, n, k = ep.task(0), ep.n_way, ep.k_shot
    maps = model.encoder(torch.cat([task.support_x, task.query_x]))  # (N*(K+Q), C, h, w)
    classes = maps[: n * k].unflatten(0, (n, k)).sum(1)  # (N, C, h, w)
    query = maps[n * k :]  # (N*Q, C, h, w)
    pairs = torch.cat(
        [classes.repeat(len(query), 1, 1, 1), query.repeat_interleave(n, 0)], 1
    )  # (N*Q*N, 2C, h, w)
    scores = torch.sigmoid(model.relation(pairs)).view(len(query), n)  # (N*Q, N)
    loss = F.mse_loss(scores, F.one_hot(task.query_y, n).float())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def plain_snail_step(model: snail.SNAIL, opt: torch.optim.Optimizer, ep: Episode) -> torch.Tensor:
    """One SNAIL step as a user would write it: every image of the meta-batch through the embedding in one
    batch, then one whole sequence per query (the task's support, then that query with a zero label) through
    the network in one batch, cross-entropy at each sequence's last position."""
    t, s = ep.support_y.shape
    q = ep.query_y.shape[1]
    images = torch.cat([ep.support_x, ep.query_x], 1).flatten(0, 1)  # (T*(S+Q), 1, H, W)
    z = model.embed_norm(model.encoder(images)).view(t, s + q, -1)  # (T, S+Q, D)
    support = z[:, None, :s].expand(-1, q, -1, -1)  # (T, Q, S, D)
    seqs = torch.cat([support, z[:, s:, None]], 2).flatten(0, 1)  # (T*Q, S+1, D)
    shown = F.one_hot(ep.support_y, model.n_way).float()[:, None].expand(-1, q, -1, -1)  # (T, Q, S, M)
    labels = F.pad(shown, (0, 0, 0, 1)).flatten(0, 1)  # (T*Q, S+1, M): the query's label is all zero
    logits = model(seqs, labels)[:, -1]  # (T*Q, M)
    loss = F.cross_entropy(logits, ep.query_y.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def plain_maml(run: RunConfig) -> PlainStep:
    """:func:`~benchmarks.maml_speed.torch_loop_maml` (per task ``autograd.grad`` inner steps on a functional
    call, one backward of the mean query loss), then an Adam step; first order as the config says."""
    cfg: maml.Config = run.params

    def step(model: nn.Module, opt: torch.optim.Optimizer, ep: Episode) -> None:
        opt.zero_grad()
        problem = Problem("plain", model, ep, False, cfg.inner_lr)
        torch_loop_maml(problem, cfg.inner_steps, cfg.first_order)()
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------- candidates


class Formatted(nn.Module):
    """``module`` with its input put in ``memory_format`` first (the module's weights should match it)."""

    def __init__(self, module: nn.Module, memory_format: torch.memory_format):
        super().__init__()
        self.module, self.memory_format = module, memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=self.memory_format))


def protonet_variant(run: RunConfig, model: nn.Module, candidate: str) -> Callable[[Episode], torch.Tensor]:
    """ProtoNet's training loss (``build_episodic``'s: cross-entropy of :func:`protonet.episode_logits`) on
    ``model`` (a fresh copy) with the embedding compiled, or contiguous instead of channels-last."""
    if candidate == "compile":
        encoder: nn.Module = torch.compile(model)
    else:  # layout: embed_tasks hands channels-last images; the wrapper makes them contiguous again
        encoder = Formatted(model.to(memory_format=torch.contiguous_format), torch.contiguous_format)
    return lambda ep: episodic.cross_entropy(protonet.episode_logits(encoder, ep), ep)


def maml_variant(run: RunConfig, model: nn.Module, candidate: str) -> Callable[[Episode], torch.Tensor]:
    """MAML's training loss as ``maml.build`` composes it, on ``model`` (a fresh copy), with the per-task loss
    (inner step and query loss) compiled, or with the network channels-last."""
    cfg: maml.Config = run.params
    if candidate == "layout":
        model = Formatted(model.to(memory_format=torch.channels_last), torch.channels_last)
    batching = gbml.task_batching(run.algo, cfg, model, not cfg.first_order, grad_loop=True)
    inner = gbml.Inner(model, False, cfg.inner_lr, cfg.inner_steps, cfg.first_order)
    per_task = functools.partial(maml.query_loss, inner)
    if candidate == "compile":
        per_task = torch.compile(per_task)
    train_loss = gbml.mean_query_loss(per_task, batching, gbml.params_of(model), False)
    return lambda ep: train_loss(0, ep)[0]


@dataclass(frozen=True)
class Setup:
    """A training configuration: its shipped config, its plain loop, and how candidates rebuild its loss."""

    config: str
    plain: Callable[[RunConfig], PlainStep]
    variant: Callable[[RunConfig, nn.Module, str], Callable[[Episode], torch.Tensor]] | None = None
    """(run, model copy, candidate) -> loss of a batched episode, for ``compile`` and ``layout``; None: the
    configuration takes ``bf16`` only."""


SETUPS = {
    "protonet-60w5s5q": Setup(
        "configs/protonet_omniglot_5w5s.yaml", lambda run: plain_protonet, protonet_variant
    ),
    "relation-5w1s": Setup("configs/relation_omniglot_5w1s.yaml", lambda run: plain_relation_step),
    "snail-5w1s": Setup("configs/snail_omniglot_5w1s.yaml", lambda run: plain_snail_step),
    "maml-5w1s-mb32": Setup("configs/maml_omniglot_5w1s.yaml", plain_maml, maml_variant),
    "fomaml-5w1s-mb32": Setup("configs/fomaml_omniglot_5w1s.yaml", plain_maml, maml_variant),
}
CONFIGS = ["peak", *SETUPS]


# -------------------------------------------------------------------------------------------- measurement


@dataclass(eq=False)
class Method:
    """One way of taking a training step: ``step(i)`` trains on batch ``i`` and returns the loss before the
    update (or None); ``model`` is what it trains (reset to the initial weights before its first step)."""

    name: str
    """The record's method (``metalab``, ``plain-loop``, ``metalab+<candidate>``)."""
    step: Callable[[int], torch.Tensor | None]
    model: nn.Module
    threads: int
    init: dict[str, torch.Tensor]
    """The initial weights (a state dict), loaded into ``model`` before the first step."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields for its records (e.g. the memory format)."""
    bf16: bool = False
    """Whether its convolutions run in bfloat16 (its conv-peak fraction is then against the bfloat16 peak)."""

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.threads


def optimised(
    model: nn.Module, loss: Callable[[int], torch.Tensor], lr: float, autocast: bool = False
) -> Callable[[int], torch.Tensor]:
    """A training step on ``loss(i)``: backward and an Adam step on ``model``'s parameters (its own Adam);
    ``autocast``: the loss under CPU bfloat16 autocast."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(i: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss(i)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return value.detach()

    return step


def compile_report() -> dict[str, Any]:
    """What dynamo did since its counters were last cleared: graphs compiled, graph breaks, and the first reason
    it gave up on a frame (run eagerly instead)."""
    from torch._dynamo.utils import counters

    reasons = sorted({str(r).split("\n")[0][:200] for r in counters["unimplemented"]})
    return {
        "compiled_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "eager_fallback": "; ".join(reasons) or None,
    }


def first_steps(
    methods: list[Method],
) -> tuple[list[Method], dict[tuple[str, int], tuple[float | None, float]]]:
    """Each method's first step (batch 0) from the initial weights: (its loss, seconds). Untimed: it holds
    one-off costs such as compilation. A candidate that fails there is dropped (its ``extra`` says why);
    returns the methods that ran and their first steps."""
    from torch._dynamo.utils import counters

    ran, out = [], {}
    for m in methods:
        torch.set_num_threads(m.threads)
        m.model.load_state_dict(m.init)
        if "compile" in m.name:  # what an earlier configuration compiled (or gave up on) must not be reused
            torch._dynamo.reset()
        counters.clear()
        start = time.perf_counter()
        try:
            loss = m.step(0)
        except Exception as e:  # a candidate that fails is a result, not a crash
            if "+" not in m.name:
                raise
            m.extra["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            continue
        out[m.key] = (None if loss is None else float(loss), time.perf_counter() - start)
        if "compile" in m.name:
            m.extra |= compile_report()
        ran.append(m)
    return ran, out


def time_methods(methods: list[Method], warmup: int, steps: int) -> dict[tuple[str, int], list[float]]:
    """Seconds of each of ``steps`` steps per method after ``warmup``, methods interleaved step by step, each at
    its thread count; batches from 1 on (batch 0 was the first step)."""
    times: dict[tuple[str, int], list[float]] = {m.key: [] for m in methods}
    for r in range(warmup + steps):
        for m in methods:
            torch.set_num_threads(m.threads)
            start = time.perf_counter()
            m.step(1 + r)
            if r >= warmup:
                times[m.key].append(time.perf_counter() - start)
    return times


# -------------------------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Shape:
    """A training step's shape: ways, shots, queries per class, tasks."""

    ways: int
    shots: int
    queries: int
    tasks: int

    @property
    def images(self) -> int:
        return self.tasks * self.ways * (self.shots + self.queries)

    def task(self, algo: str, threads: int) -> str:
        s = f"{self.ways}w{self.shots}s{self.queries}q-mb{self.tasks}"
        return f"omniglot-{algo}-{s}-train-{threads}thread{'s' * (threads > 1)}"


def load_run(name: str, args: argparse.Namespace) -> tuple[RunConfig, Shape, str]:
    """The configuration's run config with the ``--ways`` / ``--queries`` / ``--meta-batch`` overrides, its
    step shape, and the algorithm's name in records (``fomaml`` for first-order MAML)."""
    config = REPO / SETUPS[name].config  # the path is the repository's, wherever the script runs from
    algo = load_run_config(config, []).algo
    overrides = []
    if args.ways:  # the trained ways; a network with a label input or head (SNAIL, MAML) needs as many
        overrides += [f"task.train_ways={args.ways}"] + (
            [f"task.ways={args.ways}"] if algo != "protonet" else []
        )
    if args.queries:
        overrides.append(f"task.train_queries={args.queries}")
    run = load_run_config(config, overrides)
    if args.meta_batch and run.train.meta_batch > 1:  # the one-episode configurations keep one episode
        run = load_run_config(config, [*overrides, f"train.meta_batch={args.meta_batch}"])
    t = run.task
    shape = Shape(t.train_ways or t.ways, t.shots, t.train_queries or t.queries, run.train.meta_batch)
    first_order = getattr(run.params, "first_order", False)
    return run, shape, "fomaml" if algo == "maml" and first_order else algo


def make_methods(
    name: str, run: RunConfig, learner: Learner, replay: Replay, args: argparse.Namespace
) -> list[Method]:
    """metalab's default step and the plain loop at ``args.threads``, and the candidates that apply."""
    setup, lr, mb = SETUPS[name], run.train.lr, run.train.meta_batch
    base = torch.get_num_threads()
    init = copy.deepcopy(learner.model.state_dict())

    def default(i: int) -> torch.Tensor:
        return learner.loss(i)[0]

    def plain(threads: int) -> Method:
        model = copy.deepcopy(learner.model).to(memory_format=torch.contiguous_format)
        opt, step = torch.optim.Adam(model.parameters(), lr=lr), setup.plain(run)
        return Method(PLAIN, lambda i: step(model, opt, replay.sample(i, mb)), model, threads, init)

    bf16 = learner.autocast and run.train.autocast == "bf16"

    def mine(threads: int) -> Method:
        return Method(
            "metalab", optimised(learner.model, default, lr), learner.model, threads, init, bf16=bf16
        )

    methods = [mine(base), plain(base)]
    # Relation and SNAIL: their train.autocast setting only (no variant to compile or re-lay out)
    candidates = args.candidates if setup.variant is not None else [c for c in args.candidates if c == "bf16"]
    for c in candidates:
        if c == "threads":
            for t in (1, 2):
                if t != base:
                    methods += [mine(t), plain(t)]
        elif c == "bf16" and learner.autocast:  # the learner's other train.autocast setting, rebuilt
            other = "none" if run.train.autocast == "bf16" else "bf16"
            alt, alt_replay = build_learner(with_autocast(run, other), args.data_root, name)
            alt_replay.fill(len(replay.pool), mb)  # the same episodes (the samplers are seeded alike)
            step = optimised(alt.model, lambda i, alt=alt: alt.loss(i)[0], lr)
            extra = {"candidate": c, "autocast": other} | bf16_native()
            methods.append(
                Method(f"metalab+autocast-{other}", step, alt.model, base, init, extra, other == "bf16")
            )
        elif c == "bf16":  # the whole step under CPU bfloat16 autocast (MAML: no train.autocast)
            step = optimised(learner.model, default, lr, autocast=True)
            methods.append(Method("metalab+bf16", step, learner.model, base, init, bf16_native(), bf16=True))
        else:  # compile, layout: the loss rebuilt from the library's functions on a copy of the model
            model = copy.deepcopy(learner.model)
            loss = setup.variant(run, model, c)
            # under the default step's autocast, so that only the candidate differs
            step = optimised(model, lambda i, loss=loss: loss(replay.sample(i, mb)), lr, autocast=bf16)
            label = c
            if c == "layout":
                label = "contiguous" if name.startswith("protonet") else "channels-last"
            methods.append(Method(f"metalab+{label}", step, model, base, init, {"candidate": c}, bf16))
    return methods


def bench_config(name: str, args: argparse.Namespace) -> list[dict]:
    """Time one training configuration's methods; its records."""
    run, shape, algo = load_run(name, args)
    threads = torch.get_num_threads()
    learner, replay = build_learner(run, args.data_root, name)
    draws = replay.fill(min(args.pool, 1 + args.warmup + args.steps), run.train.meta_batch)
    methods = make_methods(name, run, learner, replay, args)
    flops = counted_conv_flops(lambda: learner.loss(0)[0].backward())
    learner.model.zero_grad(set_to_none=True)
    ran, first = first_steps(methods)
    times = time_methods(ran, args.warmup, args.steps)
    ctx = {
        "config": SETUPS[name].config,
        "images_per_step": shape.images,
        "episodes_per_step": shape.tasks,
        "warmup": args.warmup,
        "interop_threads": torch.get_num_interop_threads(),
        "data": DATA_NOTE,
    }
    records = [
        record(BENCH, shape.task(algo, threads), "sampler", "seconds_per_step",
               statistics.median(draws), unit="s", steps=len(draws), seconds=sum(draws),
               device=cpu(threads), threads=threads, note="drawing one meta-batch of episodes", **ctx)
    ]  # fmt: skip
    records += failed_candidates([m for m in methods if m not in ran], shape.task(algo, threads), ctx)
    for m in ran:
        records += method_records(m, (shape, algo), times, first, flops, ctx=ctx, args=args)
    return records


def cpu(threads: int) -> str:
    """:func:`benchmarks.common.device_name` at ``threads`` torch threads."""
    return f"cpu ({os.cpu_count()} cores, {threads} torch threads)"


def failed_candidates(methods: list[Method], task: str, ctx: dict[str, Any]) -> list[dict]:
    """``runs`` 0 for each candidate whose first step raised, with the error."""
    return [
        record(BENCH, task, m.name, "runs", 0.0, unit="bool", device=cpu(m.threads), threads=m.threads,
               **ctx, **m.extra)
        for m in methods
    ]  # fmt: skip


def method_records(
    m: Method,
    shaped: tuple[Shape, str],
    times: dict[tuple[str, int], list[float]],
    first: dict[tuple[str, int], tuple[float | None, float]],
    flops: int,
    *,
    ctx: dict[str, Any],
    args: argparse.Namespace,
) -> list[dict]:
    """Records of one method: time, images/s, episodes/s, the first-step loss against metalab's; for metalab's
    steps the fraction of the conv peak and the speedup against the plain loop, or the default step."""
    shape, algo = shaped
    task, on, seconds = shape.task(algo, m.threads), cpu(m.threads), times[m.key]
    median = statistics.median(seconds)
    extra = {**ctx, **m.extra, "threads": m.threads}

    def rec(metric: str, value: float, unit: str, **more: Any) -> dict:
        return record(BENCH, task, m.name, metric, value, unit=unit, device=on, **extra, **more)

    out = [
        rec("seconds_per_step", median, "s", steps=len(seconds), seconds=sum(seconds), min_s=min(seconds),
            max_s=max(seconds), first_step_s=first[m.key][1]),
        rec("images_per_s", shape.images / median, "images/s"),
        rec("episodes_per_s", shape.tasks / median, "episodes/s"),
    ]  # fmt: skip
    loss, reference = first[m.key][0], first.get(("metalab", m.threads), (None, 0.0))[0]
    if m.name != "metalab" and loss is not None and reference is not None:
        out.append(rec("init_loss_rel_diff", abs(loss - reference) / abs(reference), "ratio",
                       note="first-step loss against metalab's: same episode, same initial weights"))  # fmt: skip
    if m.name == PLAIN:
        return out
    if (
        "compiled_graphs" in m.extra
    ):  # 1: one whole graph; 0: graph breaks or eager code (eager_fallback: why)
        out.append(
            rec("compiles", float(m.extra["compiled_graphs"] > 0 and not m.extra["eager_fallback"]), "bool")
        )
    peak = best_peak(m.threads, args, m.bf16).gflops  # the peak of the precision the step computes in
    out.append(rec("fraction_of_conv_peak", flops / median / (peak * 1e9), "ratio", conv_gflop_per_step=flops / 1e9,
                   conv_peak_gflops=peak, conv_peak_dtype="bfloat16" if m.bf16 else "float32",
                   flops="torch.utils.flop_counter, aten convolution ops of one step"))  # fmt: skip
    against = PLAIN if m.name == "metalab" else "metalab"
    if (against, m.threads) in times:
        ratio = statistics.median(times[against, m.threads]) / median
        out.append(rec(f"speedup_vs_{against}", ratio, "x"))
    if m.name == "metalab" and m.threads != 1 and ("metalab", 1) in times:
        out.append(rec("speedup_vs_1thread", statistics.median(times["metalab", 1]) / median, "x"))
    return out


def bench_peak(args: argparse.Namespace) -> list[dict]:
    """The conv peak at 1 and 2 threads, one record per layout and the best per thread count."""
    records = []
    for threads in (1, 2):
        for p in peaks_at(threads, args):
            task = f"conv2d-64to64-3x3-{p.side}x{p.side}-b{p.batch}-{threads}thread{'s' * (threads > 1)}"
            records.append(
                record(BENCH, task, p.memory_format, "gflops", p.gflops, unit="GFLOP/s", steps=len(p.seconds),
                       seconds=sum(p.seconds), device=cpu(threads), threads=threads, warmup=args.warmup,
                       flops_per_step=p.flops, flops="analytic: 2*Cin*Cout*k*k*Hout*Wout per image forward, "
                       "backward 2x forward (input and weight gradients)")
            )  # fmt: skip
        for bf16 in (False, True):
            best = best_peak(threads, args, bf16)
            records.append(
                record(BENCH, f"conv-peak-{'bf16-' * bf16}{threads}thread{'s' * (threads > 1)}", "best-layout",
                       "gflops", best.gflops, unit="GFLOP/s", device=cpu(threads), threads=threads, side=best.side,
                       memory_format=best.memory_format, batch=best.batch, **(bf16_native() if bf16 else {}))
            )  # fmt: skip
    return records


# ---------------------------------------------------------------------------------------------------- CLI


def parse_candidates(text: str) -> tuple[str, ...]:
    """``all``, ``none`` or a comma-separated subset of :data:`CANDIDATES`."""
    if text == "all":
        return CANDIDATES
    if text == "none":
        return ()
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in chosen if c not in CANDIDATES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown candidate {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}, all or none"
        )
    return chosen


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    p.add_argument("--steps", type=int, default=10, help="timed steps per method (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method after the first one")
    p.add_argument("--candidates", type=parse_candidates, default=CANDIDATES, metavar="LIST",
                   help=f"fast paths to measure on ProtoNet and MAML: comma-separated of {', '.join(CANDIDATES)}; "
                   "all (default) or none")  # fmt: skip
    p.add_argument("--interop-threads", type=int, help="torch inter-op threads (default: torch's)")
    p.add_argument("--peak-batch", type=int, default=256, help="images of 28x28 maps in the peak's conv")
    p.add_argument("--pool", type=int, default=8, help="distinct episodes drawn before timing, then cycled")
    p.add_argument("--ways", type=int, help="shrink: trained ways (default: the config's)")
    p.add_argument("--queries", type=int, help="shrink: trained queries per class (default: the config's)")
    p.add_argument(
        "--meta-batch", type=int, help="shrink: tasks per step of SNAIL and MAML (default: theirs)"
    )
    p.add_argument("--data-root", type=Path, default=None, help="data root (default: $METALAB_DATA)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where throughput.json goes")
    args = parse_args(p, argv)
    if (
        min(args.steps, args.peak_batch, args.pool, args.ways or 1, args.queries or 1, args.meta_batch or 1)
        < 1
    ):
        p.error("--steps, --peak-batch, --pool, --ways, --queries and --meta-batch must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)  # before any inter-op work, so first
    args.data_root = data_root(args.data_root)
    threads = torch.get_num_threads()
    for name in args.only or CONFIGS:
        torch.set_num_threads(threads)
        records = bench_peak(args) if name == "peak" else bench_config(name, args)
        torch.set_num_threads(threads)
        report(records)
        path = merge_results(BENCH, records, args.results_dir)
    print(path)


def report(records: list[dict]) -> None:
    """One line per task and method: the figures of its records."""
    lines: dict[tuple[str, str], list[str]] = {}
    for r in records:
        value = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        lines.setdefault((r["task"], r["method"]), []).append(f"{r['metric']} {value} {r['unit']}")
    for (task, method), figures in lines.items():
        print(f"{task:48s} {method:22s} " + ", ".join(figures))


if __name__ == "__main__":
    main()
