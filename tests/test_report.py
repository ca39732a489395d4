"""The results pages come from the records, and only from current ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from metalab import report
from metalab.cli import main

REPO = Path(__file__).resolve().parents[1]


def _rec(**kw) -> dict:
    base = {"benchmark": "omniglot_metric", "task": "omniglot-vinyals-5w1s", "method": "protonet",
            "metric": "test_accuracy", "value": 98.0, "ci95": 0.2, "unit": "%", "device": "cpu (2 cores)",
            "commit": "abc1234", "protocol": 2, "published": 98.8, "target": 98.5, "steps": 5000}  # fmt: skip
    return {**base, **kw}


def test_committed_pages_are_what_the_records_say() -> None:
    """Nobody edits a figure by hand: docs/results.md and README.md's block are the report of the records."""
    assert report.report(REPO, check=True) == []


def test_only_current_records_are_quoted() -> None:
    assert report.why_not_current(_rec()) is None
    assert "uncommitted" in report.why_not_current(_rec(commit="abc1234+dirty"))
    assert "uncommitted" in report.why_not_current(_rec(dirty=True))
    assert "before the val/test protocol" in report.why_not_current(_rec(protocol=1))
    assert "before the val/test protocol" in report.why_not_current(
        {k: v for k, v in _rec().items() if k != "protocol"}
    )
    speed = _rec(benchmark="sampler", metric="speedup_vs_dataloader-png", protocol=1)
    assert report.why_not_current(speed) is None  # no test split to develop on


def test_page_quotes_current_records_and_lists_the_rest_as_pending() -> None:
    text = report.render_page([
        _rec(value=98.62),
        _rec(task="omniglot-vinyals-5w5s", value=99.99, commit="abc1234+dirty"),
        _rec(metric="test_accuracy_s0", value=12.0),  # per-seed: folded into its aggregate, never a row
    ])  # fmt: skip
    assert (
        "| omniglot-vinyals-5w1s | protonet | test_accuracy | 98.62 ± 0.20 | 98.80 | yes | 5000 | CPU | abc1234 |"
        in text
    )
    assert "99.99" not in text and "12.00" not in text
    assert "  - omniglot_metric: protonet (omniglot-vinyals-5w5s)" in text
    missed = report.render_page([_rec(value=97.0)])
    assert "| 97.00 ± 0.20 | 98.80 | no (98.50) |" in missed
    seeds = report.render_page([_rec(benchmark="bitflip", metric="success", unit="success", value=0.9, ci95=0.1,
                                     per_seed=[0.8, 0.9, 1.0], target=None)])  # fmt: skip
    assert "0.9 ± 0.1 (seeds: 0.8, 0.9, 1; t-interval)" in seeds


def test_calibration_table_lists_current_records_with_an_ece_by_cell_then_ece() -> None:
    text = report.render_page([
        _rec(method="versa", ece=0.0035, ece_interval=[0.0021, 0.0062], nll=0.131, test_episodes=1000),
        _rec(method="protonet", label="ece-peer", ece=0.0050, nll=0.074, test_episodes=1000),
        _rec(method="maml", benchmark="omniglot_maml", ece=0.2, nll=0.5, commit="abc1234+dirty"),  # not current
        _rec(method="matching"),  # no calibration recorded
    ])  # fmt: skip
    table = text.split("## calibration", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| omniglot")]
    assert rows == [
        "| omniglot-vinyals-5w1s | versa | 98.00 ± 0.20 | 0.131 | 0.0035 [0.0021, 0.0062] | 1000 | omniglot_metric | "
        "abc1234 |",
        "| omniglot-vinyals-5w1s | protonet [ece-peer] | 98.00 ± 0.20 | 0.074 | 0.0050 | 1000 | omniglot_metric | "
        "abc1234 |",
    ]
    assert "## calibration" not in report.render_page([_rec()])


def test_headlines_take_current_records_and_peers() -> None:
    lines = report.render_headlines([
        _rec(value=98.4),
        _rec(benchmark="bitflip", task="bitflip-n15", method="metalab-dqn-her-plain", metric="success", unit="success",
             value=1.0, ci95=0.0, published=None),
        _rec(benchmark="bitflip", task="bitflip-n15", method="sb3-dqn-her-future", metric="success", unit="success",
             value=0.9, ci95=0.1, commit="abc1234+dirty", published=None),
    ]).splitlines()  # fmt: skip
    metric = next(line for line in lines if line.startswith("| metric-based"))
    assert "protonet: 98.40 ± 0.20 | 98.80 |" in metric
    goal = next(line for line in lines if line.startswith("| goal-conditioned RL"))
    assert "metalab-dqn-her-plain: 1 ± 0 |" in goal and "| pending |" in goal  # the dirty peer is not quoted
    assert any("pending rerun (maml)" in line for line in lines)


def test_a_headline_can_put_a_second_metric_of_the_same_method_beside_the_first() -> None:
    pearl = {"benchmark": "meta_rl", "task": "point_robot", "method": "pearl", "published": None}
    lines = report.render_headlines([
        _rec(**pearl, metric="success_after9_of_ceiling", value=0.6, ci95=0.05, unit="fraction"),
        _rec(**pearl, metric="oyster_return", value=5.5, ci95=0.5, unit="return"),
    ]).splitlines()  # fmt: skip
    row = next(line for line in lines if "point_robot, success_after9_of_ceiling" in line)
    assert "| pearl: 0.6 ± 0.05 |" in row and "| pearl oyster_return: 5.5 ± 0.5 |" in row


def test_cli_writes_then_checks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text(json.dumps([_rec()]))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    assert main(["report", "--repo", str(tmp_path), "--check"]) == 1
    assert "differs from the benchmark records" in capsys.readouterr().err
    assert main(["report", "--repo", str(tmp_path)]) == 0
    assert main(["report", "--repo", str(tmp_path), "--check"]) == 0
    assert "98.00 ± 0.20" in (tmp_path / "docs" / "results.md").read_text()
    assert "protonet: 98.00 ± 0.20" in (tmp_path / "README.md").read_text()
