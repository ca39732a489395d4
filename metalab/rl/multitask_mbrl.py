"""Multi-task model-based RL: one dynamics model for a family of tasks that share their dynamics and differ by
their reward, planned against a known reward or a learned, task-conditioned one.

The tasks of a goal family (:mod:`metalab.envs.point_mass`: the same point mass, a goal per task) have one
transition function, so one dynamics model fitted on the data of every task serves them all; only the reward
changes. The loop is :mod:`metalab.rl.mbrl`'s (Nagabandi et al., ICRA 2018; PETS, Chua et al., NeurIPS 2018),
with the training tasks taking turns:

1. ``mbrl.random_steps`` env steps with uniformly random actions (each held for ``random_hold`` steps),
   episode ``k`` on training task ``k mod T``;
2. fit the dynamics ensemble to all transitions so far, and the reward model below to their logged rewards
   (``mbrl.fit_updates`` minibatch updates of both);
3. act by MPC for ``mbrl.refit_every`` env steps, each episode planned against its training task's known
   reward or, every ``learned_every``-th episode, against the learned reward with the task's own embedding
   (:func:`plans_learned`); go to 2.

The learned reward model ``r_theta(s, a, s', z)`` is an MLP over the transition and a task embedding ``z``, one
learned vector per training task (an ``nn.Embedding``), trained by regression on the logged rewards of all
training tasks: a multi-task reward model in the spirit of the task embeddings of CAVIA (Zintgraf et al.,
ICML 2019) and of model-based meta-RL with a latent task variable (Sæmundsson, Hofmann, Deisenroth, UAI
2018; Zintgraf et al., "VariBAD", ICLR 2020), here with a plain point estimate of ``z``.

Evaluation plays one episode per held-out task of a part (``val`` during training, ``test`` once after it),
planned two ways with the same dynamics model and planner:

- ``known``: against the env's true reward of the task's goal (:data:`GOAL_REWARDS`);
- ``learned``: against ``r_theta(., z)``, with ``z`` inferred from ``context_transitions`` reward-labelled
  transitions of random actions in that task, drawn as in step 1 (:func:`random_transitions`), by
  :func:`infer_embedding`: ``infer_steps`` Adam steps on the squared reward error with ``theta`` frozen, from
  the mean training embedding.

Metrics: ``<part>/return_{known,learned}`` and ``<part>/success_{known,learned}`` with their 95% CIs over the
episodes, and ``<part>/reward_rmse``, the learned reward's error with the inferred ``z`` on the transitions of
the ``known`` episodes (held out from the inference: they go where a good plan goes), beside
``<part>/reward_rmse_mean_z``, the same with the mean training embedding (what the inference buys).

To plan a batch of start states of different tasks in one call, each state carries its task's context (the
goal for ``known``, ``z`` for ``learned``) as constant extra coordinates: :class:`InTask` appends it to the
observations, the rollout passes it through unchanged, and the reward reads it back (:func:`mpc_actor`).

Trainer steps and resumption are :mod:`metalab.rl.mbrl`'s (:func:`metalab.rl.mbrl.loop_step`): one trainer step is
one env step (``loss`` returns None) or one minibatch update of both models (the sum of the ensemble's loss and
the reward model's, whose parameters are disjoint: one Adam at ``train.lr`` makes each model's own update).
Everything random is drawn from seeds derived from the run seed and the step, the env's episode and the warm
start are in the checkpoint, so a resume is exact.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from metalab.config import MAX_BATCH, MAX_STEPS, MAX_UNITS, require, require_between, require_widths
from metalab.envs.config import make_env
from metalab.envs.point_mass import POINT_MASS_ID, goal_reward
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.models.mlp import MLP, mlp_forward
from metalab.rl import mbrl
from metalab.rl.buffer import ReplayBuffer
from metalab.rl.dynamics import (
    MIN_STD,
    Data,
    Ensemble,
    Normalizer,
    bootstrap_indices,
    fit_normalizer,
    minibatch,
    model_loss,
    trajectory_sampling,
)
from metalab.rl.mbrl import ActFn, Phase, loop_step, mpc_episodes
from metalab.rl.planners import Bounds, RewardFn, initial_mean, plan
from metalab.rl.rollout import EpisodeResult, Recorder, derive_seed, dims
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.loop import Learner
from metalab.utils import Params

GoalReward = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(obs (..., D), action (..., A), next_obs (..., D), goal (..., G)) -> reward (...)``."""
GOAL_REWARDS: dict[str, GoalReward] = {POINT_MASS_ID: goal_reward}
"""The reward of a task given its goal, per gymnasium env id (``known`` planning and training MPC use it)."""
_RANDOM, _BOOTSTRAP, _MINIBATCH, _PLAN, _CONTEXT = 4, 2, 3, 5, 6  # keys of the seeds derived from a run seed
MODES = ("known", "learned")
"""How evaluation plans: against the true reward, or the learned one with an inferred embedding."""


