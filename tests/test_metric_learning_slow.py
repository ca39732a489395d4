"""Slow learning tests: each metric learner, trained briefly on Omniglot, beats chance (20%) by a wide margin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalab.experiment import algorithm, run_config_from_dict
from metalab.train.loop import fit


@pytest.mark.slow
@pytest.mark.parametrize("name", ["protonet", "matching", "relation", "siamese"])
def test_learns_5way_1shot_well_above_chance(name: str, omniglot_root: Path, tmp_path: Path) -> None:
    run = run_config_from_dict(
        {
            "algo": name,
            "task": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 5},
            "train": {"steps": 300 if name == "siamese" else 150, "meta_batch": 2, "lr": 0.003, "eval_every": 1000, "eval_episodes": 10,
                      "log_every": 50, "checkpoint_every": 1000, "device": "cpu"},
            "eval": {"episodes": 100, "batch": 25},
            name: {"hidden": 32},
        }
    )  # fmt: skip
    torch.manual_seed(0)
    learner = algorithm(name).build(run, omniglot_root, torch.device("cpu"))
    fit(learner, run.train, tmp_path)
    acc = learner.evaluate("test", 100)["test/acc"]
    print(f"measured: {name} acc {acc:.3f}")
    assert acc > 0.6, f"{name}: 5-way 1-shot test accuracy {acc:.3f} after {run.train.steps} steps"
