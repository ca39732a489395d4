"""The throughput benchmark on tiny shapes: every configuration writes well-formed records, the FLOP count of a
conv layer is the hand-computed one, ProtoNet's plain loop computes metalab's loss, and missing data is named."""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from benchmarks import conv_peak

REPO = Path(__file__).resolve().parents[1]
KEYS = {"benchmark", "task", "method", "metric", "value", "ci95", "unit", "steps", "seconds", "device", "torch",
        "commit", "protocol"}  # fmt: skip
TINY = ["--steps", "1", "--warmup", "0", "--ways", "3", "--queries", "1", "--meta-batch", "2",
        "--peak-batch", "2", "--pool", "1"]  # fmt: skip


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(
        str(REPO)
    )  # benchmarks/ is a top-level package beside metalab/, not installed
    common = importlib.import_module("benchmarks.common")
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    module = importlib.import_module("benchmarks.throughput")
    monkeypatch.setattr(conv_peak, "PEAKS", {})  # each test measures its own peak
    yield module
    torch.set_num_threads(1)  # the benchmark sets threads per method; leave the suite's setting


def test_every_configuration_writes_records(bench: ModuleType, omniglot_root: Path, tmp_path: Path) -> None:
    # compile is left out: its first step takes tens of seconds on a CPU
    bench.main(
        ["--only", *bench.CONFIGS, *TINY, "--candidates", "layout,bf16", "--results-dir", str(tmp_path)]
    )
    records = json.loads((tmp_path / "throughput.json").read_text())
    assert all(KEYS <= set(r) and r["benchmark"] == "throughput" for r in records)
    assert all(
        r["value"] is not None and r["value"] > 0 for r in records if r["metric"] != "init_loss_rel_diff"
    )
    by_key = {(r["task"], r["method"], r["metric"]): r for r in records}
    algos = ("protonet-3w5s1q-mb1", "relation-3w1s1q-mb1", "snail-3w1s1q-mb2", "maml-3w1s1q-mb2",
             "fomaml-3w1s1q-mb2")  # fmt: skip
    for algo in algos:
        task = f"omniglot-{algo}-train-1thread"
        for method in ("metalab", "plain-loop"):
            timed = by_key[task, method, "seconds_per_step"]
            assert timed["steps"] == 1 and timed["threads"] == 1 and timed["unit"] == "s"
            images = by_key[task, method, "images_per_s"]["value"]
            assert images == pytest.approx(timed["images_per_step"] / timed["value"])
        assert 0 < by_key[task, "metalab", "fraction_of_conv_peak"]["conv_gflop_per_step"]
        assert (task, "metalab", "speedup_vs_plain-loop") in by_key
        assert (task, "sampler", "seconds_per_step") in by_key
    # candidates, each against the default step: the layout on ProtoNet and MAML; bf16 is the other
    # train.autocast setting where the learner takes it (the shipped configs train under bf16), else autocast
    candidates = {"protonet-3w5s1q-mb1": ("metalab+contiguous", "metalab+autocast-none"),
                  "relation-3w1s1q-mb1": ("metalab+autocast-none",), "snail-3w1s1q-mb2": ("metalab+autocast-none",),
                  "maml-3w1s1q-mb2": ("metalab+channels-last", "metalab+bf16"),
                  "fomaml-3w1s1q-mb2": ("metalab+channels-last", "metalab+bf16")}  # fmt: skip
    for task, methods in candidates.items():
        task = f"omniglot-{task}-train-1thread"
        assert {m for t, m, _ in by_key if t == task and m.startswith("metalab+")} == set(methods)
        for method in methods:
            assert (task, method, "speedup_vs_metalab") in by_key
            timed = by_key[task, method, "seconds_per_step"]
            assert ("bf16_native" in timed) == ("bf16" in method or "autocast" in method)
    peak = by_key["conv-peak-1thread", "best-layout", "gflops"]
    assert peak["unit"] == "GFLOP/s" and ("conv-peak-2threads", "best-layout", "gflops") in by_key
    assert by_key["conv-peak-bf16-1thread", "best-layout", "gflops"]["memory_format"] == "bf16-channels-last"
    # a step's fraction is against the peak of its own precision: ProtoNet trains under bf16, MAML in float32
    fraction = by_key["omniglot-protonet-3w5s1q-mb1-train-1thread", "metalab", "fraction_of_conv_peak"]
    assert fraction["conv_peak_dtype"] == "bfloat16"
    assert fraction["conv_peak_gflops"] == by_key["conv-peak-bf16-1thread", "best-layout", "gflops"]["value"]
    maml_fraction = by_key["omniglot-maml-3w1s1q-mb2-train-1thread", "metalab", "fraction_of_conv_peak"]
    assert maml_fraction["conv_peak_dtype"] == "float32"


def test_conv_flops_by_hand(bench: ModuleType) -> None:
    # 64 -> 64 filters, 3x3, on a 14x14 map with padding 1: 14x14 outputs, each 64*9 multiply-adds per filter
    assert conv_peak.conv_forward_flops(64, 64, 3, 14, 14) == 2 * 64 * 9 * 64 * 14 * 14 == 14_450_688
    conv, x = nn.Conv2d(64, 64, 3, padding=1), torch.randn(2, 64, 14, 14, requires_grad=True)
    assert conv_peak.counted_conv_flops(lambda: conv(x)) == 2 * 14_450_688
    # backward computes the input and the weight gradients: twice the forward, as the peak assumes
    assert conv_peak.counted_conv_flops(lambda: conv(x).sum().backward()) == 3 * 2 * 14_450_688
    assert conv_peak.Peak(14, "contiguous", 2, 1, [1.0]).flops == 3 * 2 * 14_450_688


def test_plain_protonet_loss_is_metalabs(bench: ModuleType, omniglot_root: Path) -> None:
    args = argparse.Namespace(ways=5, queries=2, meta_batch=None)
    run, shape, algo = bench.load_run("protonet-60w5s5q", args)
    assert (shape.ways, shape.shots, shape.queries, algo) == (5, 5, 2, "protonet")
    # the plain loop is float32: compare it with metalab's float32 step (the shipped config autocasts to bf16)
    learner, replay = bench.build_learner(bench.with_autocast(run, "none"), omniglot_root, "protonet-60w5s5q")
    replay.fill(1, 1)
    with torch.no_grad():
        metalab = learner.loss(0)[0].item()
    # the same model (weights and memory format) and episode; lr 0 leaves the weights as they are
    opt = torch.optim.SGD(learner.model.parameters(), lr=0.0)
    plain = bench.plain_protonet(learner.model, opt, replay.sample(0, 1)).item()
    assert plain == pytest.approx(metalab, rel=1e-5)


def test_missing_data_is_named(bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"relation-5w1s: Omniglot is missing under the data root .*empty"):
        bench.main(["--only", "relation-5w1s", *TINY, "--data-root", str(tmp_path / "empty"),
                    "--results-dir", str(tmp_path)])  # fmt: skip
    assert not (tmp_path / "throughput.json").exists()
