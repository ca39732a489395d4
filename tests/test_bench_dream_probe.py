"""The DREAM probe: ride counting on a scripted episode, encoding clusters by hand, and the script on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import dream_probe
from benchmarks.rl_common import train
from metalab.envs import CITYGRID_ID, EnvConfig, make_env
from metalab.envs.citygrid import problems
from metalab.experiment import load_run_config
from metalab.rl.meta_episodes import play_episode

LEFT, UP, RIGHT, DOWN, NOOP, RIDE = range(6)


def test_rides_count_trips_from_useful_and_distracting_stops() -> None:
    env = make_env(EnvConfig(id=CITYGRID_ID))
    # start (4, 4): a ride without a bus; up to the useful stop (4, 5); out, back, out, back; right to the
    # distracting stop (5, 5) and out. Rides back from a destination count as neither.
    script = iter([RIDE, UP, RIDE, RIDE, RIDE, RIDE, RIGHT, RIDE])
    steps, _ = play_episode(env, 0, {"problem": 7, "explore": True}, lambda *_: next(script, NOOP))
    assert (int(steps[1].next_obs[0]), int(steps[1].next_obs[1])) == (4, 5)
    assert (int(steps[6].next_obs[0]), int(steps[6].next_obs[1])) == (5, 5)
    assert dream_probe.rides(steps, env.unwrapped.layout) == (2, 1, 1)


def test_right_bound_counts_the_useful_permutations_still_possible() -> None:
    assert [dream_probe.right_bound(k) for k in range(5)] == pytest.approx([1 / 24, 1 / 6, 1 / 2, 1.0, 1.0])
    # by brute force: after rides from stops 0 and 1, the permutations that agree with problem 5's
    seen = dream_probe.decode_problem(5)[0][:2]
    possible = [p for p in range(24) if dream_probe.decode_problem(p)[0][:2] == seen]
    assert len(possible) == 2 and dream_probe.right_bound(2) == 1 / len(possible)


def test_clusters_by_useful_buses() -> None:
    # problems 0 and 24 share the useful permutation (p % 24), problem 1 has another one
    encodings = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    same, different = dream_probe.clusters(encodings, [0, 24, 1])
    assert same == pytest.approx(1.0)
    assert different == pytest.approx((5.0 + np.sqrt(18.0)) / 2)


def test_probe_script_on_a_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = ["train.steps=4", "train.log_every=2", "train.eval_every=4", "train.checkpoint_every=4",
            "train.eval_episodes=2", "eval.episodes=2", "dream.hidden=8", "dream.learning_starts=2",
            "dream.batch_size=2", "dream.exec_batch_size=4", "train.device=cpu"]  # fmt: skip
    run = load_run_config(Path(__file__).parents[1] / "configs" / "dream_citygrid5x5.yaml", sets)
    train(run, tmp_path / "run")
    dream_probe.main([str(tmp_path / "run"), "--problems", "4"])
    out = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert out["step"] == 4 and out["train"]["problems"] == 53 and out["val"]["problems"] == 4
    assert set(out["val"]["ids"]) <= set(problems("val"))  # diagnostics read val problems, never test ones
    assert all(
        out[split]["explore_ended_by_agent"] == 0.0 for split in ("train", "val")
    )  # six actions: no stop
    assert all(0 < out[split]["explore_steps"] <= 20 for split in ("train", "val"))  # at most the horizon
    for split in ("train", "val"):
        s = out[split]
        assert 0.0 <= s["right"] <= 1.0 and s["useful_rides"] >= s["distinct_useful_stops"] >= 0.0
        assert sum(row["fraction"] for row in s["by_distinct_useful_stops"].values()) == pytest.approx(1.0)
        rows = s["by_distinct_useful_stops"]
        assert s["right_bound"] == pytest.approx(
            sum(row["fraction"] * dream_probe.right_bound(int(k)) for k, row in rows.items())
        )
    assert "distinct useful stops" in capsys.readouterr().out
    assert out["weights"] == "checkpoint.pt"  # the run selects nothing
    with pytest.raises(SystemExit, match="not a DREAM run directory"):
        dream_probe.main([str(tmp_path)])


def test_probe_reads_the_selected_weights(tmp_path: Path) -> None:
    sets = ["train.steps=6", "train.log_every=2", "train.eval_every=2", "train.checkpoint_every=2",
            "train.eval_episodes=2", "eval.episodes=2", "dream.hidden=8", "dream.learning_starts=2",
            "dream.batch_size=2", "dream.exec_batch_size=4", "train.device=cpu",
            "train.keep_best=train/problems_return", "train.keep_best_mode=min"]  # fmt: skip
    run = load_run_config(Path(__file__).parents[1] / "configs" / "dream_citygrid5x5.yaml", sets)
    _, fitted = train(run, tmp_path / "run")
    out = dream_probe.probe(tmp_path / "run", 2)
    assert out["weights"] == "best.pt" and out["step"] == fitted.best_step
    assert dream_probe.probe(tmp_path / "run", 2, "checkpoint.pt")["step"] == 6
