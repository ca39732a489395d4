"""benchmarks.mbrl's HalfCheetah setups and its mbrl-lib peers, without training: PETS's CPU-sized config, the
SAC peers at PETS's env steps, the mbrl-lib script's sizes, reward, wrapper and arguments (importable without
mbrl-lib), and the peer's command and records (the script's run faked)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from benchmarks import common, mbrl_lib_pets
from benchmarks import mbrl as bench
from metalab.experiment import RunConfig
from metalab.rl.env_models import env_model
from metalab.rl.rollout import derive_seed
from metalab.train.evaluate import PART_INDEX


def env_steps(run: RunConfig) -> int:
    """A PETS run's env steps: its random steps and ``refit_every`` per whole cycle (and none left over)."""
    cfg = run.params
    cycles, rest = divmod(run.train.steps - cfg.random_steps, cfg.fit_updates + cfg.refit_every)
    assert rest == 0, "training must end after a whole MPC episode"
    return cfg.random_steps + cycles * cfg.refit_every


def test_half_cheetah_pets_is_pets_sized_for_an_hour_on_one_thread() -> None:
    run = bench.run_config("pets-half-cheetah", 0, [])
    cfg, planner = run.params, run.params.planner
    assert run.env.id == "HalfCheetah-v5"
    assert bench.SETUPS["pets-half-cheetah"].config == "mbrl_half_cheetah.yaml"
    assert (cfg.probabilistic, cfg.propagation, planner.method) == (True, "tsinf", "cem")
    assert cfg.members == 5 and planner.horizon == 30  # PETS's ensemble size and half-cheetah horizon
    episode = gym.spec(run.env.id).max_episode_steps
    assert episode == 1000 and cfg.random_steps == cfg.refit_every == episode  # whole episodes, a refit each
    assert env_steps(run) == 7000  # 1 random and 6 MPC episodes
    assert run.train.eval_every == run.train.steps  # one val episode, at the end
    assert (run.train.eval_episodes, run.eval.episodes) == (1, 2)
    # The config's measured cost: 0.44 s per call at 100 x 10 sequences of 30 actions, 5 rounds, 3 x 200 units.
    # Planning calls per seed (MPC, val, test episodes) times the predicted steps of one call stays at that.
    calls = env_steps(run) - cfg.random_steps + (run.train.eval_episodes + run.eval.episodes) * episode
    per_call = planner.candidates * cfg.particles * planner.horizon * planner.iterations
    assert calls == 9000 and per_call == 150_000 and cfg.hidden == (200, 200, 200)


@pytest.mark.parametrize(
    ("sac", "pets", "steps"),
    [
        ("sac-pendulum-2200", "pets-pendulum", 2200),
        ("sac-cartpole-swingup-3200", "pets-cartpole-swingup", 3200),
        ("sac-half-cheetah-7000", "pets-half-cheetah", 7000),
    ],
)
def test_sac_peer_trains_for_pets_env_steps_and_tests_on_as_many_episodes(
    sac: str, pets: str, steps: int
) -> None:
    theirs, ours = bench.run_config(sac, 0, []), bench.run_config(pets, 0, [])
    assert theirs.algo == "sac" and theirs.env.id == ours.env.id
    assert theirs.train.steps == env_steps(ours) == steps == int(sac.rsplit("-", 1)[1])
    assert theirs.eval.episodes == ours.eval.episodes
    assert bench.SETUPS[sac].task == bench.SETUPS[pets].task


def test_sac_half_cheetah_config_and_its_long_run() -> None:
    run = bench.run_config("sac-half-cheetah-100000", 0, [])
    cfg = run.params
    assert run.env.id == "HalfCheetah-v5" and run.train.steps == 100_000
    assert run.eval.episodes == bench.run_config("pets-half-cheetah", 0, []).eval.episodes
    assert run.train.steps % run.train.eval_every == 0 and run.train.eval_every == 5000  # a val curve
    short = bench.run_config("sac-half-cheetah-7000", 0, [])
    assert short.train.steps % short.train.eval_every == 0 and short.train.eval_every == 1000
    standard = ((256, 256), 256, 0.005, 0.99, 3e-4)
    assert (cfg.hidden, cfg.batch_size, cfg.tau, cfg.gamma, run.train.lr) == standard
    assert cfg.auto_alpha and cfg.learning_starts == 1000  # one random episode, as PETS's
    assert cfg.learning_starts < short.train.steps


