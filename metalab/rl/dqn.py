"""DQN (Mnih et al., Nature 2015) with double Q-learning (van Hasselt et al., AAAI 2016) and hindsight
relabeling for goal envs (Andrychowicz et al., NeurIPS 2017).

Q is an MLP on ``[observation, desired goal]``. One trainer step takes ``train_frequency`` epsilon-greedy env
steps, stores finished episodes (plus their HER relabels) in the replay buffer, and returns the TD loss of one
sampled minibatch; before ``learning_starts`` env steps it returns no loss and the trainer skips the update.
The target network is a parameter dict moved toward the online one by Polyak averaging after updates. The
trainer's ``train.lr`` and ``train.grad_clip`` are DQN's learning rate and gradient-norm clip
(``train.meta_batch`` is unused: ``batch_size`` is the minibatch).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn
from torch.func import functional_call

from metalab.config import MAX_BATCH, require, require_between, require_widths
from metalab.envs.config import make_env
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.models import MLP
from metalab.models.mlp import mlp_forward
from metalab.rl.buffer import ReplayBuffer, Transitions
from metalab.rl.common import linear_schedule, polyak_update, td_target
from metalab.rl.her import Strategy, relabel
from metalab.rl.rollout import (
    EpisodeResult,
    Recorder,
    derive_seed,
    dims,
    input_centering,
    is_goal_env,
    run_episodes,
)
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.loop import Learner
from metalab.utils import Params

MAX_TRANSITIONS = 10_000_000
"""Largest replay buffer, in transitions."""
MAX_HER_K = 64
"""Most relabeled goals per stored transition."""


@dataclass(frozen=True)
class Config:
    """DQN hyperparameters (the ``dqn`` section of a config)."""

    gamma: float = 0.98
    """Discount factor."""
    buffer_size: int = 100_000
    """Replay buffer capacity in transitions (relabeled ones included)."""
    batch_size: int = 128
    """Transitions per TD update."""
    learning_starts: int = 1000
    """Env steps of pure collection before the first update."""
    train_frequency: int = 1
    """Env steps per trainer step; each trainer step makes one update. Env steps = ``train.steps`` times this."""
    tau: float = 1.0
    """Polyak coefficient of target updates: ``target <- (1 - tau) target + tau online`` (1.0: hard copy)."""
    target_every: int = 500
    """Update the target network after every this many trainer steps."""
    double: bool = True
    """Double DQN: the online network picks the next action, the target network values it."""
    eps_start: float = 1.0
    """Initial epsilon of epsilon-greedy exploration."""
    eps_end: float = 0.05
    """Final epsilon."""
    eps_fraction: float = 0.2
    """Fraction of all env steps over which epsilon decays linearly from ``eps_start`` to ``eps_end``."""
    loss: Literal["huber", "mse"] = "huber"
    """TD loss: Huber (smooth L1) or squared error."""
    clip_target: bool = False
    """Clip TD targets to the feasible return range ``[-1/(1-gamma), 0]`` of rewards in [-1, 0] (HER paper)."""
    her: Literal["none", "final", "future", "episode", "random"] = "none"
    """Hindsight relabeling strategy (goal envs only); ``none`` stores only the real transitions."""
    her_k: int = 4
    """Relabeled goals per stored transition."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the Q-network."""
    center_inputs: bool = False
    """Rescale each bounded input dimension from its space's ``[low, high]`` to ``[-1, 1]`` (bits to -1/+1)
    before the Q-network. Zero-mean inputs make per-bit comparisons of state and goal (an XOR) far easier to learn:
    on BitFlip n = 50 a supervised 128x128 MLP learns which bit differs in 1500 steps from -1/+1 bits and does not
    in 3000 from 0/1 bits."""
    achieved_goal_input: bool = False
    """Feed the Q-network ``[achieved goal, desired goal, observation]`` (3 blocks) instead of ``[observation,
    desired goal]``: the input Stable-Baselines3's ``MultiInputPolicy`` builds from a goal env's dict observation
    (its keys concatenated in sorted order), for a like-for-like comparison with SB3 (``benchmarks/bitflip.py``).
    metalab's policies are handed the observation and the desired goal only, so the observation stands in for
    the achieved goal: only for envs whose achieved goal is their observation (BitFlip), checked when the run is
    built; not with ``center_inputs`` (SB3 feeds raw values)."""

    def __post_init__(self) -> None:
        require(0 <= self.gamma < 1, "gamma", "must be in [0, 1)")
        require_between(self.buffer_size, "buffer_size", 1, MAX_TRANSITIONS)
        require_between(self.batch_size, "batch_size", 1, MAX_BATCH)
        require(self.learning_starts >= 0, "learning_starts", "must be >= 0")
        require(self.train_frequency >= 1, "train_frequency", "must be >= 1")
        require(0 < self.tau <= 1, "tau", "must be in (0, 1]")
        require(self.target_every >= 1, "target_every", "must be >= 1")
        for key in ("eps_start", "eps_end", "eps_fraction"):
            require(0 <= getattr(self, key) <= 1, key, "must be in [0, 1]")
        require_between(self.her_k, "her_k", 1, MAX_HER_K)
        require_widths(self.hidden, "hidden")