@dataclass(frozen=True)
class Config:
    """Multi-task model-based RL hyperparameters (the ``mt_mbrl`` section of a config)."""

    mbrl: mbrl.Config = field(default_factory=mbrl.Config)
    """The dynamics ensemble, the planner and the step schedule (:class:`metalab.rl.mbrl.Config`; its
    ``random_steps`` and ``refit_every`` count env steps over all training tasks)."""
    embed_dim: int = 8
    """Size of the task embedding ``z``."""
    reward_hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the reward model's MLP (ReLU)."""
    reward_batch: int = 256
    """Transitions (of any training task) in one reward-model update."""
    context_transitions: int = 20
    """Evaluation: reward-labelled transitions of random actions that ``z`` is inferred from, per episode."""
    infer_steps: int = 300
    """Evaluation: Adam steps on ``z``."""
    infer_lr: float = 0.05
    """Evaluation: Adam's step size on ``z``."""
    random_hold: int = 1
    """Random actions (of the random phase and of the context transitions) are drawn uniformly every this many
    steps of an episode and held in between (1: drawn every step, as :mod:`metalab.rl.mbrl`). Held actions
    travel farther than the origin's neighbourhood, so the random data shows each task's reward over more of
    the state space."""
    learned_every: int = 2
    """Training: every this many-th episode's MPC plans against the learned reward with the task's own
    embedding instead of the known reward (0: never). Its transitions, labelled with the true rewards, correct
    the reward model where plans exploit its errors: data aggregation, as DAgger (Ross, Gordon, Bagnell,
    AISTATS 2011) and the iterative data collection of MBRL (Nagabandi et al. 2018) do for the dynamics."""

    def __post_init__(self) -> None:
        require_between(self.embed_dim, "embed_dim", 1, MAX_UNITS)
        require_widths(self.reward_hidden, "reward_hidden")
        require_between(self.reward_batch, "reward_batch", 1, MAX_BATCH)
        require_between(self.context_transitions, "context_transitions", 1, MAX_BATCH)
        require_between(self.infer_steps, "infer_steps", 0, MAX_STEPS)
        require(self.infer_lr > 0, "infer_lr", f"must be > 0, got {self.infer_lr}")
        require_between(self.random_hold, "random_hold", 1, MAX_STEPS)
        require_between(self.learned_every, "learned_every", 0, MAX_STEPS)


class TaskTransition(NamedTuple):
    """Replay rows (NumPy, ``T`` rows) of the training tasks."""

    obs: np.ndarray  # (T, obs_dim) float32
    action: np.ndarray  # (T, act_dim) float32
    next_obs: np.ndarray  # (T, obs_dim)
    reward: np.ndarray  # (T,) float32, as logged
    task: np.ndarray  # (T,) int64: which training task (an index into tasks("train"), the embedding's row)


