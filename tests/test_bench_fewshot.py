"""The Omniglot few-shot benchmark scripts on a tiny budget: every configuration resolves, one configuration of
each script trains, tests and writes records in the agreed shape and a figure, and a finished run resumes."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

from metalab.experiment import load_run_config

REPO = Path(__file__).resolve().parents[1]
KEYS = {"benchmark", "task", "method", "metric", "value", "ci95", "unit", "steps", "seconds", "device", "torch",
        "commit"}  # fmt: skip
TINY = ["--steps", "2", "--test-episodes", "4", "--set", "train.eval_episodes=4", "--set",
        "train.meta_batch=2"]  # fmt: skip


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    # benchmarks/ is a top-level package beside metalab/, not installed
    monkeypatch.syspath_prepend(str(REPO))
    common = importlib.import_module("benchmarks.common")
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    return lambda name: importlib.import_module(f"benchmarks.{name}")


def run(module: ModuleType, tmp_path: Path, config: str, *sets: str) -> list[dict]:
    module.main(["--only", config, *TINY, *(a for s in sets for a in ("--set", s)),
                 "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")])  # fmt: skip
    return json.loads((tmp_path / "results" / f"{module.BENCH}.json").read_text())


def check_records(records: list[dict], benchmark: str, steps: int = 2) -> None:
    for r in records:
        assert KEYS <= set(r) and r["benchmark"] == benchmark and r["unit"] == "%"
        assert r["steps"] == steps and r["seconds"] > 0 and 0 <= r["value"] <= 100
        assert r["test_episodes"] == 4 and r["budget_minutes"] == 60.0


def test_every_configuration_resolves(bench) -> None:
    """Config files exist and the cell overrides make valid configs of the right shape (no data read)."""
    blackbox, maml = bench("omniglot_blackbox"), bench("omniglot_maml")
    for cell in blackbox.CELLS:
        task = load_run_config(REPO / f"configs/snail_omniglot_{cell}.yaml").task
        assert f"{task.ways}w{task.shots}s" == cell
    for stem in blackbox.MANN.values():
        assert load_run_config(REPO / f"configs/{stem}.yaml").algo == "mann"
    assert set(maml.DEFAULT) < set(maml.CONFIGS) and not any(c.endswith("20w1s") for c in maml.DEFAULT)
    for name in maml.CONFIGS:
        method, cell = name.split("-")
        config = REPO / f"configs/{method}_omniglot_5w1s.yaml"
        run = load_run_config(config, maml.cell_overrides(method, cell))
        assert f"{run.task.ways}w{run.task.shots}s" == cell
        assert run.algo == ("maml" if method == "fomaml" else method)
        assert getattr(run.params, "first_order", False) == (method == "fomaml")
    paper = load_run_config(REPO / "configs/maml_omniglot_5w1s.yaml", maml.cell_overrides("maml", "20w1s"))
    assert (paper.params.inner_steps, paper.params.inner_lr, paper.params.eval_inner_steps) == (5, 0.1, 5)


def test_snail_tiny_run(bench, omniglot_root: Path, tmp_path: Path) -> None:
    blackbox = bench("omniglot_blackbox")
    records = run(blackbox, tmp_path, "snail-5w1s", "snail.hidden=8", "snail.tc_filters=8")
    check_records(records, "omniglot_blackbox")
    (r,) = records
    assert (r["task"], r["method"], r["metric"]) == ("omniglot-vinyals-5w1s", "snail", "test_accuracy")
    assert (r["published"], r["target"]) == (99.07, 98.0) and r["ci95"] is not None
    assert (tmp_path / "results" / "omniglot_blackbox.png").is_file()
    assert (tmp_path / "runs" / "snail-5w1s" / "config.yaml").is_file()


def test_mann_tiny_run_reports_instances(bench, omniglot_root: Path, tmp_path: Path) -> None:
    blackbox = bench("omniglot_blackbox")
    records = {r["metric"]: r for r in run(blackbox, tmp_path, "mann-lstm", "mann.hidden=16")}
    check_records(list(records.values()), "omniglot_blackbox")
    assert {"test_accuracy", "acc_instance2", "acc_instance5"} <= set(records)
    assert {r["task"] for r in records.values()} == {"omniglot-vinyals-5way-10inst"}
    assert (records["acc_instance2"]["published"], records["acc_instance2"]["target"]) == (82.8, 85.0)
    assert (records["acc_instance5"]["published"], records["acc_instance5"]["target"]) == (94.9, 95.0)
    assert records["acc_instance5"]["instance"] == 5 and records["test_accuracy"]["ci95"] is not None
    assert (tmp_path / "results" / "omniglot_blackbox.png").is_file()
    curve = records["acc_instance5"]["curve"]  # [training minutes, val accuracy %] at each evaluation
    assert curve and all(m >= 0 and 0 <= acc <= 100 for m, acc in curve)
    assert records["acc_instance5"]["curve_metric"] == "val/acc_inst5"
    assert records["test_accuracy"]["curve_metric"] == "val/acc"
    # The figure is redrawn from the records alone once the run directories are gone.
    out = tmp_path / "results" / "omniglot_blackbox.png"
    assert blackbox.plot(tmp_path / "gone", tmp_path / "results") == out
    assert blackbox.plot(tmp_path / "gone", tmp_path / "empty") is None


def test_maml_tiny_run_and_resume(bench, omniglot_root: Path, tmp_path: Path) -> None:
    maml = bench("omniglot_maml")
    (r,) = run(maml, tmp_path, "maml-5w5s", "maml.hidden=8")
    check_records([r], "omniglot_maml")
    assert (r["task"], r["method"], r["metric"]) == ("omniglot-vinyals-5w5s", "maml", "test_accuracy")
    assert (r["published"], r["target"], r["eval_inner_steps"]) == (99.9, 99.0, 3)
    assert "task.shots=5" in r["overrides"] and r["ci95"] is not None
    assert not any("eval_part" in o for o in r["overrides"]) and r["curve_metric"] == "val/acc"
    assert (tmp_path / "results" / "omniglot_maml.png").is_file()
    # rerunning a finished configuration resumes it (no more training) and tests the same weights
    (again,) = run(maml, tmp_path, "maml-5w5s", "maml.hidden=8")
    assert again["steps"] == 2 and again["value"] == r["value"]


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ("protonet-1shot", [("5w1s", 98.8, 98.8), ("20w1s", 96.0, 96.0)]),
        (
            "siamese",
            [("5w1s", 97.3, 96.5), ("5w5s", 98.4, 98.0), ("20w1s", 88.2, None), ("20w5s", 97.0, None)],
        ),
    ],
)
def test_omniglot_metric_uses_the_shared_steps(
    bench, omniglot_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, training: str, expected: list
) -> None:
    """omniglot_metric after the move to benchmarks.fewshot: one ProtoNet serves two cells, one Siamese verifier
    all four; the figure is drawn."""
    metric = bench("omniglot_metric")
    monkeypatch.setattr(metric, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(metric, "RESULTS", tmp_path / "results")
    method = training.split("-")[0]
    tiny = ["train.eval_episodes=4", "task.train_ways=10", f"{method}.hidden=8"]  # as --set gives them
    records = metric.train_and_test(training, 60.0, 2, 4, sets=tuple(tiny))
    check_records(records, "omniglot_metric")
    assert all(r["overrides"] == tiny for r in records)  # recorded
    assert [(r["task"], r["published"], r["target"], r["training"], r["batchnorm"]) for r in records] == [
        (f"omniglot-vinyals-{cell}", published, target, training, mode)
        for cell, published, target in expected
        for mode in ("inductive", "transductive")  # one trained model, tested in each BatchNorm mode
    ]
    assert [r["method"] for r in records[:2]] == [method, f"{method}-transductive"]
    figure = metric.plot()
    assert figure == tmp_path / "results" / "omniglot_metric.png" and figure.is_file()