def feasible_return_range(gamma: float, r_min: float = -1.0, r_max: float = 0.0) -> tuple[float, float]:
    """Bounds of any discounted return of rewards in ``[r_min, r_max]``: ``r / (1 - gamma)``."""
    return r_min / (1 - gamma), r_max / (1 - gamma)


Affine = tuple[torch.Tensor, torch.Tensor]


def q_values(
    q_net: nn.Module,
    params: Params,
    obs: torch.Tensor,
    goal: torch.Tensor,
    centering: Affine | None = None,
    achieved_input: bool = False,
) -> torch.Tensor:
    """``Q(s, g, .)``, ``(B, A)``, for observations ``(B, obs_dim)`` and goals ``(B, goal_dim)``; the input is
    ``(x - shift) * scale`` when ``centering = (shift, scale)`` is given. ``achieved_input``: the input is
    ``[achieved goal, goal, observation]`` with the observation as achieved goal (:attr:`Config.achieved_goal_input`)."""
    x = torch.cat([obs, goal, obs] if achieved_input else [obs, goal], -1)
    if centering is not None:
        x = (x - centering[0]) * centering[1]
    return mlp_forward(params, x) if isinstance(q_net, MLP) else functional_call(q_net, params, (x,))


def td_loss(
    q_net: nn.Module,
    online: Params,
    target: Params,
    batch: Transitions,
    cfg: Config,
    centering: Affine | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TD loss on ``batch`` and the mean Q of its actions."""
    sb3 = cfg.achieved_goal_input
    q = (
        q_values(q_net, online, batch.obs, batch.goal, centering, sb3)
        .gather(-1, batch.action[:, None])
        .squeeze(-1)
    )
    with torch.no_grad():
        next_target = q_values(q_net, target, batch.next_obs, batch.goal, centering, sb3)  # (B, A)
        next_online = (
            q_values(q_net, online, batch.next_obs, batch.goal, centering, sb3) if cfg.double else None
        )
        clip = feasible_return_range(cfg.gamma) if cfg.clip_target else None
        y = td_target(batch.reward, batch.done, next_target, cfg.gamma, next_online, clip)
    loss = F.smooth_l1_loss(q, y) if cfg.loss == "huber" else F.mse_loss(q, y)
    return loss, q.detach().mean()


@dataclass
class Progress:
    """Mutable training state besides networks and buffer: episode count and recent episode outcomes."""

    episode: int = 0
    returns: deque = field(default_factory=lambda: deque(maxlen=100))
    successes: deque = field(default_factory=lambda: deque(maxlen=100))


def check_achieved_is_observation(run: RunConfig, cfg: Config) -> None:
    """Refuse :attr:`Config.achieved_goal_input` unless ``run``'s env is a goal env whose achieved goal is its
    observation (checked on one reset), and with ``center_inputs``."""
    probe = make_env(run.env)
    obs, _ = probe.reset(seed=0)
    same = is_goal_env(probe) and np.array_equal(obs["observation"], obs["achieved_goal"])
    probe.close()
    if not same:
        raise ConfigError(
            "dqn.achieved_goal_input",
            f"needs a goal env whose achieved goal is its observation (as BitFlip's); {run.env.id} is not",
        )
    if cfg.center_inputs:
        raise ConfigError("dqn.achieved_goal_input", "is SB3's raw input layout; leave center_inputs off")


@dataclass(frozen=True)
class DQN:
    """Everything a DQN run holds: Q-network, target parameters, replay buffer, envs, RNG and counters.

    Frozen: the pieces are fixed at :func:`build`; what changes during training is their contents (the target
    dict, buffer, RNG, recorder and the counters in :class:`Progress`)."""

    run: RunConfig
    cfg: Config
    device: torch.device
    q_net: MLP
    target: Params
    buffer: ReplayBuffer
    recorder: Recorder
    """Steps the training env through the episode in progress."""
    eval_envs: list
    rng: np.random.Generator
    """Exploration, minibatches, relabeling."""
    centering: tuple[torch.Tensor, torch.Tensor] | None
    strategy: Strategy | None
    """HER's relabeling strategy (None: no relabeling)."""
    compute_reward: Any
    compute_terminated: Any
    """The goal env's vectorised termination test (None: goals never terminate)."""
    progress: Progress = field(default_factory=Progress)

    def online(self) -> Params:
        """The Q-network's live parameters (what the optimizer steps)."""
        return dict(self.q_net.named_parameters())


def greedy(dqn: DQN, obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
    """Greedy actions ``(E,)`` for observations ``(E, obs_dim)`` and goals ``(E, goal_dim)``."""
    with torch.no_grad():
        obs_t, goal_t = torch.from_numpy(obs).to(dqn.device), torch.from_numpy(goal).to(dqn.device)
        q = q_values(dqn.q_net, dqn.online(), obs_t, goal_t, dqn.centering, dqn.cfg.achieved_goal_input)
    return q.argmax(-1).cpu().numpy()


def store(dqn: DQN, result: EpisodeResult) -> None:
    """A finished episode into the buffer (with its relabeled copies under HER); the next episode starts."""
    dqn.buffer.add(result.experience)
    if dqn.strategy is not None:
        pool = dqn.buffer.filled().next_achieved_goal if dqn.strategy is Strategy.RANDOM else None
        dqn.buffer.add(relabel(result.experience, dqn.strategy, dqn.cfg.her_k, dqn.compute_reward, dqn.rng,
                               compute_terminated=dqn.compute_terminated, pool=pool))  # fmt: skip
    progress = dqn.progress
    progress.returns.append(result.ret)
    progress.successes.append(result.success)
    progress.episode += 1
    dqn.recorder.reset(derive_seed(dqn.run.seed, 0, progress.episode))


def loss(dqn: DQN, n_actions: int, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
    """``train_frequency`` epsilon-greedy env steps, then the TD loss of one minibatch (none before
    ``learning_starts`` env steps)."""
    cfg, progress, recorder = dqn.cfg, dqn.progress, dqn.recorder
    env_steps = dqn.run.train.steps * cfg.train_frequency
    for i in range(cfg.train_frequency):
        eps = linear_schedule(
            cfg.eps_start, cfg.eps_end, cfg.eps_fraction * env_steps, step * cfg.train_frequency + i
        )
        if dqn.rng.random() < eps:
            action = dqn.rng.integers(n_actions)
        else:
            action = greedy(dqn, recorder.obs[None], recorder.goal[None], [0])[0]
        result = recorder.step(np.int64(action))
        if result is not None:
            store(dqn, result)
    metrics = {
        "train/epsilon": eps,
        "train/episodes": float(progress.episode),
        "train/buffer": float(len(dqn.buffer)),
    }
    if progress.returns:
        metrics["train/return"] = float(np.mean(progress.returns))
    if progress.successes and not np.isnan(progress.successes[-1]):  # the env reports success
        metrics["train/success"] = float(np.mean(progress.successes))
    if (step + 1) * cfg.train_frequency < cfg.learning_starts or len(dqn.buffer) < cfg.batch_size:
        return None, metrics
    batch = dqn.buffer.sample(cfg.batch_size, dqn.rng).to(dqn.device)
    td, q_mean = td_loss(dqn.q_net, dqn.online(), dqn.target, batch, cfg, dqn.centering)
    return td, {**metrics, "train/q": q_mean.item()}


def after_update(dqn: DQN, step: int) -> None:
    """Move the target toward the online network every ``target_every`` updates."""
    if (step + 1) % dqn.cfg.target_every == 0:
        dqn.target.update(polyak_update(dqn.target, dqn.online(), dqn.cfg.tau))


def evaluate(dqn: DQN, part: str, episodes: int) -> dict[str, float]:
    """Greedy return (and success, where the env reports it) over ``episodes`` episodes of ``part``'s seeds."""
    seeds = [derive_seed(dqn.run.eval.seed, PART_INDEX[part], i) for i in range(episodes)]
    results = run_episodes(dqn.eval_envs, partial(greedy, dqn), seeds)
    metrics: dict[str, float] = {}
    ret = mean_ci95([r.ret for r in results])
    metrics[f"{part}/return"], metrics[f"{part}/return_ci95"] = ret.mean, ret.ci95
    if not any(np.isnan(r.success) for r in results):
        success = mean_ci95([r.success for r in results])
        metrics[f"{part}/success"], metrics[f"{part}/success_ci95"] = success.mean, success.ci95
    return metrics


def state(dqn: DQN) -> dict[str, Any]:
    """What a checkpoint needs beyond the Q-network: target, buffer, RNG, the episode in progress, counters."""
    return {
        "target": {k: v.detach().clone() for k, v in dqn.target.items()},
        "buffer": dqn.buffer.state(),
        "rng": dqn.rng.bit_generator.state,
        "recorder": dqn.recorder.state(),
        "episode": dqn.progress.episode,
        "returns": torch.tensor(list(dqn.progress.returns), dtype=torch.float64),
        "successes": torch.tensor(list(dqn.progress.successes), dtype=torch.float64),
    }


def load_state(dqn: DQN, saved: dict[str, Any]) -> None:
    """Restore what :func:`state` saved, in place."""
    progress = dqn.progress
    dqn.target.update({k: v.to(dqn.device) for k, v in saved["target"].items()})
    dqn.buffer.load_state(saved["buffer"])
    dqn.rng.bit_generator.state = saved["rng"]
    progress.episode = int(saved["episode"])
    progress.returns.clear()
    progress.returns.extend(saved["returns"].tolist())
    progress.successes.clear()
    progress.successes.extend(saved["successes"].tolist())
    dqn.recorder.load_state(saved["recorder"])


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """Q-network, replay buffer, env and the trainer hooks of a DQN run (``data_root`` is unused)."""
    cfg: Config = run.params
    env = make_env(run.env)
    if not isinstance(env.action_space, spaces.Discrete):
        raise ConfigError("env.id", f"DQN needs discrete actions; {run.env.id} has {env.action_space}")
    if cfg.her != "none" and not (is_goal_env(env) and hasattr(env.unwrapped, "compute_reward")):
        raise ConfigError(
            "dqn.her",
            f"hindsight relabeling needs a goal env (dict observations, compute_reward); {run.env.id} is not",
        )
    obs_dim, goal_dim = dims(env)
    n_actions = int(env.action_space.n)
    if cfg.achieved_goal_input:
        check_achieved_is_observation(run, cfg)
    q_net = MLP(obs_dim + goal_dim + obs_dim * cfg.achieved_goal_input, cfg.hidden, n_actions).to(device)
    centering = (
        tuple(torch.from_numpy(a).to(device) for a in input_centering(env)) if cfg.center_inputs else None
    )
    recorder = Recorder(env)
    recorder.reset(derive_seed(run.seed, 0, 0))
    dqn = DQN(
        run, cfg, device, q_net,
        target={k: v.detach().clone() for k, v in q_net.named_parameters()},
        buffer=ReplayBuffer(cfg.buffer_size), recorder=recorder,
        eval_envs=[make_env(run.env) for _ in range(min(run.eval.batch, run.eval.episodes))],
        rng=np.random.default_rng(derive_seed(run.seed, 1)),
        centering=centering,  # type: ignore[arg-type]
        strategy=None if cfg.her == "none" else Strategy.parse(cfg.her, "dqn.her"),
        compute_reward=getattr(env.unwrapped, "compute_reward", None),
        compute_terminated=getattr(env.unwrapped, "compute_terminated", None),
    )  # fmt: skip
    return Learner(q_net, partial(loss, dqn, n_actions), partial(evaluate, dqn), state=partial(state, dqn),
                   load_state=partial(load_state, dqn), after_update=partial(after_update, dqn))  # fmt: skip
