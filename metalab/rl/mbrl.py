"""Model-based RL with model-predictive control: learn the dynamics, plan through them, act, repeat.

The loop of Nagabandi, Kahn, Fearing, Levine, "Neural Network Dynamics for Model-Based Deep Reinforcement
Learning with Model-Free Fine-Tuning" (ICRA 2018):

1. collect ``random_steps`` env steps with uniformly random actions;
2. fit the dynamics model to all transitions so far (``fit_updates`` minibatch updates);
3. act by MPC for ``refit_every`` env steps: at every step plan an action sequence through the model from the
   current state, execute its first action only, and store the transition;
4. go to 2.

The defaults are PETS (Chua, Calandra, McAllister, Levine, "Deep Reinforcement Learning in a Handful of Trials
using Probabilistic Dynamics Models", NeurIPS 2018): a probabilistic ensemble (:mod:`metalab.rl.dynamics`),
trajectory sampling with a fixed member per particle (``tsinf``) and CEM (:mod:`metalab.rl.planners`), the
plan warm-started from the previous step's, shifted. Nagabandi et al.'s own agent is ``members: 1,
probabilistic: false, particles: 1, planner: {method: random}``; ``planner.method`` also takes MPPI (Williams
et al. 2017) and gradient-based planning.

Planning needs the reward as a function of ``(obs, action, next_obs)``, and the termination where the env
has one (:mod:`metalab.rl.env_models`, one per env id: Pendulum-v1, metalab's cart-pole swing-up
``metalab/CartPoleSwingUp-v0`` and the MuJoCo InvertedPendulum-v5, HalfCheetah-v5 and Reacher-v5); the model
learns the dynamics only.

Trainer steps: one trainer step is either one env step (random in phase 1, MPC in phase 3; ``loss`` returns
None, no update) or one minibatch update of the model in phase 2 (``loss`` returns the model's loss, which the
trainer minimises with Adam at ``train.lr``, ``train.weight_decay``, ``train.grad_clip``). After the random
phase the steps go in cycles of ``fit_updates`` updates then ``refit_every`` env steps (:func:`phase`), so
``train.steps = random_steps + k * (fit_updates + refit_every)`` ends after ``k`` cycles
(``random_steps + k * refit_every`` env steps). ``train.meta_batch`` is unused. Everything random is drawn
from seeds derived from the run seed and the step (episode resets, random actions, bootstrap resamples,
minibatches, planning noise), so a resume is exact with the replay buffer, the env's episode and the planner's
warm start in the checkpoint. The normaliser is refitted to all data at the first update of every fit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from metalab.config import MAX_BATCH, MAX_STEPS, require, require_between, require_widths
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.rl.buffer import ReplayBuffer
from metalab.rl.dynamics import (
    Data,
    Ensemble,
    bootstrap_indices,
    fit_normalizer,
    minibatch,
    model_loss,
    trajectory_sampling,
)
from metalab.rl.env_models import EnvModel, env_model
from metalab.rl.planners import Bounds, PlannerConfig, initial_mean, plan
from metalab.rl.rollout import EpisodeResult, Recorder, derive_seed, dims
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.loop import Learner

MAX_MEMBERS = 100
"""Most members of a dynamics ensemble."""
MAX_TRANSITIONS = 10_000_000
"""Largest replay buffer, in transitions."""
MAX_PLAN_ROWS = 1 << 22
"""Most particles one planning iteration may roll out per start state (``candidates * particles``)."""
RECENT_EPISODES = 10
"""``train/return`` averages the returns of this many most recent training episodes."""
_RANDOM, _BOOTSTRAP, _MINIBATCH, _PLAN = 4, 2, 3, 5  # keys of the seeds derived from the run seed


@dataclass(frozen=True)
class Config:
    """Model-based RL hyperparameters (the ``mbrl`` section of a config); defaults are PETS's."""

    members: int = 5
    """Dynamics models in the ensemble (PETS: 5)."""
    hidden: tuple[int, ...] = (200, 200, 200)
    """Hidden layer widths of each member (SiLU activations)."""
    probabilistic: bool = True
    """Members predict a Gaussian over the state change (trained on its NLL) rather than its mean (squared
    error)."""
    propagation: Literal["ts1", "tsinf"] = "tsinf"
    """Trajectory sampling: each particle keeps one member for the whole plan (``tsinf``) or draws a member at
    every step (``ts1``)."""
    particles: int = 20
    """Sampled trajectories per candidate sequence (PETS: 20); a multiple of ``members``."""
    bound_reg: float = 0.01
    """Weight of the penalty ``sum max_logvar - sum min_logvar`` that keeps the learned log-variance bounds
    tight (PETS: 0.01), relative to the per-member mean NLL."""
    batch_size: int = 32
    """Transitions per member in one model update (PETS: 32), drawn from that member's bootstrap resample."""
    buffer_size: int = 100_000
    """Transitions kept for fitting (the oldest are dropped beyond it)."""
    random_steps: int = 200
    """Env steps with uniformly random actions before the first fit (one Pendulum episode)."""
    refit_every: int = 200
    """Env steps of MPC between two fits of the model."""
    fit_updates: int = 1000
    """Minibatch updates of each fit (the model keeps its weights from one fit to the next). Each fit draws a new
    bootstrap resample of all data per member. On 600 random Pendulum transitions, 300 updates leave a one-step
    error of 6-14% of the no-change baseline's in cos and sin, 1,000 updates 0.3-0.7%."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """How actions are planned (:class:`metalab.rl.planners.PlannerConfig`)."""

    def __post_init__(self) -> None:
        require_between(self.members, "members", 1, MAX_MEMBERS)
        require_widths(self.hidden, "hidden")
        require_between(self.particles, "particles", 1, MAX_BATCH)
        require(
            self.particles % self.members == 0,
            "particles",
            f"must be a multiple of members ({self.members}) so that every member moves as many particles, "
            f"got {self.particles}",
        )
        require(self.bound_reg >= 0, "bound_reg", "must be >= 0")
        require_between(self.batch_size, "batch_size", 1, MAX_BATCH)
        require_between(self.buffer_size, "buffer_size", 1, MAX_TRANSITIONS)
        for key in ("random_steps", "refit_every", "fit_updates"):
            require_between(getattr(self, key), key, 1, MAX_STEPS)
        rows = self.planner.candidates * self.particles
        require(
            rows <= MAX_PLAN_ROWS,
            "particles",
            f"planner.candidates x particles = {rows} trajectories per state, over the limit of {MAX_PLAN_ROWS}",
        )


class Transition(NamedTuple):
    """Replay rows for fitting dynamics (NumPy, ``T`` rows)."""

    obs: np.ndarray  # (T, obs_dim) float32
    action: np.ndarray  # (T, act_dim) float32
    next_obs: np.ndarray  # (T, obs_dim) the true next observation, also at a time limit


class Phase(NamedTuple):
    """What one trainer step does (:func:`phase`)."""

    kind: Literal["random", "fit", "act"]
    env_step: int
    """Env steps taken before this trainer step."""
    fit: int
    """``fit``: which fit of the model this update belongs to (0: the first); otherwise the fits done so far."""
    update: int
    """``fit``: the update's index within its fit; 0 otherwise."""


