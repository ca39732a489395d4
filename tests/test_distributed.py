"""Data-parallel meta-training (metalab.train.distributed) against one process, with real torchrun jobs on
127.0.0.1 (gloo): the same meta-gradient, the same weights after 20 steps, an exact resume, two "nodes".

Tolerances: the ranks' gradients are averaged by a float32 all-reduce, so they match the single process's up to
summation order (relative error of the whole gradient below 1e-5: measured 7e-8 for second-order MAML, 0 for
ProtoNet, 2e-6 for SNAIL); a 2-rank run resumed from its checkpoint is bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalab.data.episodes import Episode
from metalab.errors import ConfigError
from metalab.train import distributed
from metalab.train.distributed import World

REPO = Path(__file__).resolve().parents[1]
SINUSOID = [
    "configs/maml_sinusoid.yaml",
    "--set", "train.meta_batch=4", "--set", "train.eval_every=10", "--set", "train.eval_episodes=8",
    "--set", "train.checkpoint_every=10", "--set", "eval.episodes=8",
]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def metalab_train(tmp: Path, runs: str, *args: str) -> Path:
    """Run ``metalab train`` in a subprocess; the run directory it made (or resumed)."""
    run([sys.executable, "-m", "metalab", "train", *args, "--runs-dir", str(tmp / runs)], REPO)
    (run_dir,) = (tmp / runs).iterdir()
    return run_dir


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def test_two_ranks_give_the_single_process_meta_gradient(tmp_path: Path, omniglot_root: Path) -> None:
    jobs = (
        "configs/maml_sinusoid.yaml train.meta_batch=4 -- "  # second order
        "configs/protonet_omniglot_5w1s.yaml task.train_ways=5 task.train_queries=2 train.meta_batch=2 "
        "train.autocast=none -- "  # float32: bf16 rounding would hide a sharding error in the 1e-5 bound
        "configs/snail_omniglot_5w1s.yaml train.meta_batch=2 train.autocast=none"
    ).split()
    worker = str(REPO / "tests" / "distributed_grads.py")
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    run([sys.executable, worker, str(tmp_path / "one"), *jobs], REPO)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    run([*launch, worker, str(tmp_path / "two"), *jobs], REPO)
    for i, name in enumerate(("maml", "protonet", "snail")):
        one, two = torch.load(tmp_path / "one" / f"{i}.pt"), torch.load(tmp_path / "two" / f"{i}.pt")
        assert one.keys() == two.keys(), name
        a, b = flat(one), flat(two)
        assert a.norm() > 0 and ((a - b).norm() / a.norm()).item() < 1e-5, name


def test_nproc_training_matches_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    steps = ["--set", "train.steps=20"]
    single = metalab_train(tmp_path, "one", *SINUSOID, *steps)
    two = metalab_train(tmp_path, "two", *SINUSOID, *steps, "--nproc", "2")
    a, b = weights(single), weights(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # Interrupted at step 10 (a finished run of 10 steps), then resumed to 20 on two ranks: bit-identical.
    part = metalab_train(tmp_path, "resumed", *SINUSOID, "--set", "train.steps=10", "--nproc", "2")
    run([sys.executable, "-m", "metalab", "train", "--resume", str(part), "--set", "train.steps=20",
         "--nproc", "2"], REPO)  # fmt: skip
    c = weights(part)
    assert all(torch.equal(c[k], b[k]) for k in b)
    # Rank 0 alone writes the log: one val row per evaluation, not one per rank.
    rows = (two / "metrics.csv").read_text().splitlines()
    assert sum(r.startswith("20,val/mse,") for r in rows) == 1
    assert (two / "result.json").is_file()


@pytest.mark.slow
def test_two_nodes_on_localhost_train_like_two_local_ranks(tmp_path: Path) -> None:
    """Two torchrun invocations with --nnodes 2 (one process each) rendezvous on 127.0.0.1: the same weights
    as two processes on one node."""
    steps = ["--set", "train.steps=20"]
    local = metalab_train(tmp_path, "local", *SINUSOID, *steps, "--nproc", "2")
    port = free_port()

    def node(rank: int) -> subprocess.Popen:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                  "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}"]  # fmt: skip
        command = [
            *launch,
            "-m",
            "metalab",
            "train",
            *SINUSOID,
            *steps,
            "--runs-dir",
            str(tmp_path / "nodes"),
        ]
        # Output to a file, not a pipe: a pipe nobody drains while the test waits on the other node fills up
        # (a slow, loaded machine logs more progress lines), blocks that node, and with it the other one.
        with (tmp_path / f"node{rank}.log").open("w") as log:
            return subprocess.Popen(command, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)

    procs = [node(0), node(1)]
    for rank, p in enumerate(procs):
        p.wait(timeout=300)
        assert p.returncode == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    (nodes,) = (tmp_path / "nodes").iterdir()
    a, b = weights(local), weights(nodes)
    assert all(torch.equal(a[k], b[k]) for k in a)


def episode(tasks: int) -> Episode:
    x = torch.arange(tasks, dtype=torch.float32).reshape(tasks, 1, 1).expand(tasks, 3, 2)
    y = torch.arange(tasks).reshape(tasks, 1).expand(tasks, 3)
    return Episode(x, y, x + 100, y + 100, 3, 1, 1)


def test_each_rank_takes_its_contiguous_share_and_the_shares_make_the_batch() -> None:
    ep = episode(6)
    shares = []
    for rank in range(3):
        with distributed.joined(World(rank, 3)):
            shares.append(distributed.shard(ep))
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(torch.cat([getattr(s, field) for s in shares]), getattr(ep, field))
    assert distributed.shard(ep) is ep  # one process: the whole batch


def test_a_meta_batch_that_does_not_split_evenly_is_refused_by_name() -> None:
    with (
        distributed.joined(World(0, 4)),
        pytest.raises(ConfigError, match=r"train\.meta_batch.*multiple of 4"),
    ):
        distributed.check_meta_batch(6)
    with distributed.joined(World(1, 4)), pytest.raises(ConfigError, match=r"train\.meta_batch"):
        distributed.shard(episode(6))
    distributed.check_meta_batch(6)  # one process: anything goes


def test_without_torchrun_everything_is_one_rank() -> None:
    assert not distributed.launched() and not distributed.world().distributed
    assert distributed.agree([True, False]) == [True, False]
    assert distributed.average_metrics({"a": 1.0}) == {"a": 1.0}
    assert distributed.broadcast("x") == "x"
