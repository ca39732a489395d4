"""The BitFlip benchmark script on a tiny budget: records in the agreed shape, per seed and over seeds, a
figure, resume of a finished run, and nothing written into the repository."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from metalab.errors import ConfigError
from metalab.experiment import load_run_config
from metalab.rl import dqn

REPO = Path(__file__).resolve().parents[1]
KEYS = {"benchmark", "task", "method", "metric", "value", "ci95", "unit", "steps", "seconds", "device", "torch",
        "commit"}  # fmt: skip


@pytest.fixture
def bitflip(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(
        str(REPO)
    )  # benchmarks/ is a top-level package beside metalab/, not installed
    common = importlib.import_module("benchmarks.common")
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    return importlib.import_module("benchmarks.bitflip")


def run(bitflip: ModuleType, tmp_path: Path, *only: str) -> list[dict]:
    args = ["--only", *only, "--budget", "7=300", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results")]  # fmt: skip
    bitflip.main(args)
    return json.loads((tmp_path / "results" / "bitflip.json").read_text())


def repo_snapshot() -> tuple[int | None, bool]:
    """What a run writing into the repository would change: the results file and a run directory."""
    results = REPO / "benchmarks" / "results" / "bitflip.json"
    return results.stat().st_mtime_ns if results.is_file() else None, (
        REPO / "runs/bench/bitflip/future-n7-s0"
    ).exists()


def test_tiny_grid_records_and_resume(bitflip: ModuleType, tmp_path: Path) -> None:
    before = repo_snapshot()
    records = run(bitflip, tmp_path, "future-n7-s0", "none-n7-s1")
    by_key = {(r["method"], r["metric"]): r for r in records}
    assert set(by_key) == {
        ("metalab-dqn-future", "success_s0"), ("metalab-dqn-future", "steps_to_90_s0"),
        ("metalab-dqn-future", "success"), ("metalab-dqn-future", "steps_to_90"),
        ("metalab-dqn-none", "success_s1"), ("metalab-dqn-none", "steps_to_90_s1"),
        ("metalab-dqn-none", "success"), ("metalab-dqn-none", "steps_to_90"),
    }  # fmt: skip
    for r in records:
        assert KEYS <= set(r) and r["benchmark"] == "bitflip" and r["task"] == "bitflip-n7"
        assert r["steps"] == 300 and r["seconds"] > 0
    seed = by_key[("metalab-dqn-future", "success_s0")]
    assert 0 <= seed["value"] <= 1 and seed["unit"] == "fraction" and seed["budget_env_steps"] == 300
    assert seed["eval_every"] == 100 and seed["test_episodes"] == 100 and "n = 50" in seed["published"]
    assert seed["curve_metric"] == "val/success" and seed["double"] and seed["clip_target"]
    assert seed["inputs"] == "observation, desired goal (2n)" and seed["bits"] == 7
    agg = by_key[("metalab-dqn-future", "success")]
    assert agg["seeds"] == [0] and agg["n"] == 1 and agg["per_seed"] == [seed["value"]]
    reach = by_key[("metalab-dqn-none", "steps_to_90_s1")]
    assert reach["unit"] == "env steps" and (reach["value"] is None or reach["value"] % 100 == 0)
    assert (tmp_path / "results" / "bitflip.png").is_file()
    assert [step for step, _ in seed["curve"]] == [100, 200, 300]  # each evaluation, kept with the record
    # The figure is redrawn from the results file alone once the run directories are gone, and from nothing
    # nothing is drawn.
    assert bitflip.plot(tmp_path / "gone", tmp_path / "results") == tmp_path / "results" / "bitflip.png"
    assert bitflip.plot(tmp_path / "gone", tmp_path / "empty") is None

    # Rerunning a finished configuration resumes it (no training) and records the same result.
    again = {(r["method"], r["metric"]): r for r in run(bitflip, tmp_path, "future-n7-s0")}
    assert again[("metalab-dqn-future", "success_s0")]["value"] == seed["value"]
    # A run started before an option existed (saved settings without it) resumes: the option's default is no change.
    saved_path = tmp_path / "runs" / "future-n7-s0" / "bench.json"
    saved = json.loads(saved_path.read_text())
    del saved["dqn"]["center_inputs"]
    saved_path.write_text(json.dumps(saved))
    assert run(bitflip, tmp_path, "future-n7-s0")[0]["value"] == records[0]["value"]
    with pytest.raises(SystemExit, match="different settings"):  # a changed budget is refused, not mixed in
        bitflip.main(["--only", "future-n7-s0", "--budget", "7=400", "--runs-dir", str(tmp_path / "runs"),
                      "--results-dir", str(tmp_path / "results")])  # fmt: skip
    assert repo_snapshot() == before


def test_groups_expand_to_seeds(bitflip: ModuleType) -> None:
    assert bitflip.GROUPS["future-n15"] == ["future-n15-s0", "future-n15-s1", "future-n15-s2"]
    assert len(bitflip.GROUPS["n50"]) == 12 and len(bitflip.DEFAULT) == 48 and len(bitflip.CONFIGS) == 60
    assert bitflip.GROUPS["plain-n7"] == ["plain-n7-s0", "plain-n7-s1", "plain-n7-s2"]
    # The like-for-like cell runs when named, not in the default grid.
    assert not any(name.startswith("plain") for name in bitflip.DEFAULT)


def test_plain_method_matches_sb3s_target_and_inputs(bitflip: ModuleType, tmp_path: Path) -> None:
    """``plain``: no double DQN, no target clip, and SB3's input layout (achieved goal, desired goal, observation)."""
    run_cfg = bitflip.run_config("plain", 7, 0, 300)
    cfg = run_cfg.params
    assert (cfg.her, cfg.double, cfg.clip_target, cfg.achieved_goal_input) == ("future", False, False, True)
    learner = dqn.build(run_cfg, tmp_path, torch.device("cpu"))
    assert next(iter(learner.model.parameters())).shape[1] == 3 * 7  # SB3's 3n inputs (metalab's own: 2n)
    with pytest.raises(ConfigError, match="achieved_goal_input"):
        dqn.build(load_run_config(bitflip.CONFIG, ["dqn.achieved_goal_input=true", "dqn.center_inputs=true"]),
                  tmp_path, torch.device("cpu"))  # fmt: skip
    by_metric = {r["metric"]: r for r in run(bitflip, tmp_path, "plain-n7-s0")}
    seed = by_metric["success_s0"]
    assert seed["method"] == "metalab-dqn-her-plain" and 0 <= seed["value"] <= 1 and seed["steps"] == 300
    assert (seed["double"], seed["clip_target"]) == (False, False)
    assert seed["inputs"] == bitflip.SB3_FACTS["inputs"] and {"success", "steps_to_90"} <= set(by_metric)


def test_missing_sb3_is_one_clear_line(bitflip: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "stable_baselines3" else real(n))
    with pytest.raises(SystemExit, match=r"stable-baselines3 is not installed") as info:
        bitflip.main(["--only", "sb3-n7-s0"])
    assert "\n" not in str(info.value)


def test_sb3_peer_tiny_run(bitflip: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("stable_baselines3")
    records = {r["metric"]: r for r in run(bitflip, tmp_path, "sb3-n7-s0")}
    seed = records["success_s0"]
    assert seed["method"] == "sb3-dqn-her-future" and 0 <= seed["value"] <= 1 and seed["steps"] == 300
    hp = seed["sb3_hyperparameters"]
    assert hp["buffer_size"] == 20_000 and hp["batch_size"] == 128 and hp["target_update_interval"] == 500
    assert hp["replay_buffer_kwargs"] == {"n_sampled_goal": 4, "goal_selection_strategy": "future"}
    assert {"success", "steps_to_90", "steps_to_90_s0"} <= set(records)
    assert seed["curve_metric"] == "val/success" and (seed["double"], seed["clip_target"]) == (False, False)