class RewardModel(nn.Module):
    """``r_theta(s, a, s', z)``: an :class:`~metalab.models.mlp.MLP` on the standardised ``[s, a, s']`` and a
    task embedding ``z``, predicting the standardised reward; ``embedding`` holds one ``z`` per training task.
    Buffers hold the :class:`~metalab.rl.dynamics.Normalizer` of the inputs ``[s, a, s']`` and of the reward
    (identity until :meth:`set_normalizer`)."""

    def __init__(self, obs_dim: int, act_dim: int, tasks: int, embed_dim: int, hidden: Sequence[int]):
        super().__init__()
        inputs = 2 * obs_dim + act_dim
        self.embedding = nn.Embedding(tasks, embed_dim)
        self.net = MLP(inputs + embed_dim, tuple(hidden), 1)
        self.register_buffer("in_mean", torch.zeros(inputs))
        self.register_buffer("in_std", torch.ones(inputs))
        self.register_buffer("out_mean", torch.zeros(1))
        self.register_buffer("out_std", torch.ones(1))

    def net_params(self) -> Params:
        """The MLP's parameters (without the embeddings), in :func:`~metalab.models.mlp.mlp_forward`'s order."""
        return dict(self.net.named_parameters())

    def normalizer(self) -> Normalizer:
        return Normalizer(self.in_mean, self.in_std, self.out_mean, self.out_std)

    def set_normalizer(self, norm: Normalizer) -> None:
        """Store ``norm`` in the buffers (so that it is saved with the weights)."""
        with torch.no_grad():
            for buffer, value in zip(self.normalizer(), norm, strict=True):
                buffer.copy_(value)


class MultiTaskModel(nn.Module):
    """What the trainer optimises: the shared dynamics ensemble and the reward model."""

    def __init__(self, dynamics: Ensemble, reward: RewardModel):
        super().__init__()
        self.dynamics = dynamics
        self.reward = reward


class RewardRows(NamedTuple):
    """Reward-labelled transitions as tensors, any leading shape ``L``."""

    obs: Tensor  # (*L, obs_dim)
    action: Tensor  # (*L, act_dim)
    next_obs: Tensor  # (*L, obs_dim)
    reward: Tensor  # (*L,)


def fit_reward_normalizer(rows: RewardRows) -> Normalizer:
    """Mean and standard deviation of the reward model's inputs ``[s, a, s']`` ``(N, in)`` and of the rewards
    (a constant feature keeps a standard deviation of 1)."""
    inputs = torch.cat([rows.obs, rows.action, rows.next_obs], -1)  # (N, in)
    reward = rows.reward[:, None]  # (N, 1)

    def std(x: Tensor) -> Tensor:
        s = x.std(0, unbiased=False)
        return torch.where(s < MIN_STD, torch.ones_like(s), s)

    return Normalizer(inputs.mean(0), std(inputs), reward.mean(0), std(reward))


def predict_reward(
    params: Params, norm: Normalizer, obs: Tensor, action: Tensor, next_obs: Tensor, z: Tensor
) -> Tensor:
    """``r_theta(s, a, s', z)`` in reward units, broadcasting the leading dimensions of ``obs``, ``action``,
    ``next_obs`` (``(..., D)``, ``(..., A)``, ``(..., D)``) and ``z`` ``(..., E)``: ``(...)``. ``params``: the
    MLP's (:meth:`RewardModel.net_params`)."""
    shape = torch.broadcast_shapes(obs.shape[:-1], action.shape[:-1], next_obs.shape[:-1], z.shape[:-1])
    parts = [t.expand(*shape, t.shape[-1]) for t in (obs, action, next_obs)]
    x = (torch.cat(parts, -1) - norm.in_mean) / norm.in_std  # (..., in)
    x = torch.cat([x, z.expand(*shape, z.shape[-1])], -1)  # (..., in + E)
    return mlp_forward(params, x)[..., 0] * norm.out_std[0] + norm.out_mean[0]