def phase(step: int, cfg: Config) -> Phase:
    """Trainer step ``step``'s part in the loop: ``random_steps`` random env steps, then cycles of
    ``fit_updates`` model updates followed by ``refit_every`` MPC env steps."""
    if step < cfg.random_steps:
        return Phase("random", step, 0, 0)
    cycle, offset = divmod(step - cfg.random_steps, cfg.fit_updates + cfg.refit_every)
    env_step = cfg.random_steps + cycle * cfg.refit_every
    if offset < cfg.fit_updates:
        return Phase("fit", env_step, cycle, offset)
    return Phase("act", env_step + offset - cfg.fit_updates, cycle + 1, 0)


def loop_step(
    step: int,
    cfg: Config,
    fit_loss: Callable[[Phase, int], tuple[Tensor, dict[str, float]]],
    env_step: Callable[[Phase], None],
    episodes: Callable[[], int],
) -> tuple[Tensor | None, dict[str, float]]:
    """Trainer step ``step`` of the loop (:func:`phase`): a model update, ``fit_loss(phase, step)`` (its loss and
    metrics), or an env step, ``env_step(phase)`` (no loss); with the loop's counters ``train/env_steps``,
    ``train/episodes`` (``episodes()`` after the step) and ``train/fits``."""
    now = phase(step, cfg)
    total, metrics = None, {}
    if now.kind == "fit":
        total, metrics = fit_loss(now, step)
    else:
        env_step(now)
    metrics |= {
        "train/env_steps": float(now.env_step + (now.kind != "fit")),
        "train/episodes": float(episodes()),
        "train/fits": float(now.fit),
    }
    return total, metrics


ActFn = Callable[[np.ndarray, torch.Tensor, torch.Generator], tuple[np.ndarray, torch.Tensor]]
"""``(obs (S, D), warm start (S, H, A), generator) -> (actions (S, A), next warm start (S, H, A))``."""


