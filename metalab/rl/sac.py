"""Soft actor-critic (Haarnoja, Zhou, Abbeel, Levine, ICML 2018; twin critics, target critics and the learned
temperature of Haarnoja et al., "Soft Actor-Critic Algorithms and Applications", arXiv 1812.05905), as pure
functions over a parameter dict.

The policy is a tanh-squashed Gaussian: ``a = tanh(u)``, ``u ~ N(mean(s), std(s))``, with actions in
``[-1, 1]^A`` (an algorithm rescales them to the env's box). Its log-density carries the change-of-variables
term ``- sum log(1 - tanh(u)^2)``. Two critics ``Q1, Q2`` regress on the soft Bellman target
``scale * r + gamma (1 - done) (min_j Qtarget_j(s', a') - alpha log pi(a' | s'))``, ``a' ~ pi(. | s')``, with
target critics that follow the online ones by Polyak averaging (:func:`polyak_update`). The actor minimises
``alpha log pi(a | s) - min_j Q_j(s, a)`` for reparameterised ``a``; ``alpha`` is fixed, or learned to hold the
policy's entropy near ``target_entropy``.

:func:`sac_losses` returns the critic, actor and temperature losses, built so that each loss reaches only its
own parameters (the actor sees detached critic parameters, the temperature loss detached
log-probabilities): one backward pass and one Adam over all parameters then equal three Adams with one learning
rate, except that the actor is differentiated through the critics as they were before this update (PEARL's code
steps the critics first). Observations handed to :func:`sac_losses` may carry gradient into an upstream
network (PEARL's context encoder); only the critic loss backpropagates into them.

SAC on its own (``algo: sac``, :func:`build`; ``configs/sac_pendulum.yaml``) trains one agent in one env with a
replay buffer, as Stable-Baselines3's SAC does with its defaults: one trainer step is one env step followed by
one gradient update on a uniformly sampled minibatch (SB3's ``train_freq=1, gradient_steps=1``); the first
``learning_starts`` env steps take uniformly random actions and make no update (``loss`` returns None); the
target critics move by Polyak averaging after every update. The env's action box is rescaled to ``[-1, 1]``
(gymnasium's ``RescaleAction``), so the replay buffer, the policy and the recorded actions all live in
``[-1, 1]``. Evaluation (``val/return``, ``test/return``) plays the deterministic policy ``tanh(mean)`` on fixed
episodes. The trainer's ``train.lr`` is the learning rate of actor, critics and temperature (one Adam; SB3 has
three Adams with one rate) and ``train.meta_batch`` is unused (``batch_size`` is the minibatch). Where this
differs from SB3's SAC: the actor is differentiated through the critics before their update (SB3: after), the
output layers start near zero (:class:`ActorCritic`; SB3: torch's default), and the critic loss is the sum of
the two mean squared errors (SB3: half of it; Adam makes the scale irrelevant). Resume is exact: everything
random comes from seeds derived from the run seed and the step (random actions, minibatches) or from torch's
global generator (policy and loss noise), which the trainer checkpoints, and the replay buffer and the episode
in progress are in the checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn

from metalab.config import MAX_BATCH, MAX_STEPS, require, require_between, require_widths
from metalab.envs.config import make_env
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.models import MLP
from metalab.models.mlp import mlp_forward
from metalab.rl.buffer import ReplayBuffer
from metalab.rl.common import polyak_update
from metalab.rl.rollout import Recorder, derive_seed, dims, run_episodes
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.loop import Learner
from metalab.utils import Params

__all__ = [
    "ActorCritic",
    "AgentConfig",
    "Batch",
    "Config",
    "LastStep",
    "Losses",
    "Transition",
    "actor_loss",
    "build",
    "critic_loss",
    "deterministic_action",
    "policy_head",
    "polyak_update",
    "q_value",
    "sac_losses",
    "soft_target",
    "sub_params",
    "tanh_gaussian_log_prob",
    "tanh_gaussian_sample",
    "temperature_loss",
    "unit_box_env",
]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the policy's log std is clamped to this range (rlkit, SB3)
MAX_TRANSITIONS = 10_000_000
"""Largest replay buffer of ``algo: sac``, in transitions."""
RECENT_EPISODES = 10
"""``train/return`` averages the returns of this many most recent training episodes."""
_RANDOM, _MINIBATCH = 2, 3  # keys of the seeds derived from the run seed (0: episode resets)


@dataclass(frozen=True)
class AgentConfig:
    """SAC's networks and losses: what an algorithm built on SAC nests as its ``sac`` section (PEARL); defaults
    as in SAC v2 (Haarnoja et al. 2018b, its Table 1), which are also Stable-Baselines3's."""

    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak coefficient of the target critics, applied after every update."""
    reward_scale: float = 1.0
    """Rewards are multiplied by this in the Bellman target; with a fixed ``alpha`` it sets the weight of the
    entropy bonus relative to the return (PEARL's setting: ``alpha = 1`` and a scale per environment)."""
    alpha: float = 1.0
    """Entropy temperature (the initial value when ``auto_alpha``)."""
    auto_alpha: bool = True
    """Learn ``log alpha`` so that the policy's entropy stays near ``target_entropy`` (SAC v2); false: keep
    ``alpha`` fixed (SAC v1, PEARL)."""
    target_entropy: float | None = None
    """Entropy the learned temperature aims at; null: minus the action dimension (the SAC v2 default)."""
    policy_reg: float = 0.0
    """Weight of ``mean^2 + log_std^2`` (averaged) in the actor loss, keeping the pre-squash Gaussian near the
    origin (PEARL's code uses 1e-3 for each)."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy and of each critic."""

    def __post_init__(self) -> None:
        require(0 <= self.gamma < 1, "gamma", "must be in [0, 1)")
        require(0 < self.tau <= 1, "tau", "must be in (0, 1]")
        require(self.reward_scale > 0, "reward_scale", "must be > 0")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(self.policy_reg >= 0, "policy_reg", "must be >= 0")
        require_widths(self.hidden, "hidden")


@dataclass(frozen=True)
class Config(AgentConfig):
    """The ``sac`` section of ``algo: sac``: the agent's settings (:class:`AgentConfig`) and the run's; defaults
    are Stable-Baselines3's SAC defaults."""

    buffer_size: int = 1_000_000
    """Replay buffer capacity in transitions (the oldest are overwritten beyond it)."""
    batch_size: int = 256
    """Transitions per update, drawn uniformly with replacement."""
    learning_starts: int = 100
    """Env steps of uniformly random actions, without updates, before the first update (SB3's meaning: the
    update after env step ``learning_starts + 1`` is the first)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_between(self.buffer_size, "buffer_size", 1, MAX_TRANSITIONS)
        require_between(self.batch_size, "batch_size", 1, MAX_BATCH)
        require_between(self.learning_starts, "learning_starts", 0, MAX_STEPS)


class ActorCritic(nn.Module):
    """Policy MLP (mean and log std of ``A`` actions), critics ``q1``, ``q2`` on ``[obs, action]``, ``log_alpha``.

    The output layers start near zero (uniform in +-3e-3, as in rlkit) so initial actions are near the box
    centre and initial Q values near zero.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], alpha: float = 1.0):
        super().__init__()
        self.act_dim = act_dim
        self.policy = MLP(obs_dim, hidden, 2 * act_dim)
        self.q1 = MLP(obs_dim + act_dim, hidden, 1)
        self.q2 = MLP(obs_dim + act_dim, hidden, 1)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        for net in (self.policy, self.q1, self.q2):
            nn.init.uniform_(net.head.weight, -3e-3, 3e-3)
            nn.init.uniform_(net.head.bias, -3e-3, 3e-3)

    def critic_params(self) -> Params:
        """The parameters a target network copies: those of ``q1`` and ``q2``."""
        return {k: v for k, v in self.named_parameters() if k.startswith(("q1.", "q2."))}