def reward_loss(
    params: Params, norm: Normalizer, rows: RewardRows, z: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Mean squared error of the standardised reward (what the reward model minimises) on ``rows`` with
    embeddings ``z`` ``(*L, E)``, and ``train/reward_mse`` in reward units."""
    error = predict_reward(params, norm, rows.obs, rows.action, rows.next_obs, z) - rows.reward  # (*L,)
    mse = (error**2).mean()
    return mse / norm.out_std[0] ** 2, {"train/reward_mse": float(mse.detach())}


def infer_embedding(
    params: Params, norm: Normalizer, start: Tensor, rows: RewardRows, steps: int, lr: float
) -> Tensor:
    """The embeddings ``(G, E)`` of ``G`` new tasks, each from its ``K`` reward-labelled transitions ``rows``
    (leading shape ``(G, K)``): ``steps`` Adam steps on the squared reward error with the reward model frozen,
    from ``start`` ``(E,)`` (the mean training embedding). The tasks' losses are summed, so each ``z`` follows
    its own gradient: one batched descent is ``G`` separate ones."""
    params = {k: v.detach() for k, v in params.items()}
    z = start.detach().expand(rows.reward.shape[0], -1).clone().requires_grad_(True)  # (G, E)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            error = (
                predict_reward(params, norm, rows.obs, rows.action, rows.next_obs, z[:, None]) - rows.reward
            )
            loss = (error**2).mean(1).sum()  # (G, K) -> a sum of per-task mean squared errors
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return z.detach()


class InTask(gym.Wrapper):
    """Resets its env in a fixed task (``options={"task": task}``) and appends a fixed ``context`` vector (the
    task's goal, or its inferred embedding) to every observation, so that a batch of start states of different
    tasks carries what each one's reward needs."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.task = 0
        self.context = np.zeros(0, dtype=np.float32)
        self.last_reward = 0.0
        """The reward of the last step (the replay buffer logs it)."""

    def set_task(self, task: int, context: np.ndarray | Tensor) -> None:
        """Reset into ``task`` from the next reset on, with ``context`` ``(C,)`` appended to the observations."""
        self.task = task
        self.context = np.asarray(context, dtype=np.float32).reshape(-1)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options={**(options or {}), "task": self.task})
        return self._with_context(obs), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.last_reward = float(reward)
        return self._with_context(obs), self.last_reward, terminated, truncated, info

    def _with_context(self, obs: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(obs, dtype=np.float32).reshape(-1), self.context])


def random_transitions(
    env: InTask, task: int, k: int, seed: int, bounds: tuple[np.ndarray, np.ndarray], hold: int = 1
) -> tuple[np.ndarray, ...]:
    """``k`` transitions ``(obs, action, next_obs, reward)`` (NumPy, ``k`` rows) of uniformly random actions,
    each held for ``hold`` steps, in ``task``, from a reset with ``seed`` (and resets after it when an episode
    ends)."""
    rng = np.random.default_rng(seed)
    env.set_task(task, np.zeros(0))
    obs, _ = env.reset(seed=seed)
    rows, t = [], 0  # t: steps into the episode
    while len(rows) < k:
        if t % hold == 0:
            action = rng.uniform(*bounds).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, next_obs, np.float32(reward)))
        obs, t = next_obs, t + 1
        if terminated or truncated:
            obs, t = env.reset(seed=seed + len(rows))[0], 0
    return tuple(np.stack(column) for column in zip(*rows, strict=True))


def mpc_actor(
    model: Ensemble, cfg: mbrl.Config, reward: RewardFn, bounds: Bounds, obs_dim: int, device: torch.device
) -> ActFn:
    """MPC through the dynamics ensemble against ``reward``, for states that carry a task context after their
    first ``obs_dim`` coordinates (:class:`InTask`): the rollout moves the state and keeps the context, so
    ``reward`` sees ``[s, context]`` and ``[s', context]``."""

    def act(obs: np.ndarray, mean: Tensor, generator: torch.Generator) -> tuple[np.ndarray, Tensor]:
        params = {k: v.detach() for k, v in model.params().items()}
        norm = model.normalizer()

        def rollout(state: Tensor, actions: Tensor, g: torch.Generator | None) -> Tensor:
            moved = trajectory_sampling(params, norm, state[:, :obs_dim], actions, cfg.particles,
                                        cfg.propagation, generator=g).states  # (S, N, P, H + 1, D)  # fmt: skip
            context = state[:, None, None, None, obs_dim:].expand(
                *moved.shape[:-1], -1
            )  # (S, N, P, H + 1, C)
            return torch.cat([moved, context], -1)

        with torch.no_grad():
            chosen = plan(
                rollout,
                reward,
                torch.from_numpy(obs).to(device),
                bounds,
                cfg.planner,
                mean,
                generator=generator,
            )
        return chosen.actions[:, 0].cpu().numpy(), chosen.mean

    return act


