"""The meta-RL benchmark script end to end on a tiny budget: records, aggregates, resume and the plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import pytest

from benchmarks import common, meta_rl
from metalab.envs.config import make_env
from metalab.experiment import RunConfig, load_run_config
from metalab.train.logger import read_metrics


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    original = meta_rl.run_config

    def small(
        method: str, task: str, seed: int, steps: int, minutes: float | None, overrides: Sequence[str] = ()
    ) -> RunConfig:
        run = original(method, task, seed, steps, minutes)
        sets = ["eval.episodes=3", "train.eval_episodes=2", f"{run.algo}.hidden=8", f"{run.algo}.learning_starts=4",
                f"{run.algo}.batch_size=4"]  # fmt: skip
        return load_run_config(
            meta_rl.CONFIGS_DIR / f"{meta_rl.config_name(method, task)}.yaml",
            [*(f"{k}={v}" for k, v in flat(run)), *sets, *overrides],
        )

    monkeypatch.setattr(meta_rl, "run_config", small)


def flat(run: RunConfig) -> list[tuple[str, object]]:
    return [("seed", run.seed), ("train.steps", run.train.steps), ("train.log_every", run.train.log_every),
            ("train.eval_every", run.train.eval_every), ("train.device", "cpu"), ("env.id", run.env.id)]  # fmt: skip


def test_tiny_meta_rl_records_resume_and_plot(tiny: None, tmp_path: Path) -> None:
    args = ["--only", "dream-5x5-s0", "dream-5x5-s1", "--steps-scale", "0.0004", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "res")]  # fmt: skip
    meta_rl.main(args)
    records = json.loads((tmp_path / "res" / "meta_rl.json").read_text())
    fields = {"benchmark", "task", "method", "metric", "value", "ci95", "unit", "steps", "seconds", "device",
              "torch", "commit"}  # fmt: skip
    assert all(fields <= set(r) for r in records)
    by_metric = {r["metric"]: r for r in records}
    for metric in ("return", "beats_walking", "heldout_return", "heldout_beats_walking", "train_problems_return",
                   "oracle_return"):  # fmt: skip  # oracle: DREAM only
        assert {metric, f"{metric}_s0", f"{metric}_s1"} <= set(by_metric)
    assert not any("success" in m for m in by_metric)  # CityGrid reports beats_walking instead
    assert by_metric["return_s0"]["metric_key"] == "test/return"
    assert by_metric["heldout_return_s0"]["metric_key"] == "test/heldout_return"
    assert all(r["protocol"] == common.PROTOCOL for r in records)
    agg = by_metric["return"]
    assert agg["seeds"] == [0, 1] and agg["target"] == 0.65 and agg["n"] == 2
    assert agg["per_seed"] == [by_metric["return_s0"]["value"], by_metric["return_s1"]["value"]]
    assert by_metric["beats_walking"]["unit"] == "fraction" and by_metric["return"]["unit"] == "return"
    assert -3.0 <= by_metric["return_s0"]["value"] <= 0.7 and by_metric["return_s0"]["steps"] == 40
    assert (tmp_path / "res" / "meta_rl.png").is_file()
    kept = by_metric["return_s0"]["curve"]  # [trainer step, env steps, val return] at each evaluation
    assert [row[0] for row in kept] == [10, 20, 30, 40] and all(row[1] > 0 for row in kept)
    assert by_metric["return_s0"]["curve_metric"] == "val/return"
    # The figure is redrawn from the records alone once the run directories are gone.
    assert meta_rl.plot(tmp_path / "gone", tmp_path / "res") == tmp_path / "res" / "meta_rl.png"
    assert meta_rl.plot(tmp_path / "gone", tmp_path / "empty") is None
    assert (tmp_path / "res" / "meta_rl_dream-5x5.png").is_file()  # seed 0's held-out meta-episode
    first = by_metric["return_s0"]["value"]
    meta_rl.main(args[:2] + args[3:])  # rerun seed 0: the finished run is tested again, not retrained
    again = {r["metric"]: r for r in json.loads((tmp_path / "res" / "meta_rl.json").read_text())}
    assert again["return_s0"]["value"] == first and again["return_s0"]["steps"] == 40


def test_the_papers_dream_runs_on_the_official_env(tiny: None, tmp_path: Path) -> None:
    for task in ("5x5", "9x9"):  # the paper's configs, on the nine-action CityGrid with end_episode
        env = make_env(meta_rl.run_config("dream_paper", task, 0, 10, None).env)
        assert env.action_space.n == 9, task
    meta_rl.main(["--only", "dream_paper-5x5-s0", "--steps-scale", "0.0002", "--runs-dir", str(tmp_path / "runs"),
                  "--results-dir", str(tmp_path / "res")])  # fmt: skip
    records = {r["metric"]: r for r in json.loads((tmp_path / "res" / "meta_rl.json").read_text())}
    assert {r["method"] for r in records.values()} == {"dream_paper"}
    assert records["return"]["target"] == 0.65 and "oracle_return_s0" in records  # DREAM's diagnostic too
    assert records["return_s0"]["steps"] == 20


def test_the_variant_runs_on_the_paper_runs_grid_and_is_selected_like_it() -> None:
    # dream_xfit and dream_paper differ in the algorithm, not in the env or the selection
    for task in ("5x5", "9x9"):
        xfit, paper = (meta_rl.run_config(m, task, 0, 10, None) for m in ("dream_xfit", "dream_paper"))
        assert xfit.env.id == paper.env.id and "Official" in xfit.env.id, task
        assert xfit.train.keep_best == paper.train.keep_best == "val/return", task
        assert xfit.params.reward_folds == 3 and paper.params.reward_folds == 0, task
    assert meta_rl.target_of("dream_xfit", "9x9", "return") == 0.75


def test_the_9x9_keeps_the_weights_selected_on_training_problems(tiny: None, tmp_path: Path) -> None:
    meta_rl.main(["--only", "rl2-9x9-s0", "--steps-scale", "0.0004", "--runs-dir", str(tmp_path / "runs"),
                  "--results-dir", str(tmp_path / "res")])  # fmt: skip
    seed0 = next(
        r for r in json.loads((tmp_path / "res" / "meta_rl.json").read_text()) if r["metric"] == "return_s0"
    )
    seen = {s: v for s, k, v in read_metrics(tmp_path / "runs" / "rl2-9x9-s0" / "metrics.csv")
            if k == "train/problems_return"}  # fmt: skip
    assert sorted(seen) == [row[0] for row in seed0["curve"]] == [10, 20, 30, 40, 48]  # 48: the last step
    assert seed0["selected_step"] == max(s for s, v in seen.items() if v == max(seen.values()))


def test_the_distractor_free_5x5_runs_the_5x5_config_on_its_own_env(tiny: None, tmp_path: Path) -> None:
    meta_rl.main(["--only", "rl2-5x5plain-s0", "--steps-scale", "0.001", "--runs-dir", str(tmp_path / "runs"),
                  "--results-dir", str(tmp_path / "res")])  # fmt: skip
    records = json.loads((tmp_path / "res" / "meta_rl.json").read_text())
    seed0 = next(r for r in records if r["metric"] == "return_s0")
    assert seed0["task"] == "citygrid5x5nodistractors" and seed0["config"] == "configs/rl2_citygrid5x5.yaml"
    assert seed0["env_id"] == "metalab/CityGrid5x5NoDistractors-v0" and seed0.get("target") is None
    assert not any(r["metric"].startswith("oracle") for r in records)  # RL² has no task encoding
    saved = (tmp_path / "runs" / "rl2-5x5plain-s0" / "config.yaml").read_text()
    assert "CityGrid5x5NoDistractors-v0" in saved


def test_a_set_override_needs_a_label_and_reaches_the_config_and_records(tiny: None, tmp_path: Path) -> None:
    base = ["--only", "dream_xfit-5x5-s0", "--steps-scale", "0.0002", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "res"), "--set", "dream.step_cost_from=7"]  # fmt: skip
    with pytest.raises(SystemExit, match="--label"):  # unlabelled, it would replace the main records
        meta_rl.main(base)
    assert not (tmp_path / "runs").exists()  # refused before any training
    assert (
        meta_rl.run_config("dream_xfit", "5x5", 0, 10, None, ["dream.step_cost_from=7"]).params.step_cost_from
        == 7
    )
    meta_rl.main([*base, "--label", "free-steps"])
    records = json.loads((tmp_path / "res" / "meta_rl.json").read_text())
    assert {r.get("label") for r in records} == {"free-steps"}
    seed0 = next(r for r in records if r["metric"] == "return_s0")
    assert seed0["overrides"] == ["dream.step_cost_from=7"]
    saved = (tmp_path / "runs" / "free-steps" / "dream_xfit-5x5-s0" / "config.yaml").read_text()
    assert "step_cost_from: 7" in saved
    assert not list((tmp_path / "res").glob("*.png"))  # the main records' figures are not redrawn or replaced


def test_reference_records_the_official_5x5_optimum_and_the_figure_draws_it(
    tiny: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    searched = []

    def optimum(size: int, actions: str, distractors: bool) -> Fraction:  # the real search: minutes
        searched.append((size, actions, distractors))
        return Fraction(41, 80)

    monkeypatch.setattr(meta_rl, "bayes_optimal_return", optimum)
    monkeypatch.setattr(meta_rl, "CEILING_TRIALS", 200)
    meta_rl.main(
        ["--reference", "--results-dir", str(tmp_path / "res"), "--runs-dir", str(tmp_path / "runs")]
    )
    assert searched == [(5, "official", True)]  # the env of dream_paper and dream_xfit on 5x5
    records = json.loads((tmp_path / "res" / "meta_rl.json").read_text())
    optimal = [r for r in records if r["method"] == meta_rl.BAYES_OPTIMAL]
    assert [(r["task"], r["metric"], r["value"], r["env_id"]) for r in optimal] == [
        ("citygrid5x5", "return", 0.5125, "metalab/CityGrid5x5Official-v0")
    ]
    assert {r["metric"] for r in records if r["method"] == meta_rl.REFERENCE} == {
        "success_after1", "success_after2", "success_after9"
    }  # fmt: skip
    drawn: list[tuple[float, str]] = []
    monkeypatch.setattr(meta_rl.plt.Axes, "axhline", lambda ax, y, **kw: drawn.append((y, kw["label"])))
    meta_rl.plot(tmp_path / "runs", tmp_path / "res")
    assert (0.5125, "optimal, official actions (0.51)") in drawn and (0.7, "optimal") in drawn


def test_reach_counts_only_the_shared_evaluation_grid_and_the_official_optimum(
    tiny: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def seed_record(method: str, task: str, seed: int, curve: list[list[float]]) -> dict:
        return common.record(meta_rl.BENCH, task, method, f"return_s{seed}", 0.0, unit="return", steps=curve[-1][0],
                             seed=seed, curve=curve, curve_metric="val/return", env_steps=curve[-1][1])  # fmt: skip

    # the paper's curve is evaluated every 6k meta-episodes, the variant's every 3k: its 0.9 at 3k is off the
    # shared grid and must not count; 0.1 - 1e-12 (a mean of returns summing to 0.1) reaches walking on the 5x5
    records = [
        seed_record("dream_paper", "citygrid", 0, [[6000, 100.0, 0.31], [12000, 200.0, 0.6]]),
        seed_record("dream_xfit", "citygrid", 0, [[3000, 40.0, 0.9], [6000, 80.0, 0.2], [9000, 120.0, 0.3]]),
        seed_record("dream_xfit", "citygrid5x5", 1, [[5000, 50.0, 0.1 - 1e-12], [10000, 90.0, 0.31]]),
        common.record(meta_rl.BENCH, "citygrid5x5", meta_rl.BAYES_OPTIMAL, "return", 0.5125, unit="return"),
    ]
    (tmp_path / "meta_rl.json").write_text(json.dumps(records))
    meta_rl.main(["--reach", "--results-dir", str(tmp_path)])
    got = {(r["task"], r["method"], r["metric"]): (r["value"], r["every_steps"])
           for r in json.loads((tmp_path / "meta_rl.json").read_text()) if "level" in r}  # fmt: skip
    assert got == {
        ("citygrid", "dream_paper", "val_env_steps_to_0.3_s0"): (100.0, 6000),
        ("citygrid", "dream_paper", "val_env_steps_to_0.55_s0"): (200.0, 6000),
        ("citygrid", "dream_xfit", "val_env_steps_to_0.3_s0"): (None, 6000),  # 0.3 at 9k: off the grid
        ("citygrid", "dream_xfit", "val_env_steps_to_0.55_s0"): (None, 6000),
        ("citygrid5x5", "dream_xfit", "val_env_steps_to_0.1_s1"): (50.0, 5000),
        ("citygrid5x5", "dream_xfit", "val_env_steps_to_0.3062_s1"): (
            90.0,
            5000,
        ),  # halfway to 0.5125, not 0.7
    }
    assert "reached never" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not exist"):
        meta_rl.main(["--reach", "--results-dir", str(tmp_path / "none")])
