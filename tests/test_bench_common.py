"""Shared benchmark plumbing: merging records into a results file, and the device smoke script."""

from __future__ import annotations

import importlib
import json
import multiprocessing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is a top-level package beside metalab/
    return importlib.import_module("benchmarks.common")


def test_merge_replaces_same_device_kind_and_keeps_the_other(common, tmp_path: Path) -> None:
    cpu1 = common.record("b", "t", "m", "speed", 1.0, unit="x", device="cpu (2 cores, 1 torch threads)")
    gpu = common.record("b", "t", "m", "speed", 9.0, unit="x", device="NVIDIA H200")
    other = common.record("b", "t", "other", "speed", 3.0, unit="x", device="cpu (2 cores, 1 torch threads)")
    common.merge_results("b", [cpu1, other], tmp_path)
    common.merge_results("b", [gpu], tmp_path)
    cpu2 = common.record("b", "t", "m", "speed", 2.0, unit="x", device="cpu (16 cores, 16 torch threads)")
    common.merge_results("b", [cpu2], tmp_path)
    got = {(r["method"], r["device"]): r["value"] for r in json.loads((tmp_path / "b.json").read_text())}
    assert got == {
        ("m", "NVIDIA H200"): 9.0,
        ("m", "cpu (16 cores, 16 torch threads)"): 2.0,  # replaced the older CPU record of the same key
        ("other", "cpu (2 cores, 1 torch threads)"): 3.0,
    }


def _merge_many(results: str, worker: int, count: int) -> None:
    common = importlib.import_module("benchmarks.common")
    for i in range(count):
        rec = common.record("b", "t", f"w{worker}", f"m{i}", float(i), unit="x", device="cpu", commit="c")
        common.merge_results("b", [rec], Path(results))


def test_merges_from_processes_side_by_side_lose_no_record(common, tmp_path: Path) -> None:
    """Benchmark lanes merge into one results file at once; the file lock keeps every record."""
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_merge_many, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    records = json.loads((tmp_path / "b.json").read_text())
    assert sorted((r["method"], r["metric"]) for r in records) == sorted(
        (f"w{w}", f"m{i}") for w in range(4) for i in range(25)
    )


def test_device_smoke_runs_and_reports_failures(common, omniglot_root: Path, tmp_path: Path) -> None:
    smoke = importlib.import_module("benchmarks.device_smoke")
    smoke.main(["--only", "protonet_omniglot_5w1s", "maml_sinusoid", "dqn_her_bitflip", "--device", "cpu",
                "--episodes", "2", "--results-dir", str(tmp_path)])  # fmt: skip
    records = {r["task"]: r for r in json.loads((tmp_path / "device_smoke.json").read_text())}
    assert set(records) == {"protonet_omniglot_5w1s", "maml_sinusoid", "dqn_her_bitflip"}
    assert all(
        r["value"] == 1.0 and r["error"] is None and r["device"].startswith("cpu") for r in records.values()
    )
    # A device that cannot be had is a recorded failure with its message, not a crash of the whole run.
    if not __import__("torch").cuda.is_available():
        smoke.main(["--only", "maml_sinusoid", "--device", "cuda", "--results-dir", str(tmp_path)])
        failed = [
            r for r in json.loads((tmp_path / "device_smoke.json").read_text()) if r["device"] == "cuda"
        ]
        assert failed[0]["value"] == 0.0 and "train.device" in failed[0]["error"]
