"""benchmarks.memorization: a configuration trains, then is measured on the test, train and probe sets."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import memorization


def test_a_sinusoid_configuration_records_test_train_and_probe_errors(tmp_path: Path) -> None:
    args = ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res"), "--allow-dirty"]
    memorization.main(["--only", "mr_maml-sinusoid", "--steps", "20", "--test-episodes", "20", *args])
    records = json.loads((tmp_path / "res" / "memorization.json").read_text())
    by_metric = {r["metric"]: r for r in records}
    assert set(by_metric) == {"test_mse", "train_mse", "probe_mse"}
    for r in records:
        assert r["method"] == "mr_maml" and r["task"] == "sinusoid-nme-10s" and r["steps"] == 20
        assert r["value"] > 0 and r["ci95"] > 0 and r["test_episodes"] == 20
    # Swapping the support sets changes what the learner adapts to, so the error changes.
    assert by_metric["probe_mse"]["value"] != by_metric["train_mse"]["value"]


def test_every_configuration_names_an_existing_config() -> None:
    for stem, _ in memorization.CELLS.values():
        assert (Path(memorization.__file__).parents[1] / "configs" / f"{stem}.yaml").is_file()
