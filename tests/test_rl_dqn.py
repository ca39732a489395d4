"""DQN: TD targets and Polyak updates against hand computation, exact resume, and learning BitFlip with HER."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from metalab.config import merge
from metalab.errors import ConfigError
from metalab.experiment import RunConfig, run_config_from_dict
from metalab.rl import dqn
from metalab.train.checkpoint import load_checkpoint
from metalab.train.logger import read_metrics
from metalab.train.loop import CHECKPOINT, Learner, fit
from metalab.utils import seed_everything

# 4-bit BitFlip, a 50-row buffer (it wraps), updates from env step 20 and a target update every 5 steps.
TINY: dict[str, Any] = {
    "algo": "dqn",
    "seed": 0,
    "env": {"id": "metalab/BitFlip-v0", "n": 4},
    "train": {"steps": 60, "lr": 0.003, "log_every": 1, "eval_every": 30, "checkpoint_every": 10,
              "eval_episodes": 10, "device": "cpu"},
    "eval": {"episodes": 10, "batch": 5},
    "dqn": {"buffer_size": 50, "batch_size": 16, "learning_starts": 20, "target_every": 5, "tau": 0.5,
            "eps_fraction": 0.5, "her": "future", "her_k": 2, "hidden": [16], "clip_target": True},
}  # fmt: skip


def tiny(**sections: Any) -> RunConfig:
    return run_config_from_dict(merge(copy.deepcopy(TINY), sections))


def make(run: RunConfig) -> Learner:
    seed_everything(run.seed)
    return dqn.build(run, Path("unused"), torch.device("cpu"))


def test_double_and_plain_td_targets_by_hand() -> None:
    reward = torch.tensor([-1.0, 0.0, -1.0])
    done = torch.tensor([0.0, 1.0, 0.0])
    q_target = torch.tensor([[1.0, 5.0, 2.0], [9.0, 9.0, 9.0], [-3.0, -2.0, -4.0]])
    q_online = torch.tensor([[7.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    gamma = 0.5
    plain = dqn.td_target(reward, done, q_target, gamma)
    assert plain.tolist() == [-1 + 0.5 * 5.0, 0.0, -1 + 0.5 * -2.0]  # max of the target net
    double = dqn.td_target(reward, done, q_target, gamma, next_q_online=q_online)
    assert double.tolist() == [-1 + 0.5 * 1.0, 0.0, -1 + 0.5 * -4.0]  # online argmax (0, -, 2), target value
    clipped = dqn.td_target(reward, done, q_target, gamma, clip=dqn.feasible_return_range(gamma))
    assert dqn.feasible_return_range(gamma) == (-2.0, 0.0)
    assert clipped.tolist() == [0.0, 0.0, -2.0]


def test_polyak_update_is_the_formula() -> None:
    target = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    online = {"w": torch.tensor([3.0, -2.0], requires_grad=True), "b": torch.tensor([10.0])}
    out = dqn.polyak_update(target, online, 0.25)
    assert torch.allclose(out["w"], 0.75 * target["w"] + 0.25 * online["w"].detach())
    assert torch.allclose(out["b"], torch.tensor([2.5]))
    assert not out["w"].requires_grad and target["w"].tolist() == [1.0, 2.0]  # pure: inputs untouched
    assert torch.equal(dqn.polyak_update(target, online, 1.0)["w"], online["w"].detach())


def test_linear_schedule() -> None:
    values = [dqn.linear_schedule(1.0, 0.1, 10, t) for t in (0, 5, 10, 50)]
    assert values == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert dqn.linear_schedule(1.0, 0.1, 0, 0) == 0.1


def test_td_loss_and_gradients() -> None:
    torch.manual_seed(0)
    q_net = dqn.MLP(5, (8,), 3)
    online = dict(q_net.named_parameters())
    target = {k: v.detach() + 0.1 for k, v in online.items()}
    batch = dqn.Transitions(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 2, 1, 0]),
                            -torch.ones(4), torch.randn(4, 3), torch.tensor([0.0, 0.0, 1.0, 0.0]))  # fmt: skip
    cfg = dqn.Config(loss="mse", gamma=0.9)
    loss, _ = dqn.td_loss(q_net, online, target, batch, cfg)
    x, nx = torch.cat([batch.obs, batch.goal], -1), torch.cat([batch.next_obs, batch.goal], -1)
    q = q_net(x)[torch.arange(4), batch.action]
    with torch.no_grad():
        nxt = torch.func.functional_call(q_net, target, (nx,))[torch.arange(4), q_net(nx).argmax(-1)]
    expected = ((q - (batch.reward + 0.9 * (1 - batch.done) * nxt)) ** 2).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in q_net.parameters())


def test_input_centering_maps_bounded_dimensions_to_unit_range() -> None:
    import gymnasium as gym

    from metalab.rl.rollout import input_centering

    bits = gym.make("metalab/BitFlip-v0", n=3)
    shift, scale = input_centering(bits)  # observation then desired goal, both bits
    x = np.array([[0, 1, 1, 1, 0, 0]], np.float32)
    assert np.array_equal((x - shift) * scale, 2 * x - 1)
    cartpole = gym.make("CartPole-v1")  # bounds: +-4.8, inf, +-0.42, inf
    shift, scale = input_centering(cartpole)
    high = cartpole.observation_space.high
    assert np.allclose(scale, [1 / high[0], 1, 1 / high[2], 1]) and np.allclose(shift, 0)


def test_centered_td_loss_equals_loss_on_centered_inputs() -> None:
    torch.manual_seed(0)
    q_net = dqn.MLP(6, (8,), 3)
    online = dict(q_net.named_parameters())
    target = {k: v.detach() + 0.1 for k, v in online.items()}
    obs, goal, nxt = (torch.randint(0, 2, (4, 3)).float() for _ in range(3))
    reward, done, action = -torch.ones(4), torch.zeros(4), torch.tensor([0, 2, 1, 0])
    cfg = dqn.Config(gamma=0.9)
    centering = (torch.full((6,), 0.5), torch.full((6,), 2.0))
    loss, _ = dqn.td_loss(q_net, online, target, dqn.Transitions(obs, goal, action, reward, nxt, done), cfg,
                          centering)  # fmt: skip
    pm = dqn.Transitions(2 * obs - 1, 2 * goal - 1, action, reward, 2 * nxt - 1, done)
    assert torch.allclose(loss, dqn.td_loss(q_net, online, target, pm, cfg)[0])
    assert not torch.allclose(
        loss, dqn.td_loss(q_net, online, target, pm._replace(obs=obs, goal=goal), cfg)[0]
    )


def test_collects_without_updates_before_learning_starts(tmp_path: Path) -> None:
    run = tiny(train={"steps": 10})  # learning starts at env step 20: no update at all
    learner = make(run)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    fit(learner, run.train, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert state["optimizer"]["state"] == {}  # Adam never stepped
    keys = {k for _, k, _ in read_metrics(tmp_path / "metrics.csv")}
    assert "train/loss" not in keys and {"train/epsilon", "val/success", "val/return"} <= keys
    assert state["learner"]["buffer"]["size"] > 0


def test_resume_is_exact(tmp_path: Path) -> None:
    """Ctrl-C mid-run (mid-episode, buffer wrapped), resume in a fresh learner: same as never stopping."""
    run = tiny()
    for name in ("ref", "run"):
        (tmp_path / name).mkdir()
    reference = make(run)
    fit(reference, run.train, tmp_path / "ref")

    interrupted = make(run)
    inner = interrupted.loss

    def loss(step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        if step == 41:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(step)

    interrupted.loss = loss
    result = fit(interrupted, run.train, tmp_path / "run")
    assert result.interrupted and result.step == 42
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)["learner"]
    assert saved["recorder"]["actions"] is not None  # stopped mid-episode: the env state is replayed
    assert saved["buffer"]["size"] == 50  # and the buffer has wrapped

    resumed = make(run)
    seed_everything(123)
    out = fit(resumed, run.train, tmp_path / "run", resume=True)
    assert (out.step, out.interrupted) == (60, False)
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    ref_state, res_state = reference.state(), resumed.state()
    for k, v in ref_state["target"].items():
        assert torch.equal(v, res_state["target"][k]), k
    for k, v in ref_state["buffer"]["columns"].items():
        assert torch.equal(v, res_state["buffer"]["columns"][k]), k
    assert ref_state["rng"] == res_state["rng"] and ref_state["episode"] == res_state["episode"]
    assert ref_state["recorder"]["seed"] == res_state["recorder"]["seed"]

    def logged(run_dir: Path) -> list[tuple[int, str, float]]:
        return [r for r in read_metrics(run_dir / "metrics.csv") if not r[1].startswith("time/")]

    assert logged(tmp_path / "run") == logged(tmp_path / "ref")


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"'dqn.her'.*'none', 'final'"):
        tiny(dqn={"her": "futur"})
    with pytest.raises(ConfigError, match=r"dqn.tau"):
        tiny(dqn={"tau": 0.0})
    with pytest.raises(ConfigError, match=r"'env.id'.*discrete"):
        make(tiny(env={"id": "Pendulum-v1", "n": None}, dqn={"her": "none"}))
    with pytest.raises(ConfigError, match=r"'dqn.her'.*goal env"):
        make(tiny(env={"id": "CartPole-v1", "n": None}))
    with pytest.raises(ConfigError, match=r"'task'.*dqn takes an env section"):
        run_config_from_dict({**copy.deepcopy(TINY), "task": {"dataset": "sinusoid"}})


def test_plain_env_without_goals_runs(tmp_path: Path) -> None:
    run = tiny(
        env={"id": "CartPole-v1", "n": None}, dqn={"her": "none"}, train={"steps": 30, "eval_every": 30}
    )
    result = fit(make(run), run.train, tmp_path)
    assert set(result.metrics) == {"val/return", "val/return_ci95"}  # CartPole reports no success


@pytest.mark.slow
def test_dqn_her_solves_bitflip_10(tmp_path: Path) -> None:
    """DQN + HER (future, k=4) reaches >= 95% greedy success on 10-bit BitFlip (the HER paper's setting)."""
    from metalab.experiment import load_run_config

    repo = Path(__file__).resolve().parents[1]
    run = load_run_config(repo / "configs" / "dqn_her_bitflip.yaml",
                          ["train.steps=3000", "train.eval_every=3000", "train.device=cpu"])  # fmt: skip
    learner = make(run)
    fit(learner, run.train, tmp_path)
    metrics = learner.evaluate("test", 100)
    print(f"measured: dqn+her bitflip-10 success {metrics['test/success']:.3f}")
    assert metrics["test/success"] >= 0.95, metrics  # measured 1.00 at seed 0


def test_bitflip_without_relabeling_does_not_learn_n_15_quickly(tmp_path: Path) -> None:
    """Sanity of the baseline: without HER, random exploration gets no reward signal at 15 bits."""
    run = tiny(env={"n": 15}, dqn={"her": "none", "buffer_size": 500}, train={"steps": 80, "eval_every": 80})
    result = fit(make(run), run.train, tmp_path)
    assert result.metrics["val/success"] <= 0.1
    assert np.isclose(result.metrics["val/return"], -15 * (1 - result.metrics["val/success"]), atol=2)
