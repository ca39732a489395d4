"""The MAML speed benchmark script on a tiny meta-batch: records in the agreed shape for every method, ratios
against higher, memory that behaves as the batchings promise, and nothing written into the repository."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = {"benchmark", "task", "method", "metric", "value", "ci95", "unit", "steps", "seconds", "device", "torch",
        "commit"}  # fmt: skip


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(
        str(REPO)
    )  # benchmarks/ is a top-level package beside metalab/, not installed
    common = importlib.import_module("benchmarks.common")
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    return importlib.import_module("benchmarks.maml_speed")


def test_tiny_run_records(bench: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("higher")
    results = REPO / "benchmarks" / "results" / "maml_speed.json"
    before = results.stat().st_mtime_ns if results.is_file() else None
    bench.main(["--only", "sinusoid", "imaml-sinusoid", "--repeats", "2", "--warmup", "0", "--meta-batch", "3",
                "--inner-steps", "1", "3", "--compare-steps", "1", "2", "--results-dir", str(tmp_path)])  # fmt: skip
    records = json.loads((tmp_path / "maml_speed.json").read_text())
    by_key = {(r["task"], r["method"], r["metric"]): r for r in records}
    assert all(KEYS <= set(r) and r["benchmark"] == "maml_speed" for r in records)

    task = "sinusoid-mlp40x40-k10-mb3"
    methods = {
        "metalab-vmap",
        "metalab-loop",
        "metalab-grad_loop",
        "higher",
        "torch-loop",
    }  # no chunk < 3 tasks
    metrics = {"seconds_per_step", "speedup_vs_higher", "peak_bytes", "memory_vs_higher", "grad_rel_error"}
    assert {(m, k) for t, m, k in by_key if t == task} == {(m, k) for m in methods for k in metrics}
    # Every method's float32 meta-gradient is the float64 reference's up to rounding, at 1 and 2 inner steps.
    assert all(by_key[task, m, "grad_rel_error"]["value"] < 1e-5 for m in methods)
    two = f"{task}-inner2"
    assert {(m, k) for t, m, k in by_key if t == two} == {(m, k) for m in methods for k in metrics}
    assert all(by_key[two, m, "grad_rel_error"]["value"] < 1e-5 for m in methods)
    assert {by_key[two, m, "seconds_per_step"]["inner_steps"] for m in methods} == {2}
    for m in methods:
        timed = by_key[(task, m, "seconds_per_step")]
        assert (
            timed["steps"] == 2 and timed["value"] > 0 and timed["unit"] == "s" and timed["meta_batch"] == 3
        )
        assert by_key[(task, m, "peak_bytes")]["value"] > 0
    higher = by_key[(task, "higher", "seconds_per_step")]["value"]
    vmap = by_key[(task, "metalab-vmap", "seconds_per_step")]["value"]
    assert by_key[(task, "metalab-vmap", "speedup_vs_higher")]["value"] == pytest.approx(higher / vmap)
    assert by_key[(task, "higher", "speedup_vs_higher")]["value"] == 1.0
    assert by_key[(task, "metalab-vmap", "peak_bytes")]["memory"].startswith("torch.profiler")
    # grad_loop frees each task's graph before the next: less memory than the loop that keeps them all.
    peak = {m: by_key[(task, m, "peak_bytes")]["value"] for m in methods}
    assert peak["metalab-grad_loop"] < peak["metalab-loop"]

    # iMAML's memory does not grow with the inner steps the way MAML's does.
    def peak_at(steps: int, method: str) -> int:
        return by_key[(f"{task}-steps{steps}", method, "peak_bytes")]["value"]

    maml_growth = peak_at(3, "metalab-maml") - peak_at(1, "metalab-maml")
    imaml_growth = peak_at(3, "metalab-imaml") - peak_at(1, "metalab-imaml")
    assert maml_growth > 0 and imaml_growth < maml_growth / 2
    assert by_key[(f"{task}-steps3", "metalab-imaml", "seconds_per_step")]["inner_steps"] == 3
    assert (results.stat().st_mtime_ns if results.is_file() else None) == before


def test_missing_higher_is_one_clear_line(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "higher" else real(n))
    with pytest.raises(SystemExit, match=r"higher is not installed") as info:
        bench.main(["--only", "sinusoid"])
    assert "\n" not in str(info.value)
