"""Second-order MAML meta-step speed and memory: metalab's task batchings against ``higher`` and a plain loop.

    python -m benchmarks.maml_speed                                   # every configuration
    python -m benchmarks.maml_speed --only sinusoid --repeats 20     # one configuration
    python -m benchmarks.maml_speed --only omniglot --threads 2      # torch threads (default: torch's)

Run it on an otherwise idle machine: the ratios are taken within one run, but a busy CPU distorts them too.
``--meta-batch`` shrinks the meta-batch for a quick look (the task name records it).

A meta-step is forward and backward of the meta-loss: the meta-gradient lands in ``.grad`` (the optimizer
update, the same for every method, is left out). Configurations, all second order:

* ``sinusoid``: MAML's 40-40 MLP, K=10 support and 10 query points, meta-batch 25, inner lr 0.01.
* ``omniglot``: MAML's strided Conv-4 (``gbml.network``, 64 filters, BatchNorm), 5-way 1-shot, 15 queries per
  class, meta-batch 32, inner lr 0.4, random 28x28 inputs (the cost does not depend on pixel values).
  Both for each of ``--compare-steps`` inner steps (default 1 and 5; task ``<name>`` for 1, ``<name>-inner<k>``
  for k).
* ``imaml-sinusoid`` / ``imaml-omniglot``: iMAML (``cg_steps`` 5, lambda 1) and MAML meta-steps on those
  tasks for each of ``--inner-steps`` (1 5 10 20): MAML keeps a graph through every inner step, iMAML none.

Methods: metalab's ``gbml.mean_query_loss`` under each ``batching`` (``metalab-vmap``, ``metalab-chunk<n>``,
``metalab-loop``, ``metalab-grad_loop``); ``higher`` (``higher.innerloop_ctx`` with an SGD inner optimizer,
query loss backward per task, as in higher's MAML example); ``torch-loop``: a plain PyTorch loop over tasks
with ``torch.autograd.grad(create_graph=True)`` steps on a ``functional_call`` and one backward of the mean
query loss. Each method's meta-gradient is checked in the same run against ``torch-loop``'s on a float64
copy of the problem (``grad_rel_error``: ||g - g_ref|| / ||g_ref||), so a fast but wrong or imprecise
batching shows.

Time: the median of ``--repeats`` steps after ``--warmup``, methods interleaved step by step so that a change
of machine load hits them alike; speed is the ratio against ``higher`` timed in the same run
(``speedup_vs_higher`` = higher's median / the method's). Memory (``peak_bytes``): the peak of tensor storage
allocated during one separate, untimed step above what was live before it. On CPU: ``torch.profiler`` with
``profile_memory=True`` records every allocation and free made through PyTorch's CPU allocator (every tensor,
autograd's saved tensors included; not Python objects or allocator caches), and the peak of their running sum
in time order is taken; on CUDA: ``torch.cuda.max_memory_allocated``. Records go to
``results/maml_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib.util
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from benchmarks.common import RESULTS, device_name, merge_results, parse_args, parser, record, sync
from metalab.data.episodes import Episode
from metalab.data.sinusoid import SinusoidTasks
from metalab.experiment import run_config_from_dict
from metalab.meta import gbml, imaml, maml

BENCH = "maml_speed"
CONFIGS = ["sinusoid", "omniglot", "imaml-sinusoid", "imaml-omniglot"]
NEEDS_HIGHER = {"sinusoid", "omniglot"}
MISSING = (
    "higher is not installed: `pip install -e '.[bench]'` (or `pip install higher`), "
    "or run only the imaml-* configurations (--only imaml-sinusoid imaml-omniglot)"
)
CHUNKS = (4, 8, 16)
TENSORS = ("support_x", "support_y", "query_x", "query_y")

Step = Callable[[], None]


@dataclass(frozen=True)
class Problem:
    """One benchmark task: its network (as metalab builds it), a meta-batch, and the inner step size."""

    name: str
    model: nn.Module
    ep: Episode
    regression: bool
    inner_lr: float


def sinusoid_problem(device: torch.device, tasks: int | None = None) -> Problem:
    run = run_config_from_dict(
        {"algo": "maml", "task": {"dataset": "sinusoid", "ways": 1, "shots": 10, "queries": 10}, "maml": {}}
    )
    torch.manual_seed(0)
    model = gbml.network(run, run.params).to(device)  # MLP 1 -> 40 -> 40 -> 1
    tasks = tasks or 25
    ep = SinusoidTasks(10, 10, seed=0).sample(0, tasks).to(device)  # (T, 10, 1) each
    return Problem(f"sinusoid-mlp40x40-k10-mb{tasks}", model, ep, True, 0.01)


def omniglot_problem(device: torch.device, tasks: int | None = None) -> Problem:
    n, k, q, tasks = 5, 1, 15, tasks or 32
    run = run_config_from_dict(
        {"algo": "maml", "task": {"dataset": "omniglot", "ways": n, "shots": k, "queries": q}, "maml": {}}
    )
    torch.manual_seed(0)
    model = gbml.network(run, run.params).to(device)  # strided Conv-4, 64 filters, BatchNorm
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n)
    ep = Episode(
        torch.rand(tasks, n * k, 1, 28, 28, generator=g),  # (T, 5, 1, 28, 28)
        labels.repeat_interleave(k).expand(tasks, -1).contiguous(),  # (T, 5)
        torch.rand(tasks, n * q, 1, 28, 28, generator=g),  # (T, 75, 1, 28, 28)
        labels.repeat_interleave(q).expand(tasks, -1).contiguous(),  # (T, 75)
        n,
        k,
        q,
    ).to(device)
    return Problem(f"omniglot-conv4-{n}w{k}s{q}q-mb{tasks}", model, ep, False, 0.4)


def loss_of(regression: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.mse_loss if regression else F.cross_entropy


# ------------------------------------------------------------------------------------------------ methods


def metalab_maml(p: Problem, batching: gbml.TaskBatching, steps: int = 1) -> Step:
    """metalab's MAML training loss (what ``maml.build`` hands the trainer) under ``batching``, then backward."""
    per_task = functools.partial(maml.query_loss, gbml.Inner(p.model, p.regression, p.inner_lr, steps))
    train_loss = gbml.mean_query_loss(per_task, batching, gbml.params_of(p.model), p.regression)

    def step() -> None:
        train_loss(0, p.ep)[0].backward()

    return step