def test_sac_cartpole_swingup_config_and_its_long_run() -> None:
    run = bench.run_config("sac-cartpole-swingup-20000", 0, [])
    pets = bench.run_config("pets-cartpole-swingup", 0, [])
    assert run.env.id == pets.env.id and run.train.steps == 20_000 and run.eval.episodes == pets.eval.episodes
    assert run.train.steps % run.train.eval_every == 0 and run.train.eval_every == 1000  # a val curve
    short = bench.run_config("sac-cartpole-swingup-3200", 0, [])
    assert (
        short.train.steps % short.train.eval_every == 0
        and short.train.steps % short.train.checkpoint_every == 0
    )
    # One random episode first, as PETS's; otherwise the pendulum config's (SB3's defaults).
    assert run.params.learning_starts == pets.params.random_steps == 200
    assert run.params == dataclasses.replace(
        bench.run_config("sac-pendulum-2200", 0, []).params, learning_starts=200
    )


def _episode_length(env: gym.Env) -> int:
    """Steps until an episode of zero actions ends (the registry's limit or the env's own)."""
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, _, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape, env.action_space.dtype))
        steps, done = steps + 1, terminated or truncated
    return steps


@pytest.mark.parametrize("name", sorted(bench.PEERS))
def test_mbrl_lib_peer_has_metalab_sizes(name: str) -> None:
    peer = bench.PEERS[name]
    task = mbrl_lib_pets.TASKS[peer.task]
    run = bench.run_config(peer.setup, 0, [])
    cfg, planner = run.params, run.params.planner
    assert task.env_id == run.env.id and task.episode == _episode_length(mbrl_lib_pets.make_env(task))
    assert task.episode == cfg.random_steps == cfg.refit_every  # one random episode, a refit per episode
    assert task.episode * task.episodes == env_steps(run)
    assert set(cfg.hidden) == {task.hidden}
    assert (task.members, task.particles) == (cfg.members, cfg.particles)
    # Pendulum's peer has 4 hidden layers (mbrl-lib's num_layers counts them), as first recorded; metalab 3.
    assert task.layers == len(cfg.hidden) + (peer.task == "pendulum")
    assert (task.horizon, task.population, task.iterations, task.elites, task.momentum) == (
        planner.horizon, planner.candidates, planner.iterations, planner.elites, planner.momentum)  # fmt: skip
    assert round(task.population * mbrl_lib_pets.elite_ratio(task)) == planner.elites
    assert (task.population * task.particles) % task.members == 0  # mbrl-lib's fixed_model needs it
    if task.fit_updates:  # the labelled variant trains its models as metalab does
        assert bench.PEERS[name].method != bench.PEER_METHOD
        assert (task.training["model_lr"], task.training["model_wd"], task.training["model_batch_size"]) == (
            run.train.lr, run.train.weight_decay, cfg.batch_size)  # fmt: skip
        assert task.fit_updates == cfg.fit_updates and task.training["validation_ratio"] == 0
        # The first and the last fit: 7 and 94 minibatches an epoch.
        for n, epochs in ((200, 143), (3000, 11)):
            assert mbrl_lib_pets.epochs_per_fit(task, n) == epochs
            per_epoch = math.ceil(n / cfg.batch_size)
            assert epochs * per_epoch >= cfg.fit_updates > (epochs - 1) * per_epoch


def test_half_cheetah_reward_for_mbrl_lib_is_metalabs() -> None:
    generator = torch.Generator().manual_seed(0)
    obs, next_obs = torch.randn(2, 64, 18, generator=generator)
    action = torch.rand(64, 6, generator=generator) * 2 - 1
    ours = env_model("HalfCheetah-v5").reward(obs, action, next_obs)
    theirs = mbrl_lib_pets.half_cheetah_reward(action, next_obs)
    assert theirs.shape == (64, 1) and torch.allclose(theirs[:, 0], ours, atol=1e-6)


def test_mbrl_lib_half_cheetah_env_is_metalabs_wrapped_env() -> None:
    """The script's env appends the step's forward velocity as metalab's does, and pays the env's reward, which
    the planning reward recomputes from the observation."""
    pytest.importorskip("mujoco")
    task = mbrl_lib_pets.TASKS["half-cheetah"]
    theirs = mbrl_lib_pets.make_env(task, 5)
    ours = env_model(task.env_id).make(bench.run_config("pets-half-cheetah", 0, []).env)
    a, _ = theirs.reset(seed=3)
    b, _ = ours.reset(seed=3)
    assert a.shape == (18,) and a[17] == a[8] and np.array_equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(5):
        action = rng.uniform(-1, 1, 6).astype(np.float32)
        a, reward, terminated, truncated, info = theirs.step(action)
        b, *_ = ours.step(action)
        assert np.array_equal(a, b) and a[17] == info["x_velocity"] and not terminated
        planned = mbrl_lib_pets.half_cheetah_reward(torch.from_numpy(action[None]), torch.from_numpy(a[None]))
        assert planned.item() == pytest.approx(reward, abs=1e-5)
    assert truncated  # cut at 5 steps