class Losses(NamedTuple):
    """SAC's three losses; each reaches only its own parameters, so their sum is what one optimizer minimises."""

    critic: torch.Tensor
    actor: torch.Tensor
    temperature: torch.Tensor
    """Zero (a constant) unless the temperature is learned."""

    def total(self) -> torch.Tensor:
        return self.critic + self.actor + self.temperature


class Batch(NamedTuple):
    """Transitions for one SAC update (``B`` rows)."""

    obs: torch.Tensor  # (B, obs_dim) what policy and critics see; may carry gradient into an upstream network
    action: torch.Tensor  # (B, A) in [-1, 1]
    reward: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, obs_dim)
    done: torch.Tensor  # (B,) 1.0 where next_obs is terminal (no bootstrapping)


def sub_params(params: Params, prefix: str) -> Params:
    """The entries of ``params`` under ``prefix.``, keys without it, in order (what :func:`mlp_forward` needs)."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def policy_head(params: Params, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and clamped log std of the pre-squash Gaussian, each ``(B, A)``, for observations ``(B, obs_dim)``."""
    mean, log_std = mlp_forward(sub_params(params, "policy"), obs).chunk(2, -1)
    return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def q_value(params: Params, which: str, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """``Q_which(s, a)``, ``(B,)``, for ``which`` in ``q1``, ``q2`` (or a target dict with the same keys)."""
    return mlp_forward(sub_params(params, which), torch.cat([obs, action], -1)).squeeze(-1)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, pre_tanh: torch.Tensor) -> torch.Tensor:
    """``log pi(tanh(u))``, ``(B,)``: the Gaussian log-density of ``u`` minus ``sum log(1 - tanh(u)^2)``.

    ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))`` is the same quantity without the ``log(0)`` that
    ``tanh(u)`` rounding to +-1 gives for large ``|u|``.
    """
    gaussian = -0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))  # log |d tanh(u) / du|
    return (gaussian - log_det).sum(-1)