def metalab_imaml(p: Problem, steps: int) -> Step:
    """iMAML's surrogate meta-loss, as ``imaml.build``'s training loss computes it, then backward."""
    cfg = imaml.Config(inner_lr=p.inner_lr, inner_steps=steps, lam=1.0, cg_steps=5)
    batching = gbml.task_batching("imaml", cfg, p.model, second_order=True)
    inner = imaml.Proximal(p.model, p.regression, cfg.inner_lr, steps, lam=cfg.lam, cg_steps=cfg.cg_steps)
    per_task = functools.partial(imaml.implicit_gradient, inner)

    def step() -> None:
        theta = dict(p.model.named_parameters())
        g, losses, _ = gbml.map_tasks(per_task, p.ep, batching, gbml.detached(theta))
        imaml.surrogate(theta, g, losses).backward()

    return step


def higher_maml(p: Problem, steps: int = 1) -> Step:
    """MAML with ``higher``: a differentiable SGD inner optimizer per task, the query loss backward per task."""
    import higher

    inner_opt = torch.optim.SGD(p.model.parameters(), lr=p.inner_lr)
    loss = loss_of(p.regression)

    def step() -> None:
        for t in range(p.ep.tasks):
            task = p.ep.task(t)
            with higher.innerloop_ctx(p.model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss(fmodel(task.support_x), task.support_y))
                (loss(fmodel(task.query_x), task.query_y) / p.ep.tasks).backward()

    return step


def torch_loop_maml(p: Problem, steps: int = 1, first_order: bool = False) -> Step:
    """The plain PyTorch way: per task, ``autograd.grad(create_graph=True)`` inner steps on a functional call;
    one backward of the mean query loss. ``first_order``: the inner gradients without a graph (FOMAML), so the
    backward treats them as constants."""
    names, weights = zip(*p.model.named_parameters(), strict=True)
    loss = loss_of(p.regression)

    def step() -> None:
        losses = []
        for t in range(p.ep.tasks):
            task = p.ep.task(t)
            fast = list(weights)
            for _ in range(steps):
                out = functional_call(p.model, dict(zip(names, fast, strict=True)), (task.support_x,))
                grads = torch.autograd.grad(loss(out, task.support_y), fast, create_graph=not first_order)
                fast = [w - p.inner_lr * g for w, g in zip(fast, grads, strict=True)]
            out = functional_call(p.model, dict(zip(names, fast, strict=True)), (task.query_x,))
            losses.append(loss(out, task.query_y))
        torch.stack(losses).mean().backward()

    return step