def split_context(reward: GoalReward, obs_dim: int) -> RewardFn:
    """A planner's reward over context-carrying states: ``reward(s, a, s', context)`` with the context read
    from the coordinates after the first ``obs_dim``."""

    def score(obs: Tensor, action: Tensor, next_obs: Tensor) -> Tensor:
        return reward(obs[..., :obs_dim], action, next_obs[..., :obs_dim], obs[..., obs_dim:])

    return score


EPISODE_KINDS = ("random", *MODES)
"""How a training episode was played (its last step decides): random actions, or MPC against either reward."""


def plans_learned(cfg: Config, episode: int) -> bool:
    """Whether training episode ``episode``'s MPC plans against the learned reward (every ``learned_every``-th
    episode) rather than the known one."""
    return cfg.learned_every > 0 and episode % cfg.learned_every == cfg.learned_every - 1


@dataclass
class _Progress:
    """Mutable training state besides the models and the buffer."""

    mean: Tensor  # (1, H, A) the planner's warm start for the next env step
    episode: int = 0
    recent: dict[str, deque] = field(
        default_factory=lambda: {kind: deque(maxlen=mbrl.RECENT_EPISODES) for kind in EPISODE_KINDS}
    )
    """``(return, success)`` of the last finished training episodes of each kind."""


def _estimates(prefix: str, values: Sequence[float]) -> dict[str, float]:
    est = mean_ci95(values)
    return {prefix: est.mean, f"{prefix}_ci95": est.ci95}


@dataclass
class _Fit:
    """The fit in progress: its number, its data and bootstrap resamples (fixed for the whole fit)."""

    fit: int = -1
    rows: TaskTransition | None = None
    data: Data | None = None
    boot: np.ndarray | None = None


@dataclass
class MultiTask:
    """Everything a multi-task model-based run holds: models, buffer, envs, actors and counters."""

    run: RunConfig
    cfg: Config
    device: torch.device
    family: gym.Env
    """The goal family (``tasks(split)``, ``goal_of(task)``)."""
    bounds: Bounds
    obs_dim: int
    train_tasks: list[int]
    goals: dict[int, np.ndarray]
    """Every task's goal (the known reward's context)."""
    dynamics: Ensemble
    reward_model: RewardModel
    buffer: ReplayBuffer
    env: InTask
    recorder: Recorder
    eval_envs: list[InTask]
    context_env: InTask
    """Collects the random transitions a held-out task's embedding is inferred from."""
    known_actor: ActFn
    learned_actor: ActFn
    progress: _Progress
    fitting: _Fit = field(default_factory=_Fit)

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """The action box as float32 ``(low, high)``."""
        return self.bounds.low.cpu().numpy(), self.bounds.high.cpu().numpy()


def learned_reward(model: RewardModel) -> GoalReward:
    """``r_theta(s, a, s', z)`` with the reward model's current parameters."""

    def reward(obs: Tensor, action: Tensor, next_obs: Tensor, z: Tensor) -> Tensor:
        return predict_reward(model.net_params(), model.normalizer(), obs, action, next_obs, z)

    return reward


def start_episode(mt: MultiTask) -> None:
    """Reset the training env into the next episode's task (the training tasks take turns)."""
    mt.env.set_task(mt.train_tasks[mt.progress.episode % len(mt.train_tasks)], np.zeros(0))
    mt.recorder.reset(derive_seed(mt.run.seed, 0, mt.progress.episode))


