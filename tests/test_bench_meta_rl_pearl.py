"""The meta-RL benchmark's PEARL records: targets as fractions of the posterior-sampling ceiling, the official
(oyster) metric beside metalab's, and the half-cheetah configuration's name."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from benchmarks import common, meta_rl
from metalab.experiment import RunConfig, load_run_config

CEILING = {1: 0.24, 2: 0.35, 9: 0.94}  # rounded values of meta_rl.ceiling(), to keep these tests quick


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    monkeypatch.setattr(meta_rl, "ceiling", lambda: CEILING)


def test_targets_are_fractions_of_the_ceiling(clean: None) -> None:
    assert meta_rl.target_of("pearl", "point", "success_after1_of_ceiling") == 0.9
    assert meta_rl.target_of("pearl", "point", "success_after2_of_ceiling") == 0.9
    assert meta_rl.target_of("pearl", "point", "success_after9_of_ceiling") == 0.85
    assert meta_rl.target_of("pearl", "point", "success_after1") == pytest.approx(0.9 * 0.24)
    assert meta_rl.target_of("pearl", "point", "success_after9") == pytest.approx(0.85 * 0.94)
    assert meta_rl.target_of("pearl", "point", "return_after9") is None
    assert meta_rl.target_of("pearl", "point", "oyster_return") is None
    assert meta_rl.target_of("pearl", "cheetah-vel", "oyster_return") is None
    assert meta_rl.target_of("dream", "9x9", "return") == 0.75  # the others' targets are unchanged


def test_ceiling_records_divide_success_and_its_interval_by_the_ceiling(clean: None) -> None:
    test = {"test/success_after1": 0.12, "test/success_after1_ci95": 0.024, "test/success_after9": 0.47}
    records = meta_rl.ceiling_records(test, 2, {"steps": 10, "seconds": 1.0, "seed": 2})
    by_metric = {r["metric"]: r for r in records}
    assert set(by_metric) == {f"success_after{k}_of_ceiling_s2" for k in (1, 2, 9)}
    first = by_metric["success_after1_of_ceiling_s2"]
    assert first["value"] == pytest.approx(0.5) and first["ci95"] == pytest.approx(0.1)
    assert (first["target"], first["ceiling"], first["unit"], first["steps"]) == (0.9, 0.24, "fraction", 10)
    assert by_metric["success_after9_of_ceiling_s2"]["value"] == pytest.approx(0.5)
    assert by_metric["success_after2_of_ceiling_s2"]["value"] is None  # missing, not zero
    assert by_metric["success_after2_of_ceiling_s2"]["protocol"] == common.PROTOCOL


def test_names_and_metrics() -> None:
    assert meta_rl.parse("pearl-cheetah-vel-s1") == ("pearl", "cheetah-vel", 1)
    assert meta_rl.parse("dream-5x5plain-s0") == ("dream", "5x5plain", 0)
    assert {"pearl-cheetah-vel-s0", "pearl-point-s2"} <= set(meta_rl.CONFIGS)
    assert meta_rl.config_name("pearl", "cheetah-vel") == "pearl_half_cheetah_vel"
    point = meta_rl.metric_names("pearl", "point")
    old = [f"{m}_after{k}" for k in (1, 2, 9) for m in ("success", "return")]
    assert point[: len(old)] == old  # the records made before keep their names
    assert {"oyster_return", "oyster_success", "success_after9_of_ceiling"} <= set(point)
    assert meta_rl.metric_keys("pearl", "cheetah-vel")["oyster_return"] == "test/oyster_return"
    assert meta_rl.curve_key("pearl", "cheetah-vel") == "val/oyster_return"
    assert meta_rl.primary_metric("pearl", "point") == "success_after9"


def test_tiny_pearl_point_run_records_oyster_and_ceiling_fractions(
    clean: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    original = meta_rl.run_config

    def small(
        method: str, task: str, seed: int, steps: int, minutes: float | None, overrides: Sequence[str] = ()
    ) -> RunConfig:
        run = original(method, task, seed, steps, minutes, overrides)
        sets = ["eval.episodes=2", "train.eval_episodes=2", "train.meta_batch=2", "pearl.encoder_hidden=[8]",
                "pearl.sac.hidden=[8]", "pearl.initial_steps=20", "pearl.context_batch=8", "pearl.batch_size=8",
                "pearl.tasks_per_collect=1", "pearl.prior_steps=20", "pearl.posterior_steps=20",
                "pearl.oyster_steps_per_eval=60", "pearl.oyster_exp_traj=2"]  # fmt: skip
        kept = [f"seed={run.seed}", f"train.steps={run.train.steps}", f"train.log_every={run.train.log_every}",
                f"train.eval_every={run.train.eval_every}", "train.device=cpu"]  # fmt: skip
        return load_run_config(
            meta_rl.CONFIGS_DIR / f"{meta_rl.config_name(method, task)}.yaml", [*kept, *sets, *overrides]
        )

    monkeypatch.setattr(meta_rl, "run_config", small)
    meta_rl.main(["--only", "pearl-point-s0", "--steps-scale", "0.0001", "--runs-dir", str(tmp_path / "runs"),
                  "--results-dir", str(tmp_path / "res")])  # fmt: skip
    by_metric = {r["metric"]: r for r in json.loads((tmp_path / "res" / "meta_rl.json").read_text())}
    oyster = by_metric["oyster_return_s0"]
    assert oyster["metric_key"] == "test/oyster_return" and "_do_eval" in oyster["eval_protocol"]
    assert oyster["oyster"] == {"num_exp_traj_eval": 2, "num_steps_per_eval": 60, "num_evals": 2}
    assert "eval_protocol" not in by_metric["success_after9_s0"]  # metalab's own trial metric
    assert by_metric["success_after9_s0"]["target"] == pytest.approx(0.85 * 0.94)
    fraction = by_metric["success_after9_of_ceiling_s0"]
    assert fraction["value"] == pytest.approx(by_metric["success_after9_s0"]["value"] / 0.94)
    assert by_metric["success_after9_of_ceiling"]["n"] == 1 and by_metric["oyster_return"]["n"] == 1
    assert by_metric["success_after9_s0"]["curve_metric"] == "val/success_after9"