# ------------------------------------------------------------------------------------------- measurement


def clear_grads(model: nn.Module) -> None:
    for w in model.parameters():
        w.grad = None


def time_steps(
    methods: dict[str, Step], model: nn.Module, device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` steps per method after ``warmup`` steps, methods interleaved."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(warmup + repeats):
        for name, step in methods.items():
            clear_grads(model)
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    clear_grads(model)
    return times


def peak_bytes(step: Step, model: nn.Module, device: torch.device) -> int:
    """Peak bytes of tensor storage allocated during one ``step`` above what was live before it (see the module
    docstring for how)."""
    clear_grads(model)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            step()
        peak = max(itertools.accumulate(_allocations(prof)), default=0)
    clear_grads(model)
    return max(int(peak), 0)


def _allocations(prof: torch.profiler.profile) -> list[int]:
    """Bytes of every allocation (positive) and free (negative) the profiler saw, in time order."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    return [size for _, size in sorted(events)]


def measure(
    methods: dict[str, Step], model: nn.Module, device: torch.device, warmup: int, repeats: int
) -> dict[str, tuple[float, list[float], int]]:
    """Per method: (median seconds per step, every timed step, peak bytes of one step)."""
    times = time_steps(methods, model, device, warmup, repeats)
    return {
        name: (statistics.median(times[name]), times[name], peak_bytes(step, model, device))
        for name, step in methods.items()
    }


# ---------------------------------------------------------------------------------------------- configs


def maml_methods(
    p: Problem, chunks: tuple[int, ...], steps: int = 1
) -> tuple[dict[str, Step], dict[str, dict]]:
    """Every batching of metalab (vmap, chunks, loop, grad_loop), higher and the plain loop, ``steps`` inner
    steps each; and notes."""
    batchings = {"vmap": gbml.TaskBatching("vmap")}
    batchings |= {f"chunk{c}": gbml.TaskBatching("chunk", c) for c in chunks if c < p.ep.tasks}
    batchings |= {"loop": gbml.TaskBatching("loop"), "grad_loop": gbml.TaskBatching("grad_loop")}
    methods = {f"metalab-{name}": metalab_maml(p, b, steps) for name, b in batchings.items()}
    notes = {
        f"metalab-{name}": {"batching": b.mode, "chunk_size": b.chunk_size} for name, b in batchings.items()
    }
    methods["higher"] = higher_maml(p, steps)
    notes["higher"] = {"note": "higher.innerloop_ctx, SGD inner optimizer, query loss backward per task"}
    methods["torch-loop"] = torch_loop_maml(p, steps)
    notes["torch-loop"] = {"note": "per-task autograd.grad(create_graph=True) loop, one backward of the mean"}
    return methods, notes


def meta_gradient(step: Step, model: nn.Module) -> torch.Tensor:
    """The meta-gradient one ``step`` leaves in ``model``'s ``.grad``, flattened to float64."""
    clear_grads(model)
    step()
    g = torch.cat([w.grad.flatten().double() for w in model.parameters()])
    clear_grads(model)
    return g


def grad_errors(methods: dict[str, Step], p: Problem, steps: int = 1) -> dict[str, float]:
    """Each method's meta-gradient against the reference: ``torch-loop`` (the plain second-order loop) on a
    float64 copy of the problem. ||g - g_ref|| / ||g_ref|| over all parameters."""
    tensors = {k: getattr(p.ep, k) for k in TENSORS}
    double = {k: t.double() if t.is_floating_point() else t for k, t in tensors.items()}
    p64 = Problem(p.name, copy.deepcopy(p.model).double(), p.ep._replace(**double), p.regression, p.inner_lr)
    ref = meta_gradient(torch_loop_maml(p64, steps), p64.model)
    return {
        name: float((meta_gradient(step, p.model) - ref).norm() / ref.norm())
        for name, step in methods.items()
    }


def bench_maml(p: Problem, args: argparse.Namespace, device: torch.device) -> list[dict]:
    records = []
    for steps in args.compare_steps:
        records += bench_maml_steps(p, args, device, steps)
    return records


def bench_maml_steps(p: Problem, args: argparse.Namespace, device: torch.device, steps: int) -> list[dict]:
    methods, notes = maml_methods(p, CHUNKS, steps)
    errors = grad_errors(methods, p, steps)
    results = measure(methods, p.model, device, args.warmup, args.repeats)
    higher_s, _, higher_bytes = results["higher"]
    common = {"meta_batch": p.ep.tasks, "inner_steps": steps, "second_order": True, "warmup": args.warmup}
    task = p.name if steps == 1 else f"{p.name}-inner{steps}"
    records = []
    print(f"{task} ({device_name(device)}):")
    for name, (median, times, peak) in results.items():
        extra = {**common, **notes[name], "min_s": min(times), "max_s": max(times)}
        records += [
            record(BENCH, task, name, "seconds_per_step", median, unit="s", steps=len(times),
                   seconds=sum(times), device=device_name(device), **extra),
            record(BENCH, task, name, "speedup_vs_higher", higher_s / median, unit="x",
                   device=device_name(device), **common),
            record(BENCH, task, name, "peak_bytes", peak, unit="bytes", device=device_name(device),
                   memory=memory_method(device), **common),
            record(BENCH, task, name, "memory_vs_higher", peak / max(higher_bytes, 1), unit="x",
                   device=device_name(device), **common),
            record(BENCH, task, name, "grad_rel_error", errors[name], unit="ratio", device=device_name(device),
                   reference="torch-loop in float64", **common),
        ]  # fmt: skip
        print(
            f"  {name:20s} {median * 1e3:9.1f} ms/step  {higher_s / median:5.2f}x higher   "
            f"peak {peak / 2**20:8.1f} MiB  {peak / max(higher_bytes, 1):5.2f}x higher   grad err {errors[name]:.1e}"
        )
    return records


def bench_imaml(p: Problem, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """iMAML and MAML at each number of inner steps, both with ``batching: auto`` (the same for both)."""
    batching = gbml.task_batching("maml", maml.Config(), p.model, second_order=True)
    records = []
    print(f"{p.name}, iMAML vs MAML by inner steps ({device_name(device)}):")
    for steps in args.inner_steps:
        methods = {"metalab-imaml": metalab_imaml(p, steps), "metalab-maml": metalab_maml(p, batching, steps)}
        results = measure(methods, p.model, device, args.warmup, args.repeats)
        task = f"{p.name}-steps{steps}"
        for name, (median, times, peak) in results.items():
            extra = {"meta_batch": p.ep.tasks, "inner_steps": steps, "batching": batching.mode}
            extra["warmup"] = args.warmup
            if name == "metalab-imaml":
                extra |= {"cg_steps": 5, "lam": 1.0}
            records += [
                record(BENCH, task, name, "seconds_per_step", median, unit="s", steps=len(times),
                       seconds=sum(times), device=device_name(device), **extra),
                record(BENCH, task, name, "peak_bytes", peak, unit="bytes", device=device_name(device),
                       memory=memory_method(device), **extra),
            ]  # fmt: skip
            print(f"  {steps:3d} steps {name:15s} {median * 1e3:9.1f} ms/step  peak {peak / 2**20:8.2f} MiB")
    return records


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one step, minus memory_allocated before it"
    return "torch.profiler profile_memory: peak running sum of CPU allocations minus frees during one step"


PROBLEMS = {"sinusoid": sinusoid_problem, "omniglot": omniglot_problem}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per method (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5, 10, 20],
                   help="inner steps of the imaml-* configurations")  # fmt: skip
    p.add_argument("--compare-steps", type=int, nargs="+", default=[1, 5],
                   help="inner steps of the sinusoid / omniglot comparisons")  # fmt: skip
    p.add_argument("--meta-batch", type=int, help="tasks per meta-batch (default: 25 sinusoid, 32 omniglot)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where maml_speed.json goes")
    args = parse_args(p, argv)
    if min(args.repeats, *args.inner_steps, *args.compare_steps, args.meta_batch or 1) < 1 or args.warmup < 0:
        p.error("--repeats, --inner-steps, --compare-steps and --meta-batch must be >= 1, --warmup >= 0")
    names = args.only or CONFIGS
    if NEEDS_HIGHER & set(names) and importlib.util.find_spec("higher") is None:
        raise SystemExit(MISSING)
    device = torch.device(args.device)
    for name in names:
        problem = PROBLEMS[name.removeprefix("imaml-")](device, args.meta_batch)
        bench = bench_imaml if name.startswith("imaml-") else bench_maml
        path = merge_results(BENCH, bench(problem, args, device), args.results_dir)
    print(path)


if __name__ == "__main__":
    main()