def mpc_episodes(
    envs: Sequence[gym.Env], act: ActFn, seeds: Sequence[int], start: torch.Tensor, generator: torch.Generator
) -> list[EpisodeResult]:
    """One MPC episode per seed, ``len(envs)`` at a time in lockstep, each episode keeping its own warm start
    (``start`` ``(1, H, A)`` at its first step)."""
    results: list[EpisodeResult] = []
    recorders = [Recorder(env) for env in envs]
    for first in range(0, len(seeds), len(envs)):
        chunk = seeds[first : first + len(envs)]
        running = recorders[: len(chunk)]
        for recorder, seed in zip(running, chunk, strict=True):
            recorder.reset(seed)
        means = start.expand(len(chunk), -1, -1).clone()  # (E, H, A)
        done: dict[int, EpisodeResult] = {}
        while len(done) < len(chunk):
            live = [i for i in range(len(chunk)) if i not in done]
            actions, means[live] = act(np.stack([running[i].obs for i in live]), means[live], generator)
            for i, action in zip(live, actions, strict=True):
                result = running[i].step(action)
                if result is not None:
                    done[i] = result
        results += [done[i] for i in range(len(chunk))]
    return results


@dataclass
class _Progress:
    """Mutable training state besides the model and the buffer."""

    mean: torch.Tensor  # (1, H, A) the planner's warm start for the next env step
    episode: int = 0
    returns: deque = field(default_factory=lambda: deque(maxlen=RECENT_EPISODES))


@dataclass
class _Fit:
    """The fit in progress: its number and its data and bootstrap resamples (fixed for the whole fit)."""

    fit: int = -1
    data: Data | None = None
    boot: np.ndarray | None = None


@dataclass
class MBRL:
    """Everything a model-based run holds: the ensemble, replay buffer, envs, planner bounds and counters."""

    run: RunConfig
    cfg: Config
    device: torch.device
    env_model: EnvModel
    """The env's reward and termination, which planning scores sequences with."""
    bounds: Bounds
    model: Ensemble
    buffer: ReplayBuffer
    recorder: Recorder
    """Steps the training env through the episode in progress."""
    eval_envs: list[gym.Env]
    progress: _Progress
    fitting: _Fit = field(default_factory=_Fit)


def mpc_act(mb: MBRL, obs: np.ndarray, mean: Tensor, generator: torch.Generator) -> tuple[np.ndarray, Tensor]:
    """MPC's actions ``(S, A)`` in states ``obs`` ``(S, D)`` from warm starts ``mean``, and the next ones."""
    cfg = mb.cfg
    params = {k: v.detach() for k, v in mb.model.params().items()}
    norm = mb.model.normalizer()

    def rollout(state: Tensor, actions: Tensor, g: torch.Generator | None) -> Tensor:
        return trajectory_sampling(
            params, norm, state, actions, cfg.particles, cfg.propagation, generator=g
        ).states

    with torch.no_grad():
        state = torch.from_numpy(obs).to(mb.device)  # (S, D)
        chosen = plan(rollout, mb.env_model.reward, state, mb.bounds, cfg.planner, mean, generator=generator,
                      done=mb.env_model.done)  # fmt: skip
    return chosen.actions[:, 0].cpu().numpy(), chosen.mean


def env_step(mb: MBRL, now: Phase) -> None:
    """One env step of a training episode (uniformly random, or MPC) into the buffer."""
    progress, recorder, seed = mb.progress, mb.recorder, mb.run.seed
    if now.kind == "random":
        low, high = mb.bounds.low.cpu().numpy(), mb.bounds.high.cpu().numpy()
        action = np.random.default_rng(derive_seed(seed, _RANDOM, now.env_step)).uniform(low, high)
        action = action.astype(np.float32)
    else:
        generator = torch.Generator(mb.device).manual_seed(derive_seed(seed, _PLAN, now.env_step))
        actions, progress.mean = mpc_act(mb, recorder.obs[None], progress.mean, generator)
        action = actions[0]
    obs = recorder.obs
    result = recorder.step(action)
    mb.buffer.add(Transition(obs[None], action[None], recorder.obs[None]))  # recorder.obs: the next obs
    if result is not None:
        progress.returns.append(result.ret)
        progress.episode += 1
        recorder.reset(derive_seed(seed, 0, progress.episode))
        progress.mean = initial_mean(mb.bounds, 1, mb.cfg.planner.horizon)


