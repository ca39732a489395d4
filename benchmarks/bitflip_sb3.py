"""The peer of the BitFlip benchmark: Stable-Baselines3's DQN with its HerReplayBuffer on metalab's BitFlip.

SB3's hyperparameters are read from the same metalab run config (``configs/dqn_her_bitflip.yaml``), knob by
knob, so both sides train with the same settings wherever SB3 has the same knob:

=======================================  ========================================  ===============================
metalab (dqn / train sections)           SB3 DQN / HerReplayBuffer                 value here
=======================================  ========================================  ===============================
train.lr (Adam, torch defaults)          learning_rate (Adam, same)                1e-3
dqn.batch_size                           batch_size                                128
dqn.buffer_size: rows, real + relabeled  buffer_size: real transitions             100000 rows = 20000 env steps
dqn.her_k relabeled rows per real one    n_sampled_goal (relabel on sampling)      4: 80% of a minibatch relabeled
dqn.her                                  goal_selection_strategy                   future
dqn.gamma                                gamma                                     0.98
dqn.target_every (env steps), dqn.tau    target_update_interval, tau               500 env steps, 1.0 (hard copy)
dqn.eps_start / eps_end / eps_fraction   exploration_initial/final_eps, _fraction  1.0 -> 0.2 over 20% of budget
dqn.learning_starts                      learning_starts                           200 env steps
dqn.train_frequency                      train_freq, gradient_steps                1 update per env step
train.grad_clip                          max_grad_norm                             10
dqn.loss: huber                          (always Huber)                            Huber
dqn.hidden (ReLU)                        policy_kwargs net_arch (ReLU)             [256]
=======================================  ========================================  ===============================

Not matched by the tuned config (SB3 has no such knob): metalab's double-DQN target and its clip of TD targets
to the feasible return range ``[-1/(1-gamma), 0]`` (SB3: plain max target, unclipped); SB3's Q-network reads
the dict observation's keys flattened and concatenated in sorted order, ``[achieved goal, desired goal,
observation]`` (3n inputs; on BitFlip the achieved goal is the observation), metalab's ``[observation, desired
goal]`` (2n). The ``plain`` method of :mod:`benchmarks.bitflip` matches these three (``dqn.double=false``,
``dqn.clip_target=false``, ``dqn.achieved_goal_input=true``). Not matched by either: SB3 draws relabeled goals
anew at each minibatch and keeps the real transition's ``done``, metalab draws ``her_k`` goals once per
transition when the episode ends and marks a relabeled transition terminal where its goal is reached. Both are
evaluated by the same code on the same greedy evaluation episodes (periodically ``val``, at the end ``test``).

The run directory holds ``model.zip``, ``buffer.pkl`` and ``state.json`` (env steps, training seconds, the
learning curve), checkpointed every ``checkpoint_every`` env steps. Resuming reloads them and continues the
same exploration schedule; unlike metalab's resume it is not exact (the episode in progress and the RNG
states are not restored).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.rl_common import start_run_dir
from metalab.envs.config import make_env
from metalab.experiment import RunConfig, run_config_from_dict
from metalab.rl import dqn
from metalab.rl.rollout import derive_seed, run_episodes
from metalab.stats import Estimate, mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.utils import atomic_path

MISSING = (
    "stable-baselines3 is not installed: `pip install -e '.[bench]'` (or `pip install stable-baselines3`), "
    "or leave the sb3-* configurations out of --only"
)


class Sb3Result(NamedTuple):
    test_success: Estimate
    """Greedy success over the test evaluation episodes after training."""
    curve: list[tuple[int, float]]
    """(env steps, greedy success over the periodic evaluation episodes: the val part)."""
    steps: int
    seconds: float
    """Training wall-clock seconds (periodic evaluations included), across resumes."""


def sb3_kwargs(run: RunConfig) -> dict[str, Any]:
    """``DQN(...)`` keyword arguments equal to ``run``'s metalab DQN settings (see the module docstring)."""
    cfg: dqn.Config = run.params
    if cfg.her == "none" or cfg.train_frequency != 1:
        raise ValueError("the SB3 peer mirrors DQN + HER with one update per env step")
    return {
        "learning_rate": run.train.lr,
        "buffer_size": cfg.buffer_size // (1 + cfg.her_k),  # the same number of real env steps remembered
        "learning_starts": cfg.learning_starts,
        "batch_size": cfg.batch_size,
        "tau": cfg.tau,
        "gamma": cfg.gamma,
        "train_freq": 1,
        "gradient_steps": 1,
        "replay_buffer_kwargs": {"n_sampled_goal": cfg.her_k, "goal_selection_strategy": cfg.her},
        "target_update_interval": cfg.target_every,
        "exploration_fraction": cfg.eps_fraction,
        "exploration_initial_eps": cfg.eps_start,
        "exploration_final_eps": cfg.eps_end,
        "max_grad_norm": run.train.grad_clip,
        "policy_kwargs": {"net_arch": list(cfg.hidden)},
    }


