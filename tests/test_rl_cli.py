"""CLI smoke runs of the RL configs with tiny budgets: run directory named after the env, result, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from metalab.cli import main
from metalab.experiment import load_run_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_DQN = ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=20", "train.eval_episodes=5",
            "eval.episodes=5", "dqn.learning_starts=10", "dqn.batch_size=8", "dqn.hidden=[8]", "train.device=cpu"]  # fmt: skip


def only_run_dir(runs: Path) -> Path:
    (run_dir,) = runs.iterdir()
    return run_dir


def test_dqn_config_smoke_run_with_env_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", str(CONFIGS / "dqn_her_bitflip.yaml"), "--runs-dir", str(tmp_path), "--set", "env.n=5"]
    assert main(args + [f"--set={o}" for o in TINY_DQN]) == 0
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("dqn-bitflip5-s0-")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert list(saved) == ["algo", "seed", "env", "train", "eval", "dqn"]  # no unused task section
    assert saved["env"] == {"id": "metalab/BitFlip-v0", "n": 5, "max_episode_steps": None, "vector": "loop",
                            "num_envs": None}  # fmt: skip
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 40 and 0 <= result["test/success"] <= 1 and result["test/return"] <= 0
    assert (run_dir / "metrics.png").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert "test/success" in capsys.readouterr().out

    # Continue the finished run for 20 more steps, then evaluate it from the command line.
    assert main(["train", "--resume", str(run_dir), "--set", "train.steps=60"]) == 0
    assert json.loads((run_dir / "result.json").read_text())["step"] == 60
    assert main(["eval", str(run_dir), "--episodes", "7"]) == 0
    assert "test/return" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name", ["dqn_her_bitflip", "dqn_bitflip_nohr", "reinforce_cartpole", "reinforce_pendulum"]
)
def test_rl_configs_are_valid(name: str) -> None:
    run = load_run_config(CONFIGS / f"{name}.yaml")
    assert run.algo in ("dqn", "reinforce")
    if name.startswith("dqn"):
        assert run.params.her == ("none" if "nohr" in name else "future")


def test_reinforce_config_smoke_run(tmp_path: Path) -> None:
    overrides = ["train.steps=2", "train.eval_every=2", "train.eval_episodes=2", "eval.episodes=2",
                 "reinforce.episodes=2", "env.max_episode_steps=30", "train.device=cpu"]  # fmt: skip
    args = ["train", str(CONFIGS / "reinforce_pendulum.yaml"), "--runs-dir", str(tmp_path)]
    assert main(args + [f"--set={o}" for o in overrides]) == 0
    assert only_run_dir(tmp_path).name.startswith("reinforce-pendulum-s0-")


def test_bad_rl_config_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = CONFIGS / "dqn_her_bitflip.yaml"
    assert main(["train", str(config), "--runs-dir", str(tmp_path), "--set", "env.id=metalab/BitFlp-v0"]) == 2
    err = capsys.readouterr().err
    assert "env.id" in err and "BitFlip" in err and "Traceback" not in err
    assert main(["train", str(config), "--runs-dir", str(tmp_path), "--set", "dqn.her=futur"]) == 2
    assert "'final', 'future', 'episode', 'random'" in capsys.readouterr().err
    assert main(["train", str(config), "--runs-dir", str(tmp_path), "--set", "task.ways=5"]) == 2
    assert "dqn takes an env section" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
