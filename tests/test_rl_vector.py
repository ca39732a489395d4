"""Vectorised rollouts (env.vector: sync / async, gymnasium's vector envs) give the episodes of the plain loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metalab.envs.config import EnvConfig, make_env, make_vector_env
from metalab.errors import ConfigError
from metalab.experiment import algorithm, load_run_config
from metalab.rl.rollout import derive_seed, run_episodes, run_vector_episodes
from metalab.train.loop import fit

REPO = Path(__file__).resolve().parents[1]


def random_policy(space, seed: int):
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
        if hasattr(space, "n"):
            return rng.integers(space.n, size=len(obs))
        return rng.uniform(space.low, space.high, size=(len(obs), *space.shape)).astype(np.float32)

    return act


@pytest.mark.parametrize(
    ("env", "vector"),
    [(EnvConfig(id="CartPole-v1"), "sync"), (EnvConfig(n=6), "sync"), (EnvConfig(id="Pendulum-v1"), "sync"),
     (EnvConfig(id="CartPole-v1"), "async")],
)  # fmt: skip
def test_vector_episodes_equal_the_loops(env: EnvConfig, vector: str) -> None:
    """Same seeds, same actions: identical transitions, returns and successes, including a last short chunk and
    episodes of different lengths (CartPole's end when the pole falls)."""
    cfg = EnvConfig(id=env.id, n=env.n, vector=vector)  # type: ignore[arg-type]
    seeds = [derive_seed(3, i) for i in range(7)]
    space = make_env(cfg).action_space
    looped = run_episodes([make_env(cfg) for _ in range(3)], random_policy(space, 0), seeds)
    venv = make_vector_env(cfg, 3)
    try:
        vectored = run_vector_episodes(venv, random_policy(space, 0), seeds)
    finally:
        venv.close()
    assert len(vectored) == len(looped) == 7
    for a, b in zip(looped, vectored, strict=True):
        assert a.ret == b.ret and (a.success == b.success or (np.isnan(a.success) and np.isnan(b.success)))
        for x, y in zip(a.experience, b.experience, strict=True):
            np.testing.assert_array_equal(x, y)
    if env.id == "CartPole-v1":
        assert len({r.experience.rows for r in looped}) > 1  # the lockstep really handled uneven lengths


def test_reinforce_trains_the_same_with_a_vector_env(tmp_path: Path) -> None:
    weights = {}
    for vector in ("loop", "sync"):
        sets = ["train.steps=3", "train.eval_every=3", "eval.episodes=2", f"env.vector={vector}"]
        run = load_run_config(REPO / "configs" / "reinforce_cartpole.yaml", sets)
        torch.manual_seed(run.seed)
        learner = algorithm(run.algo).build(run, tmp_path, torch.device("cpu"))
        fit(learner, run.train, tmp_path / vector)
        weights[vector] = learner.model.state_dict()
    for k, v in weights["loop"].items():
        assert torch.equal(v, weights["sync"][k]), k


def test_bad_vector_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="vector"):
        EnvConfig(vector="threads")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_envs"):
        EnvConfig(num_envs=0)
    with pytest.raises(ConfigError, match=r"env\.id"):
        make_vector_env(EnvConfig(id="NoSuchEnv-v0", vector="async"), 2)