def mpc_action(mt: MultiTask, now: Phase) -> np.ndarray:
    """The MPC action of a training episode, against the task's known reward or, every ``learned_every``-th
    episode, against the learned reward with the task's own (current) embedding."""
    progress = mt.progress
    task = progress.episode % len(mt.train_tasks)
    generator = torch.Generator(mt.device).manual_seed(derive_seed(mt.run.seed, _PLAN, now.env_step))
    if plans_learned(mt.cfg, progress.episode):
        actor, context = mt.learned_actor, mt.reward_model.embedding.weight[task].detach().cpu().numpy()
    else:
        actor, context = mt.known_actor, mt.goals[mt.train_tasks[task]]
    state = np.concatenate([mt.recorder.obs, context]).astype(np.float32)[None]  # (1, D + C)
    actions, progress.mean = actor(state, progress.mean, generator)
    return actions[0]


def env_step(mt: MultiTask, now: Phase) -> None:
    """One env step of a training episode (random, held for ``random_hold`` steps, or MPC) into the buffer."""
    progress, recorder = mt.progress, mt.recorder
    if now.kind == "random" and len(recorder.actions) % mt.cfg.random_hold:
        action = recorder.actions[-1]  # held
    elif now.kind == "random":
        low, high = mt.box
        action = np.random.default_rng(derive_seed(mt.run.seed, _RANDOM, now.env_step)).uniform(low, high)
        action = action.astype(np.float32)
    else:
        action = mpc_action(mt, now)
    obs = recorder.obs
    result = recorder.step(action)
    task = np.array([progress.episode % len(mt.train_tasks)])
    reward = np.array([mt.env.last_reward], dtype=np.float32)
    mt.buffer.add(TaskTransition(obs[None], action[None], recorder.obs[None], reward, task))
    if result is not None:
        kind = "random" if now.kind == "random" else MODES[plans_learned(mt.cfg, progress.episode)]
        progress.recent[kind].append((result.ret, result.success))
        progress.episode += 1
        start_episode(mt)
        progress.mean = initial_mean(mt.bounds, 1, mt.cfg.mbrl.planner.horizon)


def fit_loss(mt: MultiTask, now: Phase, step: int) -> tuple[Tensor, dict[str, float]]:
    """One minibatch update of the dynamics ensemble and of the reward model on the buffer's data."""
    mb, fitting, device = mt.cfg.mbrl, mt.fitting, mt.device
    if fitting.fit != now.fit:  # the fit's data and resamples are fixed: derive them once
        fitting.rows = TaskTransition(*(torch.from_numpy(c).to(device) for c in mt.buffer.filled()))
        fitting.data = Data(fitting.rows.obs, fitting.rows.action, fitting.rows.next_obs)
        rng = np.random.default_rng(derive_seed(mt.run.seed, _BOOTSTRAP, now.fit))
        fitting.boot = bootstrap_indices(len(mt.buffer), mb.members, rng)
        fitting.fit = now.fit
    rows, data, boot = fitting.rows, fitting.data, fitting.boot
    assert rows is not None and data is not None and boot is not None
    if now.update == 0:
        mt.dynamics.set_normalizer(fit_normalizer(data))
        mt.reward_model.set_normalizer(fit_reward_normalizer(RewardRows(*rows[:4])))
    rng = np.random.default_rng(derive_seed(mt.run.seed, _MINIBATCH, step))
    batch = minibatch(data, boot, mb.batch_size, rng)
    dynamics_loss, metrics = model_loss(mt.dynamics.params(), mt.dynamics.normalizer(), batch, mb.bound_reg)
    pick = torch.from_numpy(rng.integers(0, len(mt.buffer), size=mt.cfg.reward_batch)).to(device)  # (B,)
    picked = RewardRows(rows.obs[pick], rows.action[pick], rows.next_obs[pick], rows.reward[pick])
    z = mt.reward_model.embedding(rows.task[pick])  # (B, E)
    loss_r, metrics_r = reward_loss(mt.reward_model.net_params(), mt.reward_model.normalizer(), picked, z)
    return dynamics_loss + loss_r, metrics | metrics_r


def loss(mt: MultiTask, step: int) -> tuple[Tensor | None, dict[str, float]]:
    """One trainer step of the model-based loop (:func:`metalab.rl.mbrl.loop_step`)."""
    total, metrics = loop_step(
        step, mt.cfg.mbrl, lambda now, s: fit_loss(mt, now, s), lambda now: env_step(mt, now),
        lambda: mt.progress.episode,
    )  # fmt: skip
    for kind, recent in mt.progress.recent.items():
        if recent:
            metrics[f"train/return_{kind}"] = float(np.mean([r for r, _ in recent]))
            metrics[f"train/success_{kind}"] = float(np.mean([s for _, s in recent]))
    return total, metrics


