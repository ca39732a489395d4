"""The README's results come from the records, and only from current ones."""

from __future__ import annotations

from benchmarks import report


def _rec(**kw) -> dict:
    base = {"benchmark": "omniglot_metric", "task": "omniglot-vinyals-5w1s", "method": "protonet",
            "metric": "test_accuracy", "value": 98.0, "ci95": 0.2, "unit": "%", "device": "cpu (2 cores)",
            "commit": "abc1234", "protocol": 2, "published": 98.8}  # fmt: skip
    return {**base, **kw}


def test_readme_results_block_is_what_the_records_say() -> None:
    """Nobody edits a figure by hand: README.md's block is exactly the report of benchmarks/results/*.json."""
    assert report.main(["--check"]) == 0


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


def test_render_quotes_current_and_lists_the_rest_as_pending() -> None:
    text = report.render([
        _rec(value=98.12),
        _rec(task="omniglot-vinyals-5w5s", value=99.99, commit="abc1234+dirty"),
        _rec(metric="test_accuracy_s0", value=12.0),  # per-seed: folded into its aggregate, never a row
    ])  # fmt: skip
    assert (
        "| omniglot-vinyals-5w1s | protonet | test_accuracy | 98.12 ± 0.20 | 98.80 | CPU | abc1234 |" in text
    )
    assert "99.99" not in text and "12.00" not in text
    assert "uncommitted changes: omniglot_metric: protonet (omniglot-vinyals-5w5s)" in text
    seeds = report.render([_rec(benchmark="bitflip", metric="success", unit="success", value=0.9, ci95=0.1,
                                per_seed=[0.8, 0.9, 1.0])])  # fmt: skip
    assert "0.9 ± 0.1 (seeds: 0.8, 0.9, 1; t-interval)" in seeds
