"""Data-parallel meta-training throughput: one process vs several (metalab.train.distributed), same run.

For each workload, the same training step (draw the meta-batch, this rank's share, loss, backward, gradient
all-reduce, Adam step) is timed in three layouts on this machine, one after the other:

- ``1x1``: one process, one torch thread (the baseline of the ratios);
- ``1xT``: one process, T threads (T = ``--procs``: the cores a single process could use instead);
- ``Px1``: P processes under torchrun (``--standalone``), one thread each, the meta-batch split over them;
- ``Px1-independent``: P processes started together, one thread each, each training alone on its share of the
  meta-batch, no communication at all: the most P processes can get out of this machine, so the gap between it
  and ``Px1`` is what data-parallel training itself costs, and its gap to P times ``1x1`` is the machine's
  (cores sharing memory bandwidth and caches).

::

    python -m benchmarks.distributed                       # both workloads, 2 processes
    python -m benchmarks.distributed --only maml-5w1s --steps 10

Workloads: ``maml-5w1s`` (second-order MAML, Omniglot 5-way 1-shot, meta-batch 32: configs/maml_omniglot_5w1s
.yaml) and ``protonet-20w5s`` (ProtoNet 20-way 5-shot trained 60-way, meta-batch 2 so that it splits:
configs/protonet_omniglot_20w5s.yaml). Each layout runs ``--warmup`` untimed steps, then ``--steps`` timed
ones; the record is tasks per second (meta-batch x steps / seconds) and its ratio to ``1x1`` measured in the
same run. Records go to ``benchmarks/results/distributed.json``. The machine must be otherwise idle: the
layouts compete for the same cores. Provenance flags (``--allow-dirty``, ``--label``): :mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, device_name, merge_results, parse_args, parser, record

BENCH = "distributed"
REPO = Path(__file__).resolve().parents[1]
WORKLOADS: dict[str, tuple[str, list[str]]] = {
    "maml-5w1s": ("configs/maml_omniglot_5w1s.yaml", []),
    "protonet-20w5s": ("configs/protonet_omniglot_20w5s.yaml", ["train.meta_batch=2"]),
}


def time_steps(
    config: str, overrides: list[str], warmup: int, steps: int, share: int = 1
) -> dict[str, float]:
    """In this process (one rank of a torchrun job, or alone): seconds for ``steps`` training steps after
    ``warmup`` untimed ones, and the meta-batch (divided by ``share``: one of ``share`` independent processes)."""
    from metalab.data.root import data_root
    from metalab.experiment import algorithm, load_run_config
    from metalab.train import distributed
    from metalab.utils import seed_everything

    distributed.init(torch.device("cpu"))
    run = load_run_config(REPO / config, overrides)
    if share > 1:
        run = load_run_config(
            REPO / config, [*overrides, f"train.meta_batch={run.train.meta_batch // share}"]
        )
    distributed.check_meta_batch(run.train.meta_batch)
    seed_everything(run.seed)
    learner = algorithm(run.algo).build(run, data_root(), torch.device("cpu"))
    params = learner.parameters if learner.parameters is not None else list(learner.model.parameters())
    opt = torch.optim.Adam(params, lr=run.train.lr)
    learner.model.train()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            distributed.barrier()
            start = time.perf_counter()
        loss, _ = learner.loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(params)
        opt.step()
        distributed.average_buffers(learner.model)
    distributed.barrier()
    seconds = time.perf_counter() - start
    distributed.shutdown()
    return {"seconds": seconds, "meta_batch": run.train.meta_batch, "threads": torch.get_num_threads()}


def independent(name: str, procs: int, args: argparse.Namespace) -> dict[str, float]:
    """Run ``procs`` one-thread processes of workload ``name`` side by side, each on ``1 / procs`` of the
    meta-batch, without communication; their summed throughput."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"timing{i}.json" for i in range(procs)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        running = [
            subprocess.Popen([sys.executable, "-m", "benchmarks.distributed", "--worker", name, "--out", str(out),
                              "--warmup", str(args.warmup), "--steps", str(args.steps), "--share", str(procs)],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for out in outs
        ]  # fmt: skip
        for proc in running:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{name} {procs}x1-independent failed:\n{err[-3000:]}")
        timings = [json.loads(out.read_text()) for out in outs]
    tasks_per_s = sum(t["meta_batch"] * args.steps / t["seconds"] for t in timings)
    seconds = max(t["seconds"] for t in timings)
    print(
        f"{name} {procs}x1-independent: {seconds:.1f} s for {args.steps} steps of 1/{procs} meta-batch each"
    )
    return {"seconds": seconds, "meta_batch": sum(t["meta_batch"] for t in timings), "threads": 1,
            "tasks_per_s": tasks_per_s}  # fmt: skip