def fit_loss(mb: MBRL, now: Phase, step: int) -> tuple[Tensor, dict[str, float]]:
    """One minibatch update of the ensemble (each member on its bootstrap resample of the fit's data)."""
    fitting = mb.fitting
    if fitting.fit != now.fit:  # the fit's data and resamples are fixed: derive them once
        fitting.data = Data(*(torch.from_numpy(c).to(mb.device) for c in mb.buffer.filled()))
        rng = np.random.default_rng(derive_seed(mb.run.seed, _BOOTSTRAP, now.fit))
        fitting.boot = bootstrap_indices(len(mb.buffer), mb.cfg.members, rng)
        fitting.fit = now.fit
    assert fitting.data is not None and fitting.boot is not None
    if now.update == 0:
        mb.model.set_normalizer(fit_normalizer(fitting.data))
    rng = np.random.default_rng(derive_seed(mb.run.seed, _MINIBATCH, step))
    batch = minibatch(fitting.data, fitting.boot, mb.cfg.batch_size, rng)
    return model_loss(mb.model.params(), mb.model.normalizer(), batch, mb.cfg.bound_reg)


def loss(mb: MBRL, step: int) -> tuple[Tensor | None, dict[str, float]]:
    """One trainer step of the loop (:func:`loop_step`), with the recent training episodes' mean return."""
    total, metrics = loop_step(
        step, mb.cfg, lambda now, s: fit_loss(mb, now, s), lambda now: env_step(mb, now),
        lambda: mb.progress.episode,
    )  # fmt: skip
    if mb.progress.returns:
        metrics["train/return"] = float(np.mean(mb.progress.returns))
    return total, metrics


def evaluate(mb: MBRL, part: str, episodes: int) -> dict[str, float]:
    """Mean return (95% CI) of ``episodes`` MPC episodes from ``part``'s reset seeds."""
    seeds = [derive_seed(mb.run.eval.seed, PART_INDEX[part], i) for i in range(episodes)]
    plan_seed = derive_seed(mb.run.eval.seed, PART_INDEX[part], _PLAN, 0)
    generator = torch.Generator(mb.device).manual_seed(plan_seed)
    start = initial_mean(mb.bounds, 1, mb.cfg.planner.horizon)
    act = partial(mpc_act, mb)
    ret = mean_ci95([r.ret for r in mpc_episodes(mb.eval_envs, act, seeds, start, generator)])
    return {f"{part}/return": ret.mean, f"{part}/return_ci95": ret.ci95}


def state(mb: MBRL) -> dict[str, Any]:
    """What a checkpoint needs beyond the ensemble: buffer, the episode in progress, counters, warm start."""
    return {
        "buffer": mb.buffer.state(),
        "recorder": mb.recorder.state(),
        "episode": mb.progress.episode,
        "returns": torch.tensor(list(mb.progress.returns), dtype=torch.float64),
        "mean": mb.progress.mean.detach().cpu().clone(),
    }


def load_state(mb: MBRL, saved: dict[str, Any]) -> None:
    progress = mb.progress
    mb.buffer.load_state(saved["buffer"])
    progress.episode = int(saved["episode"])
    progress.returns.clear()
    progress.returns.extend(saved["returns"].tolist())
    progress.mean = saved["mean"].to(mb.device)
    mb.recorder.load_state(saved["recorder"])
    mb.fitting.fit = -1


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """Dynamics ensemble, replay buffer, env and the trainer hooks of a model-based run (``data_root`` is
    unused)."""
    cfg: Config = run.params
    known = env_model(run.env.id)  # ConfigError naming env.id if there is no reward function for it
    env = known.make(run.env)
    space = env.action_space
    if not isinstance(space, spaces.Box):
        raise ConfigError("env.id", f"mbrl needs continuous (Box) actions; {run.env.id} has {space}")
    obs_dim, goal_dim = dims(env)
    if goal_dim:
        raise ConfigError("env.id", f"mbrl does not take goal envs (dict observations); {run.env.id} is one")
    act_dim = int(np.prod(space.shape))
    low, high = space.low.reshape(-1).astype(np.float32), space.high.reshape(-1).astype(np.float32)
    bounds = Bounds(torch.from_numpy(low).to(device), torch.from_numpy(high).to(device))
    model = Ensemble(obs_dim, act_dim, cfg.hidden, cfg.members, cfg.probabilistic).to(device)
    recorder = Recorder(env)
    recorder.reset(derive_seed(run.seed, 0, 0))
    mb = MBRL(
        run, cfg, device, known, bounds, model, ReplayBuffer(cfg.buffer_size, Transition), recorder,
        eval_envs=[known.make(run.env) for _ in range(min(run.eval.batch, run.eval.episodes))],
        progress=_Progress(initial_mean(bounds, 1, cfg.planner.horizon)),
    )  # fmt: skip
    return Learner(model, partial(loss, mb), partial(evaluate, mb), state=partial(state, mb),
                   load_state=partial(load_state, mb))  # fmt: skip