def evaluator(run: RunConfig, model: Any) -> Callable[[str, int], Estimate]:
    """Greedy success of ``model`` on the evaluation episodes metalab's DQN uses for the same part."""
    envs = [make_env(run.env) for _ in range(min(run.eval.batch, run.eval.episodes))]

    def act(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
        # BitFlip's achieved goal is its state, so the observation doubles as the achieved goal.
        dict_obs = {"observation": obs, "achieved_goal": obs, "desired_goal": goal}  # (E, n) each
        return model.predict(dict_obs, deterministic=True)[0]

    def evaluate(part: str, episodes: int) -> Estimate:
        seeds = [derive_seed(run.eval.seed, PART_INDEX[part], i) for i in range(episodes)]
        return mean_ci95([r.success for r in run_episodes(envs, act, seeds)])

    return evaluate


def train_sb3(run: RunConfig, run_dir: Path, eval_every: int, checkpoint_every: int) -> Sb3Result:
    """Train SB3's DQN + HER for ``run.train.steps`` env steps in ``run_dir`` (resuming), then test it."""
    from stable_baselines3 import DQN, HerReplayBuffer
    from stable_baselines3.common.callbacks import BaseCallback

    kwargs = sb3_kwargs(run)
    settings = {"run": run.to_yaml_dict(), "sb3": kwargs, "eval_every": eval_every}
    same = start_run_dir(
        run_dir, settings, lambda saved: {**saved, "run": run_config_from_dict(saved["run"]).to_yaml_dict()}
    )
    resume = same and (run_dir / "state.json").is_file()
    state = (
        json.loads((run_dir / "state.json").read_text())
        if resume
        else {"steps": 0, "seconds": 0.0, "curve": []}
    )
    env = make_env(run.env)
    if resume:
        model = DQN.load(run_dir / "model.zip", env=env, device="cpu")
        if state["steps"] < run.train.steps:
            model.load_replay_buffer(run_dir / "buffer.pkl")
    else:
        model = DQN("MultiInputPolicy", env, replay_buffer_class=HerReplayBuffer, seed=run.seed, device="cpu",
                    verbose=0, **kwargs)  # fmt: skip
    evaluate = evaluator(run, model)
    curve: list[tuple[int, float]] = [tuple(p) for p in state["curve"]]
    start, elapsed = time.perf_counter(), float(state["seconds"])

    def save(steps: int) -> None:
        with atomic_path(run_dir / "model.zip") as tmp:
            model.save(tmp)
        with atomic_path(run_dir / "buffer.pkl") as tmp:
            model.save_replay_buffer(tmp)
        seconds = elapsed + time.perf_counter() - start
        with atomic_path(run_dir / "state.json") as tmp:  # written last: it vouches for the two files above
            tmp.write_text(json.dumps({"steps": steps, "seconds": seconds, "curve": curve}) + "\n")

    class Periodic(BaseCallback):
        """Evaluates (val) every ``eval_every`` env steps and at the end; checkpoints every ``checkpoint_every``."""

        def _on_step(self) -> bool:
            t = self.num_timesteps  # already counts the env step just taken
            if t % eval_every == 0 or t == run.train.steps:
                curve.append((t, evaluate("val", run.train.eval_episodes).mean))
            if t % checkpoint_every == 0 or t == run.train.steps:
                save(t)
            return True

    remaining = run.train.steps - int(state["steps"])
    if remaining > 0:
        # reset_num_timesteps=False continues the step count, so the exploration schedule spans the whole budget.
        try:
            model.learn(remaining, callback=Periodic(), reset_num_timesteps=not resume)
        except KeyboardInterrupt:
            saved = (
                json.loads((run_dir / "state.json").read_text())["steps"]
                if (run_dir / "state.json").is_file()
                else 0
            )
            raise SystemExit(
                f"{run_dir}: interrupted; checkpointed at env step {saved}, rerun to resume"
            ) from None
        elapsed += time.perf_counter() - start
    else:
        elapsed = float(state["seconds"])
    return Sb3Result(evaluate("test", run.eval.episodes), curve, run.train.steps, elapsed)