def play(
    mt: MultiTask,
    actor: ActFn,
    tasks: list[int],
    contexts: Sequence[Any],
    seeds: list[int],
    generator: torch.Generator,
) -> list[EpisodeResult]:
    """One MPC episode per task, ``len(eval_envs)`` at a time, each state carrying its context."""
    start = initial_mean(mt.bounds, 1, mt.cfg.mbrl.planner.horizon)
    envs, results = mt.eval_envs, []
    for first in range(0, len(tasks), len(envs)):
        chunk = range(first, min(first + len(envs), len(tasks)))
        for slot, i in zip(envs, chunk, strict=False):
            slot.set_task(tasks[i], contexts[i])
        results += mpc_episodes(envs[: len(chunk)], actor, seeds[first : chunk.stop], start, generator)
    return results


def inferred_embeddings(mt: MultiTask, part: str, tasks: list[int]) -> tuple[Tensor, Tensor]:
    """Each held-out task's embedding ``(G, E)`` inferred from ``context_transitions`` random transitions in it,
    and the mean training embedding ``(E,)`` (where inference starts)."""
    cfg = mt.cfg
    context = [
        random_transitions(mt.context_env, t, cfg.context_transitions,
                           derive_seed(mt.run.eval.seed, PART_INDEX[part], _CONTEXT, i), mt.box, cfg.random_hold)
        for i, t in enumerate(tasks)
    ]  # fmt: skip
    rows = RewardRows(*(torch.from_numpy(np.stack(c)).to(mt.device) for c in zip(*context, strict=True)))
    params, norm = mt.reward_model.net_params(), mt.reward_model.normalizer()
    mean_z = mt.reward_model.embedding.weight.detach().mean(0)  # (E,)
    return infer_embedding(params, norm, mean_z, rows, cfg.infer_steps, cfg.infer_lr), mean_z


@torch.no_grad()
def reward_rmse(mt: MultiTask, episodes: list[EpisodeResult], z: Tensor) -> float:
    """The learned reward's RMSE on ``episodes``' transitions, episode ``i`` with embedding ``z[i]``."""
    errors = []
    for result, z_i in zip(episodes, z, strict=True):
        e = result.experience
        held = RewardRows(*(torch.from_numpy(x).to(mt.device) for x in (
            e.obs[:, : mt.obs_dim], e.action, e.next_obs[:, : mt.obs_dim], e.reward)))  # fmt: skip
        errors.append(
            learned_reward(mt.reward_model)(held.obs, held.action, held.next_obs, z_i) - held.reward
        )
    return float(torch.cat(errors).pow(2).mean().sqrt())


def evaluate(mt: MultiTask, part: str, episodes: int) -> dict[str, float]:
    """One episode per held-out task (round robin over ``part``'s), planned against the known reward and against
    the learned one with the inferred embedding; and the learned reward's error on the known episodes."""
    held_out = list(mt.family.tasks(part))
    tasks = [held_out[i % len(held_out)] for i in range(episodes)]
    seeds = [derive_seed(mt.run.eval.seed, PART_INDEX[part], i) for i in range(episodes)]
    z, mean_z = inferred_embeddings(mt, part, tasks)  # (G, E), (E,)
    metrics: dict[str, float] = {}
    outcomes = {}
    for mode, actor, contexts in (
        ("known", mt.known_actor, [mt.goals[t] for t in tasks]),
        ("learned", mt.learned_actor, list(z.cpu())),
    ):
        plan_seed = derive_seed(mt.run.eval.seed, PART_INDEX[part], _PLAN, MODES.index(mode))
        outcomes[mode] = play(
            mt, actor, tasks, contexts, seeds, torch.Generator(mt.device).manual_seed(plan_seed)
        )
        metrics |= _estimates(f"{part}/return_{mode}", [r.ret for r in outcomes[mode]])
        metrics |= _estimates(f"{part}/success_{mode}", [r.success for r in outcomes[mode]])
    # the learned reward on the known episodes' transitions, with z and with the mean
    metrics[f"{part}/reward_rmse"] = reward_rmse(mt, outcomes["known"], z)
    metrics[f"{part}/reward_rmse_mean_z"] = reward_rmse(mt, outcomes["known"], mean_z.expand_as(z))
    return metrics


