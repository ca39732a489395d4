"""Worker for tests/test_distributed.py, run under torchrun: the meta-gradient of step 0, averaged over ranks.

``python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_grads.py OUT CONFIG [KEY=VALUE
...] [-- CONFIG ...]``: for each config, every rank builds the learner, takes its share of meta-batch 0, and
the averaged gradient is saved by rank 0 to ``OUT/<i>.pt`` (parameter name -> gradient). With no torchrun (one
process) the same script gives the single-process gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from metalab.data.root import data_root
from metalab.experiment import algorithm, load_run_config
from metalab.train import distributed
from metalab.utils import seed_everything


def gradient(config: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    run = load_run_config(config, overrides)
    seed_everything(run.seed)
    learner = algorithm(run.algo).build(run, data_root(), torch.device("cpu"))
    named = dict(learner.model.named_parameters())
    params = learner.parameters if learner.parameters is not None else list(named.values())
    learner.model.train()
    loss, _ = learner.loss(0)
    loss.backward()
    distributed.average_gradients(params)
    names = {id(p): n for n, p in named.items()}
    return {names.get(id(p), f"param{i}"): p.grad.clone() for i, p in enumerate(params) if p.grad is not None}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    out, jobs = Path(argv[0]), " ".join(argv[1:]).split(" -- ")
    world = distributed.init(torch.device("cpu"))
    for i, job in enumerate(jobs):
        config, *overrides = job.split()
        grads = gradient(config, overrides)
        if world.main:
            torch.save(grads, out / f"{i}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