def tanh_gaussian_sample(
    mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised action ``tanh(mean + std * noise)`` and its log-probability, ``(B, A)`` and ``(B,)``.

    ``noise`` is standard normal ``(B, A)``; gradients flow to ``mean`` and ``log_std`` through it.
    """
    pre_tanh = mean + log_std.exp() * noise
    return torch.tanh(pre_tanh), tanh_gaussian_log_prob(mean, log_std, pre_tanh)


def soft_target(
    reward: torch.Tensor,
    done: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    next_log_prob: torch.Tensor,
    *,
    gamma: float,
    alpha: float | torch.Tensor,
    reward_scale: float = 1.0,
) -> torch.Tensor:
    """``scale * r + gamma (1 - done) (min(Q1', Q2') - alpha log pi(a' | s'))``, ``(B,)`` (clipped double Q)."""
    soft_value = torch.minimum(next_q1, next_q2) - alpha * next_log_prob
    return reward_scale * reward + gamma * (1.0 - done) * soft_value


def critic_loss(q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of both critics' mean squared errors against the (constant) target."""
    return F.mse_loss(q1, target) + F.mse_loss(q2, target)


def actor_loss(
    log_prob: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """``mean(alpha log pi(a | s) - min(Q1, Q2)(s, a))`` over reparameterised actions ``a``."""
    return (alpha * log_prob - torch.minimum(q1, q2)).mean()


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """``-log_alpha * mean(log pi + target_entropy)``: raises alpha while the entropy is below the target."""
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


def sac_losses(
    params: Params, target: Params, batch: Batch, cfg: AgentConfig, act_dim: int
) -> tuple[Losses, dict[str, float]]:
    """Critic, actor and temperature losses of ``batch``; each reaches only its own parameters.

    ``params`` are :class:`ActorCritic`'s named parameters, ``target`` its target critics
    (:meth:`ActorCritic.critic_params` keys). Action noise comes from torch's global generator.
    """
    log_alpha = params["log_alpha"]
    alpha = log_alpha.detach().exp()
    obs, next_obs = batch.obs.detach(), batch.next_obs.detach()  # for actor and targets: no encoder gradient

    with torch.no_grad():
        mean, log_std = policy_head(params, next_obs)
        next_action, next_log_prob = tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))
        y = soft_target(batch.reward, batch.done, q_value(target, "q1", next_obs, next_action),
                        q_value(target, "q2", next_obs, next_action), next_log_prob, gamma=cfg.gamma,
                        alpha=alpha, reward_scale=cfg.reward_scale)  # fmt: skip
    q1, q2 = q_value(params, "q1", batch.obs, batch.action), q_value(params, "q2", batch.obs, batch.action)
    critic = critic_loss(q1, q2, y)

    mean, log_std = policy_head(params, obs)
    action, log_prob = tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))
    frozen = {k: v.detach() for k, v in params.items() if k.startswith(("q1.", "q2."))}  # dQ/da only
    actor = actor_loss(
        log_prob, q_value(frozen, "q1", obs, action), q_value(frozen, "q2", obs, action), alpha
    )
    if cfg.policy_reg > 0:
        actor = actor + cfg.policy_reg * ((mean**2).mean() + (log_std**2).mean())
    temperature = torch.zeros((), device=critic.device)
    metrics = {
        "loss/critic": critic.item(),
        "loss/actor": actor.item(),
        "train/q": q1.detach().mean().item(),
        "train/entropy": -log_prob.detach().mean().item(),
        "train/alpha": alpha.item(),
    }
    if cfg.auto_alpha:
        target_entropy = -float(act_dim) if cfg.target_entropy is None else cfg.target_entropy
        temperature = temperature_loss(log_alpha, log_prob, target_entropy)
        metrics["loss/alpha"] = temperature.item()
    return Losses(critic, actor, temperature), metrics