def test_mbrl_lib_cartpole_reward_is_the_envs() -> None:
    """The cart-pole peer's planning reward, in mbrl-lib's ``(action, next_obs)`` signature, recomputes the
    reward the env pays, out-of-range actions included (the env clips them)."""
    env = mbrl_lib_pets.make_env(mbrl_lib_pets.TASKS["cartpole-swingup"], 30)
    env.reset(seed=4)
    rng = np.random.default_rng(1)
    for _ in range(30):
        action = rng.uniform(-1.5, 1.5, 1).astype(np.float32)
        obs, reward, _, truncated, _ = env.step(action)
        planned = mbrl_lib_pets.cartpole_swingup_reward(
            torch.from_numpy(action[None]), torch.from_numpy(obs[None])
        )
        assert planned.shape == (1, 1) and planned.item() == pytest.approx(reward, abs=1e-5)
    assert truncated


def test_mbrl_lib_script_arguments() -> None:
    args = mbrl_lib_pets.parse_args(["--task", "half-cheetah", "--seed", "1", "--test-seeds", "3", "4"])
    assert (args.task, args.seed, args.test_seeds, args.episodes, args.episode_steps) == (
        "half-cheetah", 1, [3, 4], 7, 1000)  # fmt: skip
    args = mbrl_lib_pets.parse_args(["--seed", "0", "--test-seeds", "5", "--episodes", "2"])
    assert (args.task, args.episodes, args.episode_steps) == ("pendulum", 2, 200)  # the first peer's default
    for bad in (["--task", "ant"], ["--episodes", "0"], ["--episode-steps", "201"], ["--episode-steps", "0"]):
        with pytest.raises(SystemExit):
            mbrl_lib_pets.parse_args(["--seed", "0", "--test-seeds", "5", *bad])


def test_mbrl_lib_half_cheetah_peer_runs_the_script_and_records_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(common, "commit", lambda: "abc1234")  # a clean tree: benchmarks refuse dirty ones
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    calls = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        # The result comes on stdout; stderr (the script's progress, an hour a seed) is not held back.
        assert (
            kwargs["stdout"] == subprocess.PIPE and "stderr" not in kwargs and "capture_output" not in kwargs
        )
        returns = [100.0, 300.0] if "1" == command[command.index("--seed") + 1] else [200.0, 200.0]
        out = {"train_returns": [-50.0, 1.0], "test_returns": returns, "seconds": 9.0, "env_steps": 7000}
        return subprocess.CompletedProcess(command, 0, "mbrl-lib noise\n" + json.dumps(out) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", run)
    bench.main(["--only", "mbrl-lib-pets-half-cheetah", "--seeds", "0", "1", "--results-dir", str(tmp_path),
                "--mbrl-python", "/somewhere/python"])  # fmt: skip
    test = bench.run_config("pets-half-cheetah", 1, []).eval
    seeds = [str(derive_seed(test.seed, PART_INDEX["test"], i)) for i in range(test.episodes)]
    assert calls[1] == ["/somewhere/python", "-m", "benchmarks.mbrl_lib_pets", "--task", "half-cheetah",
                        "--seed", "1", "--test-seeds", *seeds]  # fmt: skip
    records = {r["metric"]: r for r in json.loads((tmp_path / "mbrl.json").read_text())}
    assert set(records) == {"test_return_s0", "test_return_s1", "test_return"}
    for r in records.values():
        assert (r["task"], r["method"], r["env"]) == ("half-cheetah", "mbrl-lib-pets", "HalfCheetah-v5")
    assert records["test_return_s1"]["value"] == 200.0 and records["test_return_s1"]["test_episodes"] == 2
    assert records["test_return_s0"]["train_returns"] == [-50.0, 1.0]
    assert records["test_return"]["per_seed"] == [200.0, 200.0] and records["test_return"]["n"] == 2


def test_a_failed_peer_run_stops_the_benchmark_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(common, "commit", lambda: "abc1234")
    monkeypatch.setattr(common, "PROVENANCE", common.Provenance())
    monkeypatch.setattr(bench.subprocess, "run", lambda c, **k: subprocess.CompletedProcess(c, 1, "", None))
    with pytest.raises(SystemExit, match=r"mbrl-lib-pets-half-cheetah seed 3 failed with exit code 1"):
        bench.main(["--only", "mbrl-lib-pets-half-cheetah", "--seeds", "3", "--results-dir", str(tmp_path),
                    "--mbrl-python", "/somewhere/python"])  # fmt: skip
    assert not (tmp_path / "mbrl.json").exists()