def layout(name: str, procs: int, threads: int, args: argparse.Namespace) -> dict[str, float]:
    """Run the workload ``name`` in ``procs`` processes of ``threads`` threads; rank 0's timing."""
    config, overrides = WORKLOADS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        worker = ["-m", "benchmarks.distributed", "--worker", name, "--out", str(out)]
        worker += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        if procs == 1:
            command = [sys.executable, *worker]
        else:
            launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
            command = [sys.executable, *launch, *worker]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} {procs}x{threads} failed:\n{done.stderr[-3000:]}")
        timing = json.loads(out.read_text())
    print(
        f"{name} {procs}x{threads}: {timing['seconds']:.1f} s for {args.steps} steps ({overrides or config})"
    )
    return {**timing, "tasks_per_s": timing["meta_batch"] * args.steps / timing["seconds"]}


def measure(name: str, args: argparse.Namespace) -> list[dict]:
    """The three layouts of workload ``name`` and their records."""
    p = args.procs
    layouts = {"1x1": (1, 1), f"1x{p}": (1, p), f"{p}x1": (p, 1)}
    timings = {label: layout(name, procs, threads, args) for label, (procs, threads) in layouts.items()}
    timings[f"{p}x1-independent"] = independent(name, p, args)
    base = timings["1x1"]["tasks_per_s"]
    records = []
    for label, t in timings.items():
        config, overrides = WORKLOADS[name]
        common = {
            "steps": args.steps,
            "seconds": t["seconds"],
            "device": device_name("cpu"),
            "config": config,
            "overrides": overrides,
            "layout": label,
            "warmup_steps": args.warmup,
            "cpu_count": os.cpu_count(),
        }
        records.append(record(BENCH, name, label, "tasks_per_s", t["tasks_per_s"], unit="tasks/s", **common))
        if label != "1x1":
            ratio = t["tasks_per_s"] / base
            records.append(record(BENCH, name, label, "speedup_vs_1x1", ratio, unit="x", **common))
            print(f"{name} {label}: {ratio:.2f}x one process with one thread")
    return records


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":  # one process of a layout (under torchrun when P > 1)
        w = argparse.ArgumentParser()
        w.add_argument("--worker", choices=list(WORKLOADS))
        w.add_argument("--out", type=Path)
        w.add_argument("--warmup", type=int)
        w.add_argument("--steps", type=int)
        w.add_argument("--share", type=int, default=1)
        a = w.parse_args(argv)
        timing = time_steps(*WORKLOADS[a.worker], a.warmup, a.steps, a.share)
        if int(os.environ.get("RANK", "0")) == 0:
            a.out.write_text(json.dumps(timing))
        return
    p = parser(__doc__.splitlines()[0], list(WORKLOADS))
    p.add_argument("--procs", type=int, default=2, help="processes (and threads of the 1xT layout)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parse_args(p, argv)
    for name in args.only or list(WORKLOADS):
        print(merge_results(BENCH, measure(name, args), args.results_dir))


if __name__ == "__main__":
    main()