# ---------------------------------------------------------------------------------------------------------------
# SAC on its own: ``algo: sac``.


class Transition(NamedTuple):
    """Replay rows of ``algo: sac`` (NumPy, ``T`` rows; the fields of :class:`Batch`)."""

    obs: np.ndarray  # (T, obs_dim) float32
    action: np.ndarray  # (T, A) float32 in [-1, 1]
    reward: np.ndarray  # (T,) float32
    next_obs: np.ndarray  # (T, obs_dim) the true next observation, also at a time limit
    done: np.ndarray  # (T,) float32 1.0 where next_obs is terminal; a time limit is not


class LastStep(gym.Wrapper):
    """Keeps the reward and ``terminated`` flag of the latest step: :class:`~metalab.rl.rollout.Recorder`
    reports them per finished episode, SAC stores each transition as it happens."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.reward, self.terminated = 0.0, False

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.reward, self.terminated = float(reward), bool(terminated)
        return obs, reward, terminated, truncated, info


def deterministic_action(params: Params, obs: torch.Tensor) -> torch.Tensor:
    """The policy's deterministic action ``tanh(mean(s))``, ``(B, A)`` in ``[-1, 1]``, for ``(B, obs_dim)``."""
    return torch.tanh(policy_head(params, obs)[0])


def unit_box_env(run: RunConfig) -> gym.Env:
    """``run``'s env with its action box rescaled to ``[-1, 1]``; refuses what SAC cannot act in."""
    env = make_env(run.env)
    space = env.action_space
    if not isinstance(space, spaces.Box):
        raise ConfigError("env.id", f"SAC needs continuous (Box) actions; {run.env.id} has {space}")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ConfigError("env.id", f"SAC squashes actions into a bounded box; {run.env.id}'s is {space}")
    if dims(env)[1]:
        raise ConfigError("env.id", f"SAC does not take goal envs (dict observations); {run.env.id} is one")
    return gym.wrappers.RescaleAction(env, np.float32(-1.0), np.float32(1.0))


@dataclass
class Progress:
    """Mutable training state besides networks and buffer: episode count and recent episode returns."""

    episode: int = 0
    returns: deque = field(default_factory=lambda: deque(maxlen=RECENT_EPISODES))


@dataclass(frozen=True)
class SAC:
    """Everything a SAC run holds: actor-critic, target critics, replay buffer, envs and counters.

    Frozen: the pieces are fixed at :func:`build`; what changes during training is their contents (the target
    dict, buffer, recorder and the counters in :class:`Progress`)."""

    run: RunConfig
    cfg: Config
    device: torch.device
    model: ActorCritic
    target: Params
    buffer: ReplayBuffer
    env: LastStep
    """The training env (its last step's reward and termination are what the buffer stores)."""
    recorder: Recorder
    eval_envs: list[gym.Env]
    act_dim: int
    progress: Progress = field(default_factory=Progress)

    def params(self) -> Params:
        """The actor-critic's live parameters (what the optimizer steps)."""
        return dict(self.model.named_parameters())


def explore(sac: SAC, step: int) -> np.ndarray:
    """The action of env step ``step``, ``(A,)``: uniform before ``learning_starts``, then a policy sample."""
    if step < sac.cfg.learning_starts:
        rng = np.random.default_rng(derive_seed(sac.run.seed, _RANDOM, step))
        return rng.uniform(-1.0, 1.0, sac.act_dim).astype(np.float32)
    with torch.no_grad():
        obs = torch.from_numpy(sac.recorder.obs).to(sac.device)[None]
        mean, log_std = policy_head(sac.params(), obs)  # (1, A)
        action, _ = tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))
    return action[0].cpu().numpy()


