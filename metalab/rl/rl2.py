"""RL²: fast reinforcement learning via slow reinforcement learning (Duan et al. 2016; Wang et al. 2016), as a
recurrent Q-network trained end to end on meta-episodes.

One GRU Q-network reads ``[obs, previous action, previous reward, first step of an episode]`` through a whole
meta-episode (an exploration episode, then an exploitation episode on the same hidden problem; see
:mod:`metalab.rl.meta_episodes`), its hidden state carried across the episode boundary and reset between meta-episodes.
Exploration earns no reward, so the only signal for how to explore is the exploitation return bootstrapped back
across the boundary: the chicken-and-egg problem DREAM (Liu et al., ICML 2021) removes. The Q-learning is
:func:`metalab.rl.recurrent.sequence_td_loss` (double DQN, hard target copies) on whole stored meta-episodes.

One trainer step plays one epsilon-greedy meta-episode on a training problem, stores it, and (after
``learning_starts`` meta-episodes) returns the TD loss of ``batch_size`` stored meta-episodes.

With ``trial_episodes: n`` a meta-episode is instead Duan et al.'s trial (:func:`~metalab.rl.meta_episodes.play_trial`):
``n`` episodes on one problem, every one rewarded, one history for the GRU and the TD target; the env then needs
only ``problems(split)`` and ``reset(options={"problem": p})`` (e.g. ``metalab/Navigation2DDiscrete-v0``), and
evaluation reports ``<part>/return_after{k}`` (:func:`~metalab.rl.meta_episodes.evaluate_trials`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from metalab.config import require_between
from metalab.experiment import RunConfig
from metalab.rl.buffer import ReplayBuffer
from metalab.rl.common import linear_schedule
from metalab.rl.meta_episodes import (
    MAX_TRIAL_EPISODES,
    Policy,
    Progress,
    QLearningConfig,
    Step,
    evaluate_meta,
    evaluate_trials,
    history_dim,
    make_problems,
    play_meta_episode,
    play_trial,
    recurrent_policy,
    render_meta_episode,
    steps_to_sequence,
)
from metalab.rl.recurrent import Params, RecurrentNet, Sequences, sequence_td_loss, to_tensors
from metalab.rl.rollout import derive_seed
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(QLearningConfig):
    """RL² hyperparameters (the ``rl2`` section of a config); all but ``trial_episodes`` shared with DREAM's, see
    :class:`~metalab.rl.meta_episodes.QLearningConfig`."""

    trial_episodes: int = 0
    """0: a meta-episode is an exploration episode (no reward: the env's ``explore`` option, CityGrid) and one
    scored exploitation episode. ``n >= 1``: it is a trial of ``n`` rewarded episodes on one problem (Duan et al.);
    metrics ``<part>/return_after{k}`` for ``k < n``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_between(self.trial_episodes, "trial_episodes", 0, MAX_TRIAL_EPISODES)


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """Recurrent Q-network, meta-episode replay and the trainer hooks of an RL² run (``data_root`` unused)."""
    cfg: Config = run.params
    env, eval_env, n_actions, obs_dim, horizon, train_problems = make_problems(
        run.env, "RL²", run.eval.episodes
    )
    net = RecurrentNet(history_dim(obs_dim, n_actions), n_actions, cfg.hidden).to(device)
    target: Params = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffer: ReplayBuffer[Sequences] = ReplayBuffer(cfg.buffer_size, Sequences)
    rng = np.random.default_rng(derive_seed(run.seed, 1))
    progress = Progress()
    trial = cfg.trial_episodes

    def loss(step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        eps = linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_fraction * run.train.steps, step)
        if step % cfg.collect_every == 0:
            problem = train_problems[int(rng.integers(len(train_problems)))]
            policy = recurrent_policy(net, n_actions, eps, rng, device)
            seed = derive_seed(run.seed, 0, progress.episodes)
            if trial:
                played = play_trial(env, problem, seed, policy, trial)
                episodes, episode = played.episodes, played.as_meta_episode()
            else:
                episode = play_meta_episode(env, problem, seed, policy, lambda _: policy)
                episodes = [episode.explore, episode.exploit]
            buffer.add(steps_to_sequence(episodes, n_actions, problem, len(episodes) * horizon))
            progress.record(episode)
        metrics = {"train/epsilon": eps, **progress.metrics()}
        if progress.episodes < max(cfg.learning_starts, 1):
            return None, metrics
        batch = to_tensors(buffer.sample_rows(cfg.batch_size, rng), device)
        td, q_mean = sequence_td_loss(net, dict(net.named_parameters()), target, batch, cfg.gamma, cfg.double)
        return td, {**metrics, "train/q": q_mean.item()}

    def after_update(step: int) -> None:
        if (step + 1) % cfg.target_every == 0:
            target.update({k: v.detach().clone() for k, v in net.named_parameters()})

    def agent() -> tuple[Policy, Callable[[list[Step]], Policy]]:
        policy = recurrent_policy(net, n_actions, 0.0, rng, device)
        return policy, lambda _: policy

    def greedy() -> Policy:
        return recurrent_policy(net, n_actions, 0.0, rng, device)  # a greedy policy draws nothing from rng

    def evaluate(part: str, episodes: int) -> dict[str, float]:
        if trial:
            return evaluate_trials(eval_env, part, episodes, run.eval.seed, greedy, trial)
        return evaluate_meta(eval_env, part, episodes, run.eval.seed, agent)

    def figures(run_dir: Path) -> list[Path]:
        problem = env.unwrapped.problems("test")[0]
        filmed = gym.make(run.env.id, render_mode="rgb_array")
        return [render_meta_episode(filmed, problem, run.eval.seed, *agent(), run_dir / "meta_episode.png")]

    def state() -> dict[str, Any]:
        return {
            "target": {k: v.detach().clone() for k, v in target.items()},
            "buffer": buffer.state(),
            "rng": rng.bit_generator.state,
            "progress": progress.state(),
        }

    def load_state(saved: dict[str, Any]) -> None:
        target.update({k: v.to(device) for k, v in saved["target"].items()})
        buffer.load_state(saved["buffer"])
        rng.bit_generator.state = saved["rng"]
        progress.load_state(saved["progress"])

    return Learner(net, loss, evaluate, state=state, load_state=load_state, after_update=after_update,
                   figures=None if trial else figures)  # a trial's env need not render  # fmt: skip
