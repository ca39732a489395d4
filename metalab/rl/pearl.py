"""PEARL (Rakelly, Zhou, Quillen, Finn, Levine, "Efficient Off-Policy Meta-Reinforcement Learning via
Probabilistic Context Variables", ICML 2019): soft actor-critic conditioned on a latent task variable ``z``
inferred from a task's transitions.

Task inference. A context encoder maps each transition ``c_n = (s, a, r[, s'])`` of a task to a Gaussian factor
``N(mu_n, sigma_n^2)`` over ``z``; the posterior ``q(z | c)`` is their product, in closed form the
precision-weighted mean ``sigma^2 = 1 / sum_n sigma_n^-2``, ``mu = sigma^2 sum_n mu_n / sigma_n^2``
(:func:`product_of_gaussians`). It is permutation-invariant, so context can be any set of the task's
transitions. ``z`` is drawn by reparameterisation; ``kl_lambda KL(q(z | c) || N(0, I))`` is the information
bottleneck.

Training (one trainer step = one gradient step on ``train.meta_batch`` training tasks): for each task, a context
batch of ``context_batch`` transitions from the task's *encoder buffer* (its recent data, see below) gives
``q(z | c)`` and one ``z``; an RL batch of ``batch_size`` transitions from the task's whole replay buffer is fed,
with that ``z`` appended to observations, to SAC (:mod:`metalab.rl.sac`). The critic loss backpropagates into
the encoder (the paper's Fig. 2: the encoder learns what the Bellman error needs), the actor sees ``z`` detached.

Data collection (the paper's Algorithm 1, the official code's ``MetaRLAlgorithm.train``): before the first
step, ``initial_steps`` transitions per training task with ``z ~ prior``; then every ``collect_every`` steps,
for ``tasks_per_collect`` training tasks: clear the task's encoder buffer, collect ``prior_steps`` transitions
with ``z ~ prior`` and ``posterior_steps`` with ``z ~ q(z | c)`` (re-inferred before every episode from a
context batch of the encoder buffer), both into the encoder and replay buffers, then ``extra_posterior_steps``
with ``z ~ q(z | c)`` into the replay buffer only. Collection samples actions, evaluation takes the mean action.

Evaluation (on ``env.unwrapped.tasks(part)``: the 20 test goals, or the 20 val goals, which are neither
training nor test goals; see :mod:`metalab.envs.point_robot`): a trial is
``eval_adapt_episodes + 1`` episodes on one task, each with one ``z``: from the prior for the first
``eval_prior_episodes`` episodes, afterwards from the posterior of all transitions of the trial so far. Metrics
``<part>/return_after{k}`` and ``<part>/success_after{k}`` are of the episode after ``k`` earlier episodes
(``after0``: no context at all); ``<part>/return`` and ``<part>/success`` are those of the last episode. Success is
the env's ``info["is_success"]`` at the episode's last step (the point robot: the final position is within 0.2
of the goal); envs that do not report it get no success metrics.

The official code's evaluation (with ``oyster_num_evals > 0``; :func:`oyster_runs`, :func:`oyster_metrics`):
``oyster_num_evals`` runs on *every* task of the part, each collecting whole trajectories until it holds
``oyster_steps_per_eval`` transitions, ``z`` drawn anew per trajectory, from the prior for the first
``oyster_exp_traj`` and afterwards from the posterior of the run's transitions so far. Its logged metric,
``AverageReturn_all_test_tasks``, is ``<part>/oyster_return``: the return of each run's last trajectory, averaged
over runs and tasks. It differs from the trial metrics above only in what is counted and averaged; the sparse
point robot's official values (20 trajectories, the first 5 with the prior, 2 runs on each of the 20 test goals)
are in ``configs/pearl_point_robot*.yaml``.

Choices and their sources (official code = github.com/katerakelly/oyster; ``configs/default.py`` are this
module's defaults, ``configs/sparse-point-robot.json`` the point robot's ``configs/pearl_point_robot.yaml``):

- Networks: encoder MLP 200-200-200 whose output splits into ``mu`` and ``softplus -> sigma^2``, factor
  variances clamped at 1e-7, no prior factor in the product (``launch_experiment.py``, ``agent.py``); policy and
  critics 300-300-300 (``net_size``), latent dimension 5.
- KL: summed over latent dimensions and over the meta-batch's tasks (``compute_kl_div`` sums over tasks).
- Critic: SAC's twin Q-functions with Polyak-averaged target Q-functions (Haarnoja et al. 2018b) in place of
  the official V-function with a target V (SAC v1); fixed ``alpha = 1`` with a reward scale, as the official
  code; its mean/log-std regulariser of 1e-3 is ``sac.policy_reg``. One Adam with ``train.lr`` over all
  parameters (the official four Adams all use 3e-4); see :func:`metalab.rl.sac.sac_losses` for why that is the
  same update.
- Rewards: the context always holds the env's reward. ``rl_reward`` can name an ``info`` key whose value the
  critic regresses on instead: PEARL meta-trains the sparse point robot's actor-critic on the dense reward
  (``-distance``) while its encoder sees only the sparse one (``sparse_rewards: 1``; ``sample_sac`` versus
  ``sample_context`` in ``sac.py``), and so does ``pearl_point_robot.yaml``; ``pearl_point_robot_small.yaml``
  trains the critic on the sparse reward, which found goals far more often there (see its header). Success
  and returns are of the env reward.
- Actions: the policy acts in ``[-1, 1]^A``, mapped linearly onto the env's box (official ``NormalizedBoxEnv``);
  buffers and context hold the ``[-1, 1]`` actions.
- Deviations: the tasks of one collection round are distinct (official: drawn with replacement) so that they
  can run in lockstep; a posterior phase starts from the posterior of the encoder buffer rather than from one
  prior episode (``collect_data`` calls ``clear_z`` first); the encoder buffer keeps the newest
  ``max(initial_steps, prior_steps + posterior_steps)`` transitions of its task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

import metalab.rl.sac as sac
from metalab.config import MAX_BATCH, MAX_UNITS, require, require_between, require_widths
from metalab.envs.config import make_env, make_vector_env
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.models import MLP
from metalab.models.mlp import mlp_forward
from metalab.rl.buffer import Experience, ReplayBuffer, Transitions
from metalab.rl.rollout import (
    Act,
    EpisodeResult,
    derive_seed,
    dims,
    env_action,
    is_goal_env,
    run_episodes,
    run_vector_episodes,
)
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.loop import Learner
from metalab.utils import Params

MIN_VARIANCE = 1e-7  # floor of each factor's variance before the product (official code)
MAX_TASK_TRANSITIONS = 1_000_000
"""Most transitions a replay or encoder buffer keeps, or a collection makes, per training task (PEARL's own
replay size)."""
MAX_TRIAL_EPISODES = 1_000
"""Most episodes of one evaluation trial."""


@dataclass(frozen=True)
class Config:
    """PEARL hyperparameters (the ``pearl`` section of a config).

    Defaults are the official code's (``configs/default.py``), except in ``sac``, whose defaults are SAC's own;
    ``configs/pearl_point_robot.yaml`` lists PEARL's values for every key.
    """

    latent_dim: int = 5
    """Dimension of the task variable ``z``."""
    encoder_hidden: tuple[int, ...] = (200, 200, 200)
    """Hidden layer widths of the context encoder."""
    kl_lambda: float = 0.1
    """Weight of ``KL(q(z | c) || N(0, I))`` (summed over the meta-batch's tasks) in the loss."""
    context_batch: int = 64
    """Transitions per task in a context batch (drawn with replacement from the task's encoder buffer)."""
    batch_size: int = 256
    """Transitions per task in an RL batch (drawn from the task's replay buffer)."""
    next_obs_in_context: bool = True
    """Context transitions include ``s'`` (the paper's ``(s, a, r, s')``); the official code leaves it out by
    default, as ``s'`` tells nothing more where the dynamics are the same in every task."""
    rl_reward: str | None = None
    """Info key whose value the critic regresses on instead of the env reward (``dense_reward`` for the sparse
    point robot, as PEARL); null: the env reward. The context always sees the env reward."""
    buffer_size: int = 100_000
    """Replay buffer capacity per training task, in transitions."""
    initial_steps: int = 2000
    """Transitions collected on every training task with ``z ~ prior`` before the first update."""
    collect_every: int = 2000
    """Trainer steps (gradient steps) between collection rounds."""
    tasks_per_collect: int = 5
    """Training tasks (distinct) a collection round collects on."""
    prior_steps: int = 400
    """Per task and round: transitions collected with ``z ~ prior``, into both buffers."""
    posterior_steps: int = 0
    """Per task and round: transitions collected with ``z ~ q(z | c)``, into both buffers."""
    extra_posterior_steps: int = 400
    """Per task and round: transitions with ``z ~ q(z | c)`` into the replay buffer only (the policy must learn
    to act on posterior samples; the encoder is trained on context from the other two phases)."""
    eval_prior_episodes: int = 1
    """Evaluation: episodes of a trial with ``z`` from the prior before the posterior is used."""
    eval_adapt_episodes: int = 2
    """Evaluation: episodes of a trial after the first one (metrics ``<part>/*_after1`` ... ``_after{this}``)."""
    oyster_num_evals: int = 0
    """Official-code evaluation (:func:`oyster_runs`): independent runs on every task of the evaluated part
    (official ``num_evals``: 2 in ``configs/default.py``, 1 for cheetah-vel); 0: no ``<part>/oyster_*`` metrics."""
    oyster_exp_traj: int = 1
    """Official-code evaluation: trajectories of a run with ``z`` from the prior before the posterior is used
    (official ``num_exp_traj_eval``: 1 by default, 5 for the sparse point robot, 2 for cheetah-vel)."""
    oyster_steps_per_eval: int = 600
    """Official-code evaluation: a run collects whole trajectories until it holds at least this many transitions
    (official ``num_steps_per_eval``: 600 by default, 3 trajectories of 200 steps; 400 for the sparse point
    robot, 20 trajectories of 20 steps)."""
    sac: sac.AgentConfig = field(default_factory=sac.AgentConfig)
    """The soft actor-critic (``sac.hidden`` are the widths of the policy and of each critic)."""

    def __post_init__(self) -> None:
        require_between(self.latent_dim, "latent_dim", 1, MAX_UNITS)
        require_widths(self.encoder_hidden, "encoder_hidden")
        require(self.kl_lambda >= 0, "kl_lambda", "must be >= 0")
        require(self.collect_every >= 1, "collect_every", "must be >= 1")
        for key in ("context_batch", "batch_size"):
            require_between(getattr(self, key), key, 1, MAX_BATCH)
        for key in ("buffer_size", "initial_steps"):  # transitions kept per training task
            require_between(getattr(self, key), key, 1, MAX_TASK_TRANSITIONS)
        require(self.tasks_per_collect >= 0, "tasks_per_collect", "must be >= 0")
        for key in ("prior_steps", "posterior_steps", "extra_posterior_steps"):
            require_between(getattr(self, key), key, 0, MAX_TASK_TRANSITIONS)
        require(self.prior_steps + self.posterior_steps >= 1, "posterior_steps",
                "prior_steps + posterior_steps must be >= 1: a collected task needs encoder data")  # fmt: skip
        require_between(self.eval_prior_episodes, "eval_prior_episodes", 1, MAX_TRIAL_EPISODES)
        require_between(self.eval_adapt_episodes, "eval_adapt_episodes", 0, MAX_TRIAL_EPISODES)
        require_between(self.oyster_num_evals, "oyster_num_evals", 0, MAX_TRIAL_EPISODES)
        require_between(self.oyster_exp_traj, "oyster_exp_traj", 1, MAX_TRIAL_EPISODES)
        require_between(self.oyster_steps_per_eval, "oyster_steps_per_eval", 1, MAX_TASK_TRANSITIONS)

    @property
    def encoder_capacity(self) -> int:
        """Transitions an encoder buffer keeps: the most one collection writes into it."""
        return max(self.initial_steps, self.prior_steps + self.posterior_steps)


class PEARLNets(nn.Module):
    """Context encoder (transition -> ``mu, sigma^2`` pre-activation, ``2 * latent_dim``) and the actor-critic on
    ``[obs, z]``."""

    def __init__(self, obs_dim: int, act_dim: int, context_dim: int, cfg: Config):
        super().__init__()
        self.encoder = MLP(context_dim, cfg.encoder_hidden, 2 * cfg.latent_dim)
        self.agent = sac.ActorCritic(obs_dim + cfg.latent_dim, act_dim, cfg.sac.hidden, cfg.sac.alpha)


class TaskBatch(NamedTuple):
    """RL transitions of ``T`` tasks, ``B`` each."""

    obs: torch.Tensor  # (T, B, obs_dim)
    action: torch.Tensor  # (T, B, A) in [-1, 1]
    reward: torch.Tensor  # (T, B) the critic's reward
    next_obs: torch.Tensor  # (T, B, obs_dim)
    done: torch.Tensor  # (T, B) 1.0 where next_obs is terminal


def context_features(
    obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor | None
) -> torch.Tensor:
    """Encoder input ``[s, a, r(, s')]``, ``(..., context_dim)``, from ``(..., obs_dim)``, ``(..., A)``, ``(...)``."""
    parts = [obs, action, reward[..., None]] + ([] if next_obs is None else [next_obs])
    return torch.cat(parts, -1)


def gaussian_factors(
    encoder: Params, context: torch.Tensor, latent_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each transition's factor ``(mu_n, sigma_n^2)``, each ``(..., N, L)``, for context ``(..., N, context_dim)``."""
    out = mlp_forward(encoder, context)  # (..., N, 2L)
    return out[..., :latent_dim], F.softplus(out[..., latent_dim:])


def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``prod_n N(mu_n, var_n)`` over dim -2, normalised: mean and variance ``(..., L)``.

    Precisions add, ``1 / var = sum_n 1 / var_n``, and the mean is precision-weighted,
    ``mu = var * sum_n mu_n / var_n``. Factor variances are floored at 1e-7 (a factor cannot be certain).
    """
    precision = var.clamp_min(MIN_VARIANCE).reciprocal()  # (..., N, L)
    post_var = precision.sum(-2).reciprocal()  # (..., L)
    return post_var * (mu * precision).sum(-2), post_var


def posterior(encoder: Params, context: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q(z | c)``: mean and variance ``(..., L)`` for context ``(..., N, context_dim)``."""
    return product_of_gaussians(*gaussian_factors(encoder, context, latent_dim))


def kl_to_standard_normal(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag var) || N(0, I))``, ``(...)``: ``0.5 sum(var + mu^2 - 1 - log var)`` over dim -1."""
    return 0.5 * (var + mu**2 - 1.0 - var.log()).sum(-1)


def pearl_losses(
    params: Params, target: Params, context: torch.Tensor, batch: TaskBatch, cfg: Config, act_dim: int
) -> tuple[sac.Losses, torch.Tensor, dict[str, float]]:
    """SAC losses of ``T`` tasks with ``z ~ q(z | context)``, and ``KL(q(z | c) || N(0, I))`` summed over tasks.

    Context is ``(T, C, context_dim)``; ``params`` are :class:`PEARLNets`' named parameters, ``target`` the
    target critics (``q1.*``, ``q2.*``). The loss to minimise is ``losses.total() + kl_lambda * kl``.
    """
    mu, var = posterior(sac.sub_params(params, "encoder"), context, cfg.latent_dim)  # (T, L) each
    z = mu + var.sqrt() * torch.randn_like(mu)  # (T, L) one sample per task, reparameterised
    kl = kl_to_standard_normal(mu, var).sum()
    tasks, rows = batch.reward.shape
    z_rows = z[:, None, :].expand(tasks, rows, cfg.latent_dim)  # (T, B, L)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(tasks * rows, *x.shape[2:])

    rl = sac.Batch(obs=flat(torch.cat([batch.obs, z_rows], -1)), action=flat(batch.action),
                   reward=flat(batch.reward), next_obs=flat(torch.cat([batch.next_obs, z_rows], -1)),
                   done=flat(batch.done))  # fmt: skip
    losses, metrics = sac.sac_losses(sac.sub_params(params, "agent"), target, rl, cfg.sac, act_dim)
    metrics.update({"loss/kl": kl.item(), "train/z_var": var.detach().mean().item()})
    return losses, kl, metrics


def to_box(space: spaces.Box, action: np.ndarray) -> np.ndarray:
    """An action in ``[-1, 1]^A`` mapped linearly onto the box (and clipped into it)."""
    return env_action(space, space.low + (action + 1.0) * 0.5 * (space.high - space.low))


def run_tasks(
    envs: Sequence[gym.Env] | gym.vector.VectorEnv,
    tasks: Sequence[int],
    seeds: Sequence[int],
    act: Act,
    rl_reward: str | None = None,
) -> list[EpisodeResult]:
    """One episode on each task (``options={"task": tasks[i]}``), all in lockstep: through a list of envs or a
    vector env (:func:`metalab.envs.config.make_vector_env`), the same episodes either way.

    The policy acts in ``[-1, 1]`` (:func:`to_box` maps it onto the env's box); with ``rl_reward`` each result's
    ``info`` holds that info key's value at every step (:func:`critic_reward`).
    """
    run = run_vector_episodes if isinstance(envs, gym.vector.VectorEnv) else run_episodes
    return run(envs, act, seeds, tasks, rl_reward, to_box)  # type: ignore[arg-type]


def critic_reward(result: EpisodeResult) -> np.ndarray:
    """``(T,)`` the reward the critic regresses on: the ``rl_reward`` info values, or the env reward."""
    return result.experience.reward if result.info is None else result.info


def _summary(results: Sequence[EpisodeResult], key: str) -> dict[str, float]:
    """Mean return (and success, if reported) of ``results`` under ``train/{return,success}_{key}``."""
    out = {f"train/return_{key}": float(np.mean([r.ret for r in results]))}
    if not any(math.isnan(r.success) for r in results):
        out[f"train/success_{key}"] = float(np.mean([r.success for r in results]))
    return out


@dataclass
class Progress:
    """Episodes and env steps so far, and the metrics of the last collection round (logged until the next)."""

    episodes: int = 0
    env_steps: int = 0
    collected: dict[str, float] = field(default_factory=dict)


@dataclass
class PEARL:
    """Everything a PEARL run holds: networks, target critics, per-task buffers, envs and counters."""

    run: RunConfig
    cfg: Config
    device: torch.device
    probe: gym.Env
    """The first env: its ``tasks(split)`` name the training, val and test tasks."""
    train_tasks: list[int]
    act_dim: int
    nets: PEARLNets
    target: Params
    replay: list[ReplayBuffer]
    """Per training task: every transition, with the critic's reward."""
    encoder_data: list[ReplayBuffer]
    """Per training task: the recent transitions the encoder's context is drawn from."""
    rng: np.random.Generator
    """Task choice, context and RL batches."""
    envs: list[gym.Env]
    """Collection envs stepped in lockstep (``env.vector: loop``); unused with ``venv``."""
    venv: gym.vector.VectorEnv | None
    eval_envs: list[gym.Env]
    progress: Progress = field(default_factory=Progress)

    def params(self) -> Params:
        return dict(self.nets.named_parameters())


def _checked_env(run: RunConfig) -> gym.Env:
    """``run``'s env, refused by name unless it is a multi-task env with Box actions (and ``rl_reward`` in its
    info)."""
    cfg: Config = run.params
    probe = make_env(run.env)
    if not isinstance(probe.action_space, spaces.Box):
        raise ConfigError(
            "env.id", f"PEARL needs continuous (Box) actions; {run.env.id} has {probe.action_space}"
        )
    if is_goal_env(probe) or not callable(getattr(probe.unwrapped, "tasks", None)):
        raise ConfigError("env.id", f"PEARL needs a multi-task env with tasks(split) and reset(options={{'task': "
                          f"i}}), observations a plain Box; {run.env.id} is not one")  # fmt: skip
    if cfg.rl_reward is not None:  # a typo fails here, not at the first collection
        probe.reset(seed=0)
        info = probe.step(probe.action_space.sample())[4]
        if cfg.rl_reward not in info:
            raise ConfigError(
                "pearl.rl_reward", f"the env's info has no {cfg.rl_reward!r}; keys: {sorted(info)}"
            )
    return probe


def context_of(pearl: PEARL, rows: Transitions | Experience) -> torch.Tensor:
    """Encoder input ``(N, context_dim)`` of sampled or recorded transitions."""
    obs, action, reward, next_obs = (torch.as_tensor(x) for x in (rows.obs, rows.action, rows.reward,
                                                                   rows.next_obs))  # fmt: skip
    next_obs = next_obs if pearl.cfg.next_obs_in_context else None
    return context_features(obs, action, reward, next_obs).to(pearl.device)


def sample_context(pearl: PEARL, indices: Sequence[int]) -> torch.Tensor:
    """``(len(indices), C, context_dim)`` context of training tasks (indices into ``train_tasks``)."""
    return torch.stack(
        [context_of(pearl, pearl.encoder_data[k].sample(pearl.cfg.context_batch, pearl.rng)) for k in indices]
    )


def draw_z(
    mu: torch.Tensor, var: torch.Tensor, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``z ~ N(mu, var)``, from ``generator`` (evaluation) or torch's global RNG (collection)."""
    noise = torch.randn(mu.shape, generator=generator).to(device) if generator else torch.randn_like(mu)
    return mu + var.sqrt() * noise


def policy(pearl: PEARL, z: torch.Tensor, deterministic: bool) -> Act:
    """Acts with task variable ``z[i]`` in episode ``i``: a sample (collection) or the mean action (evaluation)."""

    def act(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
        x = torch.cat([torch.from_numpy(obs).to(pearl.device), z[live]], -1)  # (E, obs_dim + L)
        mean, log_std = sac.policy_head(sac.sub_params(pearl.params(), "agent"), x)
        if deterministic:
            return torch.tanh(mean).cpu().numpy()
        return sac.tanh_gaussian_sample(mean, log_std, torch.randn_like(mean))[0].cpu().numpy()

    return act


@torch.no_grad()
def collect(
    pearl: PEARL, indices: list[int], steps: int, use_posterior: bool, to_encoder: bool
) -> list[EpisodeResult]:
    """At least ``steps`` transitions (whole episodes) on each task, one episode per task at a time."""
    cfg, run, progress = pearl.cfg, pearl.run, pearl.progress
    remaining = dict.fromkeys(indices, steps)
    results: list[EpisodeResult] = []
    while active := [k for k in indices if remaining[k] > 0]:
        z = torch.randn(len(active), cfg.latent_dim, device=pearl.device)  # the prior
        informed = [j for j, k in enumerate(active) if use_posterior and len(pearl.encoder_data[k]) > 0]
        if informed:
            mu, var = posterior(sac.sub_params(pearl.params(), "encoder"),
                                sample_context(pearl, [active[j] for j in informed]), cfg.latent_dim)  # fmt: skip
            z[informed] = draw_z(mu, var, pearl.device)
        while pearl.venv is None and len(pearl.envs) < (run.env.num_envs or len(active)):
            pearl.envs.append(make_env(run.env))
        seeds = [derive_seed(run.seed, 0, progress.episodes + j) for j in range(len(active))]
        progress.episodes += len(active)
        tasks = [pearl.train_tasks[k] for k in active]
        rollouts = run_tasks(pearl.venv or pearl.envs, tasks, seeds, policy(pearl, z, False), cfg.rl_reward)
        for k, r in zip(active, rollouts, strict=True):
            pearl.replay[k].add(r.experience._replace(reward=critic_reward(r)))
            if to_encoder:
                pearl.encoder_data[k].add(r.experience)
            remaining[k] -= r.experience.rows
            progress.env_steps += r.experience.rows
        results += rollouts
    return results


def collection_round(pearl: PEARL, step: int) -> None:
    """The paper's data collection: on the first step every training task with ``z ~ prior``; then, on
    ``tasks_per_collect`` tasks, the prior, posterior and extra-posterior phases."""
    cfg, n_tasks = pearl.cfg, len(pearl.train_tasks)
    stats: dict[str, float] = {}
    if step == 0:
        stats.update(
            _summary(collect(pearl, list(range(n_tasks)), cfg.initial_steps, False, True), "initial")
        )
    picks = [int(k) for k in pearl.rng.choice(n_tasks, min(cfg.tasks_per_collect, n_tasks), replace=False)]
    for k in picks:
        pearl.encoder_data[k] = ReplayBuffer(cfg.encoder_capacity)  # the encoder trains on recent data only
    phases = (  # (metric key, steps, z from the posterior, into the encoder buffer too)
        ("prior", cfg.prior_steps, False, True),
        ("posterior", cfg.posterior_steps, True, True),
        ("extra", cfg.extra_posterior_steps, True, False),
    )
    for key, steps, use_posterior, to_encoder in phases:
        if picks and steps > 0:
            stats.update(_summary(collect(pearl, picks, steps, use_posterior, to_encoder), key))
    pearl.progress.collected = stats


def loss(pearl: PEARL, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """One trainer step: collect when due, then the SAC and KL losses of ``train.meta_batch`` training tasks."""
    cfg = pearl.cfg
    if step % cfg.collect_every == 0:
        collection_round(pearl, step)
    indices = pearl.rng.integers(
        0, len(pearl.train_tasks), size=pearl.run.train.meta_batch
    )  # with replacement
    context = sample_context(pearl, indices)  # (T, C, context_dim)
    rows = [pearl.replay[k].sample(cfg.batch_size, pearl.rng) for k in indices]
    batch = TaskBatch(*(torch.stack([getattr(r, name) for r in rows]).to(pearl.device)
                        for name in ("obs", "action", "reward", "next_obs", "done")))  # fmt: skip
    losses, kl, metrics = pearl_losses(pearl.params(), pearl.target, context, batch, cfg, pearl.act_dim)
    metrics.update(pearl.progress.collected)
    metrics["train/episodes"] = float(pearl.progress.episodes)
    metrics["train/env_steps"] = float(pearl.progress.env_steps)
    return losses.total() + cfg.kl_lambda * kl, metrics


def after_update(pearl: PEARL, step: int) -> None:
    """Polyak-average the target critics toward the critics."""
    pearl.target.update(sac.polyak_update(pearl.target, pearl.nets.agent.critic_params(), pearl.cfg.sac.tau))


def trial_z(
    pearl: PEARL,
    encoder: Params,
    contexts: Sequence[Sequence[torch.Tensor]],
    prior: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """``(len(contexts), L)``: each trial's ``z`` for its next episode, drawn by ``generator`` in trial order: from
    the prior ``N(0, I)``, or from the posterior of all the trial's transitions so far (``contexts[j]``: one
    ``(N, context_dim)`` tensor per earlier episode of trial ``j``)."""
    latent, device = pearl.cfg.latent_dim, pearl.device
    z = torch.empty(len(contexts), latent, device=device)
    for j, context in enumerate(contexts):
        if prior:
            mu, var = torch.zeros(latent, device=device), torch.ones(latent, device=device)
        else:
            mu, var = posterior(encoder, torch.cat(list(context)), latent)
        z[j] = draw_z(mu, var, device, generator)
    return z


@torch.no_grad()
def trial_returns(pearl: PEARL, part: str, episodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns and successes ``(episodes, eval_adapt_episodes + 1)`` of ``episodes`` trials on ``part``'s tasks."""
    cfg, run = pearl.cfg, pearl.run
    tasks = list(pearl.probe.unwrapped.tasks(part))
    generator = torch.Generator().manual_seed(derive_seed(run.eval.seed, PART_INDEX[part]))
    encoder = sac.sub_params(pearl.params(), "encoder")
    n_episodes, batch = cfg.eval_adapt_episodes + 1, len(pearl.eval_envs)
    returns, successes = np.zeros((episodes, n_episodes)), np.zeros((episodes, n_episodes))
    for start in range(0, episodes, batch):
        trials = list(range(start, min(start + batch, episodes)))
        trial_tasks = [tasks[i % len(tasks)] for i in trials]
        contexts: list[list[torch.Tensor]] = [[] for _ in trials]
        for e in range(n_episodes):
            z = trial_z(pearl, encoder, contexts, e < cfg.eval_prior_episodes, generator)
            seeds = [derive_seed(run.eval.seed, PART_INDEX[part], i, e) for i in trials]
            results = run_tasks(pearl.eval_envs, trial_tasks, seeds, policy(pearl, z, True))
            for j, (i, r) in enumerate(zip(trials, results, strict=True)):
                returns[i, e], successes[i, e] = r.ret, r.success
                contexts[j].append(context_of(pearl, r.experience))
    return returns, successes


OYSTER_STREAM = 7
"""Key that sets the official-code evaluation's seeds and ``z`` draws apart from :func:`trial_returns`'."""


class OysterRuns(NamedTuple):
    """What :func:`oyster_runs` collected: ``R = len(tasks) * oyster_num_evals`` runs, each a list of
    trajectories in the order collected."""

    tasks: list[int]  # (R,) the task of each run
    returns: list[list[float]]  # (R, trajectories of that run) undiscounted env return of each trajectory
    successes: list[list[float]]  # the same shape: success at the end of each trajectory (NaN: not reported)


@torch.no_grad()
def oyster_runs(pearl: PEARL, part: str) -> OysterRuns:
    """PEARL's official evaluation (oyster ``rlkit/core/rl_algorithm.py``, ``MetaRLAlgorithm.collect_paths`` as
    called by ``_do_eval``), ``oyster_num_evals`` runs on every task of ``part``.

    A run starts with no context and ``z`` from the prior (``agent.clear_z``), then collects whole trajectories
    with the mean action until it holds ``oyster_steps_per_eval`` transitions; ``z`` is drawn anew for every
    trajectory (the sampler's ``resample=1``): from the prior for the first ``oyster_exp_traj``, then from the
    posterior of all the run's transitions so far (``infer_posterior(agent.context)`` once
    ``num_trajs >= num_exp_traj_eval``). Runs go ``len(eval_envs)`` at a time in lockstep.
    """
    cfg, run = pearl.cfg, pearl.run
    tasks = [t for t in pearl.probe.unwrapped.tasks(part) for _ in range(cfg.oyster_num_evals)]
    key = (run.eval.seed, PART_INDEX[part], OYSTER_STREAM)
    generator = torch.Generator().manual_seed(derive_seed(*key))
    encoder = sac.sub_params(pearl.params(), "encoder")
    out = OysterRuns(tasks, [[] for _ in tasks], [[] for _ in tasks])
    for start in range(0, len(tasks), len(pearl.eval_envs)):
        runs = range(start, min(start + len(pearl.eval_envs), len(tasks)))
        contexts: dict[int, list[torch.Tensor]] = {i: [] for i in runs}
        steps = dict.fromkeys(runs, 0)
        e = 0  # the trajectory index, the same for every run still collecting
        while active := [i for i in runs if steps[i] < cfg.oyster_steps_per_eval]:
            z = trial_z(pearl, encoder, [contexts[i] for i in active], e < cfg.oyster_exp_traj, generator)
            seeds = [derive_seed(*key, i, e) for i in active]
            results = run_tasks(pearl.eval_envs, [tasks[i] for i in active], seeds, policy(pearl, z, True))
            for i, r in zip(active, results, strict=True):
                out.returns[i].append(r.ret)
                out.successes[i].append(r.success)
                contexts[i].append(context_of(pearl, r.experience))
                steps[i] += r.experience.rows
            e += 1
    return out


def oyster_metrics(runs: OysterRuns, part: str) -> dict[str, float]:
    """The official code's logged test metric and online returns (``_do_eval`` and ``evaluate``), from
    :func:`oyster_runs`:

    - ``<part>/oyster_return``: ``AverageReturn_all_test_tasks``, the mean over tasks of the mean over a task's
      runs of its *last* trajectory's return (``_ci95``: over tasks);
    - ``<part>/oyster_return_traj{k}``: the official ``online-test`` returns, of trajectory ``k`` (after ``k``
      earlier ones; mean over runs, then tasks) for ``k`` below the fewest trajectories of any run;
    - ``<part>/oyster_success``: success at the end of the last trajectory, the same mean (metalab's, the
      official code has no success metric; only for envs that report it).
    """
    by_task: dict[int, list[int]] = {}
    for i, task in enumerate(runs.tasks):
        by_task.setdefault(task, []).append(i)
    n = min(len(r) for r in runs.returns)

    def task_means(values: list[list[float]], k: int) -> list[float]:
        return [float(np.mean([values[i][k] for i in ids])) for ids in by_task.values()]

    est = mean_ci95(task_means(runs.returns, -1))
    metrics = {f"{part}/oyster_return": est.mean, f"{part}/oyster_return_ci95": est.ci95}
    for k in range(n):
        metrics[f"{part}/oyster_return_traj{k}"] = float(np.mean(task_means(runs.returns, k)))
    if not any(math.isnan(s[-1]) for s in runs.successes):
        metrics[f"{part}/oyster_success"] = float(np.mean(task_means(runs.successes, -1)))
    return metrics


def evaluate(pearl: PEARL, part: str, episodes: int) -> dict[str, float]:
    """``<part>/{return,success}_after{k}`` (mean and 95% CI over trials), and the last episode's as
    ``<part>/return`` and ``<part>/success``; with ``oyster_num_evals``, also the official code's metrics
    (:func:`oyster_metrics`, on all of the part's tasks whatever ``episodes``)."""
    returns, successes = trial_returns(pearl, part, episodes)
    metrics: dict[str, float] = {}
    columns = {"return": returns, "success": successes}
    if np.isnan(successes).any():  # the env does not report success
        del columns["success"]
    for name, values in columns.items():
        for e in range(values.shape[1]):
            est = mean_ci95(values[:, e].tolist())
            metrics[f"{part}/{name}_after{e}"], metrics[f"{part}/{name}_after{e}_ci95"] = est.mean, est.ci95
        # <part>/return, <part>/success: the trial's last episode
        metrics[f"{part}/{name}"], metrics[f"{part}/{name}_ci95"] = est.mean, est.ci95
    if pearl.cfg.oyster_num_evals > 0:
        metrics.update(oyster_metrics(oyster_runs(pearl, part), part))
    return metrics


def state(pearl: PEARL) -> dict[str, Any]:
    """What a checkpoint needs beyond the networks: target critics, buffers, RNG and counters."""
    return {
        "target": {k: v.detach().clone() for k, v in pearl.target.items()},
        "replay": [b.state() for b in pearl.replay],
        "encoder_data": [b.state() for b in pearl.encoder_data],
        "rng": pearl.rng.bit_generator.state,
        "episodes": pearl.progress.episodes,
        "env_steps": pearl.progress.env_steps,
        "collected": dict(pearl.progress.collected),
    }


def load_state(pearl: PEARL, saved: dict[str, Any]) -> None:
    pearl.target.update({k: v.to(pearl.device) for k, v in saved["target"].items()})
    for buffers, key in ((pearl.replay, "replay"), (pearl.encoder_data, "encoder_data")):
        if len(saved[key]) != len(buffers):
            raise ValueError(f"checkpoint has {len(saved[key])} task buffers, this run {len(buffers)}")
        for b, s in zip(buffers, saved[key], strict=True):
            b.load_state(s)
    pearl.rng.bit_generator.state = saved["rng"]
    pearl.progress = Progress(int(saved["episodes"]), int(saved["env_steps"]), dict(saved["collected"]))


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """Networks, per-task buffers, envs and the trainer hooks of a PEARL run (``data_root`` is unused)."""
    cfg: Config = run.params
    probe = _checked_env(run)
    train_tasks = list(probe.unwrapped.tasks("train"))
    obs_dim, _ = dims(probe)
    act_dim = int(np.prod(probe.action_space.shape))
    context_dim = 2 * obs_dim + act_dim + 1 if cfg.next_obs_in_context else obs_dim + act_dim + 1
    nets = PEARLNets(obs_dim, act_dim, context_dim, cfg).to(device)
    nets.agent.log_alpha.requires_grad_(cfg.sac.auto_alpha)
    vector = run.env.vector != "loop"  # collection through one gymnasium vector env, or a list of envs
    pearl = PEARL(
        run, cfg, device, probe, train_tasks, act_dim, nets,
        target={k: v.detach().clone() for k, v in nets.agent.critic_params().items()},
        replay=[ReplayBuffer(cfg.buffer_size) for _ in train_tasks],
        encoder_data=[ReplayBuffer(cfg.encoder_capacity) for _ in train_tasks],
        rng=np.random.default_rng(derive_seed(run.seed, 1)),
        envs=[probe],
        venv=make_vector_env(run.env, run.env.num_envs or cfg.tasks_per_collect) if vector else None,
        eval_envs=[make_env(run.env) for _ in range(min(run.eval.batch, run.eval.episodes))],
    )  # fmt: skip
    trainable = [p for p in nets.parameters() if p.requires_grad]
    return Learner(nets, partial(loss, pearl), partial(evaluate, pearl), parameters=trainable,
                   state=partial(state, pearl), load_state=partial(load_state, pearl),
                   after_update=partial(after_update, pearl))  # fmt: skip