def env_step(sac: SAC, step: int) -> None:
    """One env step into the buffer; a finished episode is counted and the next one starts."""
    recorder, progress = sac.recorder, sac.progress
    obs, action = recorder.obs, explore(sac, step)
    result = recorder.step(action)
    done = np.float32(sac.env.terminated)
    sac.buffer.add(
        Transition(obs[None], action[None], np.float32([sac.env.reward]), recorder.obs[None], done[None])
    )
    if result is not None:
        progress.returns.append(result.ret)
        progress.episode += 1
        recorder.reset(derive_seed(sac.run.seed, 0, progress.episode))


def loss(sac: SAC, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
    """One env step, then (after ``learning_starts``) SAC's losses on one minibatch."""
    env_step(sac, step)
    metrics = {"train/env_steps": float(step + 1), "train/episodes": float(sac.progress.episode)}
    if sac.progress.returns:
        metrics["train/return"] = float(np.mean(sac.progress.returns))
    if step < sac.cfg.learning_starts:
        return None, metrics
    rng = np.random.default_rng(derive_seed(sac.run.seed, _MINIBATCH, step))
    rows = sac.buffer.sample_rows(sac.cfg.batch_size, rng)
    batch = Batch(*(torch.from_numpy(column).to(sac.device) for column in rows))
    losses, loss_metrics = sac_losses(sac.params(), sac.target, batch, sac.cfg, sac.act_dim)
    return losses.total(), metrics | loss_metrics


def after_update(sac: SAC, step: int) -> None:
    """Polyak-average the target critics toward the critics."""
    sac.target.update(polyak_update(sac.target, sac.model.critic_params(), sac.cfg.tau))


def greedy(sac: SAC, obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
    """The deterministic actions ``(E, A)`` for observations ``(E, obs_dim)``."""
    with torch.no_grad():
        return deterministic_action(sac.params(), torch.from_numpy(obs).to(sac.device)).cpu().numpy()


def evaluate(sac: SAC, part: str, episodes: int) -> dict[str, float]:
    """Mean return (95% CI) of the deterministic policy over ``episodes`` episodes of ``part``'s seeds."""
    seeds = [derive_seed(sac.run.eval.seed, PART_INDEX[part], i) for i in range(episodes)]
    ret = mean_ci95([r.ret for r in run_episodes(sac.eval_envs, partial(greedy, sac), seeds)])
    return {f"{part}/return": ret.mean, f"{part}/return_ci95": ret.ci95}


def state(sac: SAC) -> dict[str, Any]:
    """What a checkpoint needs beyond the networks: targets, buffer, the episode in progress, counters."""
    return {
        "target": {k: v.detach().clone() for k, v in sac.target.items()},
        "buffer": sac.buffer.state(),
        "recorder": sac.recorder.state(),
        "episode": sac.progress.episode,
        "returns": torch.tensor(list(sac.progress.returns), dtype=torch.float64),
    }


def load_state(sac: SAC, saved: dict[str, Any]) -> None:
    """Restore what :func:`state` saved, in place."""
    sac.target.update({k: v.to(sac.device) for k, v in saved["target"].items()})
    sac.buffer.load_state(saved["buffer"])
    sac.progress.episode = int(saved["episode"])
    sac.progress.returns.clear()
    sac.progress.returns.extend(saved["returns"].tolist())
    sac.recorder.load_state(saved["recorder"])


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """Actor-critic, target critics, replay buffer, env and the trainer hooks of a SAC run (``data_root`` is
    unused)."""
    cfg: Config = run.params
    env = LastStep(unit_box_env(run))
    obs_dim, _ = dims(env)
    act_dim = int(np.prod(env.action_space.shape))
    model = ActorCritic(obs_dim, act_dim, cfg.hidden, cfg.alpha).to(device)
    model.log_alpha.requires_grad_(cfg.auto_alpha)
    recorder = Recorder(env)
    recorder.reset(derive_seed(run.seed, 0, 0))
    sac = SAC(
        run, cfg, device, model,
        target={k: v.detach().clone() for k, v in model.critic_params().items()},
        buffer=ReplayBuffer(cfg.buffer_size, Transition), env=env, recorder=recorder,
        eval_envs=[unit_box_env(run) for _ in range(min(run.eval.batch, run.eval.episodes))], act_dim=act_dim,
    )  # fmt: skip
    return Learner(model, partial(loss, sac), partial(evaluate, sac), state=partial(state, sac),
                   load_state=partial(load_state, sac), after_update=partial(after_update, sac))  # fmt: skip