def state(mt: MultiTask) -> dict[str, Any]:
    """What a checkpoint needs beyond the models: buffer, the episode in progress, counters, warm start."""
    progress = mt.progress
    return {
        "buffer": mt.buffer.state(),
        "recorder": mt.recorder.state(),
        "episode": progress.episode,
        "recent": {
            k: torch.tensor(list(v), dtype=torch.float64).reshape(-1, 2) for k, v in progress.recent.items()
        },
        "mean": progress.mean.detach().cpu().clone(),
    }


def load_state(mt: MultiTask, saved: dict[str, Any]) -> None:
    progress = mt.progress
    mt.buffer.load_state(saved["buffer"])
    progress.episode = int(saved["episode"])
    for kind, recent in progress.recent.items():
        recent.clear()
        recent.extend(tuple(row) for row in saved["recent"][kind].tolist())
    progress.mean = saved["mean"].to(mt.device)
    start_episode(mt)  # into the episode's task; the recorder then replays its actions
    mt.recorder.load_state(saved["recorder"])
    mt.fitting.fit = -1


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """Dynamics ensemble, reward model, replay buffer, envs and the trainer hooks of a multi-task model-based
    run (``data_root`` is unused)."""
    cfg: Config = run.params
    mb = cfg.mbrl
    if run.env.id not in GOAL_REWARDS:
        raise ConfigError(
            "env.id",
            f"mt_mbrl needs a goal family with a known reward per goal, which {run.env.id} is not (there is one "
            f"for: {', '.join(GOAL_REWARDS)})",
        )
    probe = make_env(run.env)
    family = probe.unwrapped
    space = probe.action_space
    assert isinstance(space, spaces.Box)
    obs_dim, _ = dims(probe)
    act_dim = int(np.prod(space.shape))
    low, high = space.low.reshape(-1).astype(np.float32), space.high.reshape(-1).astype(np.float32)
    bounds = Bounds(torch.from_numpy(low).to(device), torch.from_numpy(high).to(device))
    train_tasks = list(family.tasks("train"))
    dynamics = Ensemble(obs_dim, act_dim, mb.hidden, mb.members, mb.probabilistic)
    reward_model = RewardModel(obs_dim, act_dim, len(train_tasks), cfg.embed_dim, cfg.reward_hidden)
    model = MultiTaskModel(dynamics, reward_model).to(device)
    env = InTask(make_env(run.env))
    known = split_context(GOAL_REWARDS[run.env.id], obs_dim)
    learned = split_context(learned_reward(reward_model), obs_dim)
    mt = MultiTask(
        run, cfg, device, family, bounds, obs_dim, train_tasks,
        goals={t: family.goal_of(t) for split in ("train", "val", "test") for t in family.tasks(split)},
        dynamics=dynamics, reward_model=reward_model,
        buffer=ReplayBuffer(mb.buffer_size, TaskTransition),
        env=env, recorder=Recorder(env),
        eval_envs=[InTask(make_env(run.env)) for _ in range(min(run.eval.batch, run.eval.episodes))],
        context_env=InTask(make_env(run.env)),
        known_actor=mpc_actor(dynamics, mb, known, bounds, obs_dim, device),
        learned_actor=mpc_actor(dynamics, mb, learned, bounds, obs_dim, device),
        progress=_Progress(initial_mean(bounds, 1, mb.planner.horizon)),
    )  # fmt: skip
    start_episode(mt)
    return Learner(model, partial(loss, mt), partial(evaluate, mt), state=partial(state, mt),
                   load_state=partial(load_state, mt))  # fmt: skip
