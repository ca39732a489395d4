"""Shared benchmark plumbing: merging records into a results file, provenance (dirty trees, labels), seed
aggregates, and the device smoke script."""

from __future__ import annotations

import importlib
import json
import multiprocessing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch):
    """``benchmarks.common`` seeing a clean tree (tests run from working trees) and no label yet."""
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is a top-level package beside metalab/
    module = importlib.import_module("benchmarks.common")
    monkeypatch.setattr(module, "commit", lambda: "abc1234")
    monkeypatch.setattr(module, "PROVENANCE", module.Provenance())
    return module


def test_a_dirty_tree_is_refused_before_anything_runs(
    common, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "commit", lambda: "abc1234+dirty")
    with pytest.raises(SystemExit, match="uncommitted changes") as info:
        common.parse_args(common.parser("d", ["a"]), ["--only", "a"])
    assert "\n" not in str(info.value) and "--allow-dirty" in str(info.value)
    # A whole benchmark stops at its arguments: no run directory, no results file.
    bitflip = importlib.import_module("benchmarks.bitflip")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        bitflip.main(["--only", "future-n7-s0", "--runs-dir", str(tmp_path / "runs"),
                      "--results-dir", str(tmp_path / "res")])  # fmt: skip
    assert not (tmp_path / "runs").exists() and not (tmp_path / "res").exists()


def test_allow_dirty_marks_the_records(common, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "dirty" not in common.record("b", "t", "m", "x", 1.0, unit="u")  # a clean tree's record
    monkeypatch.setattr(common, "commit", lambda: "abc1234+dirty")
    common.parse_args(common.parser("d", ["a"]), ["--allow-dirty"])
    rec = common.record("b", "t", "m", "x", 1.0, unit="u")
    assert rec["dirty"] is True and rec["commit"] == "abc1234+dirty" and "label" not in rec


def test_labels_are_kept_apart_by_merge_results(common, tmp_path: Path) -> None:
    main = common.record("b", "t", "m", "x", 1.0, unit="u", device="cpu")
    p = common.parser("d", ["a"])
    p.add_argument("--runs-dir", type=Path, default=tmp_path / "runs")
    args = common.parse_args(p, ["--label", "variant"])
    assert args.runs_dir == tmp_path / "runs" / "variant"  # a variant never resumes the main run
    variant = common.record("b", "t", "m", "x", 2.0, unit="u", device="cpu")
    assert variant["label"] == "variant" and common.current_label() == "variant"
    common.merge_results("b", [main], tmp_path)
    common.merge_results("b", [variant], tmp_path)
    common.merge_results("b", [{**variant, "value": 3.0}], tmp_path)  # a rerun of the variant replaces it
    got = {r.get("label"): r["value"] for r in json.loads((tmp_path / "b.json").read_text())}
    assert got == {None: 1.0, "variant": 3.0}
    with pytest.raises(SystemExit, match="plain name"):
        common.parse_args(common.parser("d", ["a"]), ["--label", "a/b"])


def test_seed_aggregates_use_student_t_and_keep_their_seeds(common) -> None:
    rl_common = importlib.import_module("benchmarks.rl_common")
    per_seed = [common.record("b", "t", "m", f"score_s{s}", v, unit="u", steps=10, seconds=1.0)
                for s, v in enumerate([0.5, 0.7, 0.9])]  # fmt: skip
    other = {**per_seed[0], "value": 100.0, "label": "variant"}  # a variant's seed is not one of these
    old = {**per_seed[0], "metric": "score_s3", "value": 50.0}
    del old["protocol"]  # nor is a seed recorded under the old evaluation protocol
    assert per_seed[0]["protocol"] == common.PROTOCOL
    agg = rl_common.aggregate([*per_seed, other, old], "b", "t", "m", "score", "u")
    assert agg["value"] == pytest.approx(0.7) and agg["n"] == 3 and agg["per_seed"] == [0.5, 0.7, 0.9]
    assert agg["ci95"] == pytest.approx(4.302653 * 0.2 / 3**0.5, rel=1e-5)  # t_{0.975, 2} s / sqrt(n)
    assert agg["seeds"] == [0, 1, 2] and agg["ci95_kind"] == rl_common.SEED_CI
    one = rl_common.aggregate(per_seed[:1], "b", "t", "m", "score", "u")
    assert one["n"] == 1 and one["ci95"] is None  # no interval from one seed


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


def test_results_written_by_other_benchmarks_do_not_make_a_tree_dirty(common) -> None:
    """Benchmarks side by side in one checkout write benchmarks/results/: outputs, not code."""
    porcelain = " M benchmarks/results/omniglot_metric.json\n M benchmarks/results/omniglot_metric.png\n"
    assert common.changed_code(porcelain) == []
    assert common.changed_code(porcelain + " M metalab/meta/protonet.py\n") == ["metalab/meta/protonet.py"]
    assert common.changed_code('R  old.py -> "metalab/new name.py"\n') == ["metalab/new name.py"]
