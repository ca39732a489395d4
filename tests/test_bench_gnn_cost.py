"""The GNN cost script: records in the agreed shape, and a graph's cost growing with its nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import common, gnn_cost


def test_gnn_cost_records_and_growth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    gnn_cost.main(
        ["--only", "20w1s", "20w5s", "--graphs", "2", "--repeats", "1", "--results-dir", str(tmp_path)]
    )
    records = json.loads((tmp_path / "gnn_cost.json").read_text())
    fields = {"benchmark", "task", "method", "metric", "value", "ci95", "unit", "steps", "seconds", "device",
              "torch", "commit"}  # fmt: skip
    assert all(fields <= set(r) for r in records)
    value = {(r["task"].rsplit("-", 1)[1], r["metric"]): r["value"] for r in records}
    assert value[("5w1s", "cost_vs_5w1s")] == 1.0  # the baseline of the same run
    # 101 nodes against 21: about 23 times the node pairs, so far more than 5 times the cost
    assert value[("20w5s", "ms_per_graph")] > 5 * value[("20w1s", "ms_per_graph")]
    per_minute = value[("20w5s", "test_graph_minutes")] / value[("20w5s", "ms_per_graph")]
    assert per_minute == pytest.approx(1000 * 20 * 15 / 6e4)
