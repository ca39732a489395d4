"""MAML-RL (Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017,
sec. 5.3): a Gaussian policy initialisation from which one policy-gradient step on a few episodes of a new task
makes a good policy for it.

One meta-iteration (one trainer step), for ``train.meta_batch`` training tasks at once:

1. Sample ``trajectories`` episodes per task with the current parameters ``theta`` (all tasks' episodes in
   lockstep through :func:`metalab.rl.rollout.run_episodes`, or a gymnasium vector env).
2. Inner step (:func:`~metalab.rl.policy_gradient.inner_step`): ``theta'_i = theta - inner_lr * grad L_i(theta)``,
   where ``L_i`` is the REINFORCE surrogate ``-mean_t log pi(a_t | s_t) A_t``
   (:func:`~metalab.rl.policy_gradient.pg_surrogate`) on task ``i``'s episodes and the advantages ``A_t`` are
   discounted rewards-to-go minus a linear feature baseline (:func:`~metalab.rl.policy_gradient.advantages`),
   standardised per task. With ``inner_steps`` > 1, new episodes are sampled at each adapted parameters.
3. Sample ``trajectories`` episodes per task with ``theta'_i``.
4. Outer loss: the likelihood-ratio surrogate ``-mean_t pi_{theta'_i}(a_t | s_t) / pi_old(a_t | s_t) A_t`` of
   those episodes, averaged over tasks and differentiated through step 2 to ``theta`` (second order, unless
   ``first_order``); the trainer takes one Adam step on it (``train.lr``), or, with ``outer: trpo``, the
   learner takes one TRPO step on it itself (:func:`trpo_update`).

All tasks are adapted at once with ``torch.func.vmap`` over per-task parameters, using the shared
:func:`metalab.meta.adapt.adapt`; training and evaluation take the same inner step. The policy and the
policy-gradient math (log-density, advantages, surrogates, inner step, outer loss, TRPO's KL) are in
:mod:`metalab.rl.policy_gradient`; this module samples the episodes, runs the meta-iteration and evaluates.

Objectives (``objective``). ``maml``: the paper's, the inner surrogate ``log pi * A`` whose Hessian
``sum_t A_t H log pi`` ignores that the inner batch was sampled from ``pi_theta``. ``promp``: ProMP's low-variance
curvature estimator (LVC; Rothfuss, Lee, Clavera, Asfour, Abbeel, "ProMP: Proximal Meta-Policy Search", ICLR 2019,
eq. 4), the inner surrogate ``pi / stop_grad(pi) * A``, a DiCE-style per-step ratio: the same gradient, and a
Hessian with the extra ``sum_t A_t grad log pi grad log pi^T`` of the sampling distribution.

Choices and their sources (the paper's code = github.com/cbfinn/maml_rl: ``maml_examples/maml_trpo_point.py``,
``sandbox/rocky/tf/algos/maml_npo.py``, ``batch_maml_polopt.py``, ``policies/maml_minimal_gauss_mlp_policy.py``,
``rllab/baselines/linear_feature_baseline.py``, ``rllab/sampler/base.py``):

- Policy: a Gaussian with mean MLP 100-100 ReLU (Xavier weights, zero biases) and a state-independent
  ``log_std`` (initial std 1), acting in ``[-1, 1]^A``, mapped linearly onto the env's box and clipped (the
  paper's ``normalize`` wrapper). Both the mean network and ``log_std`` are adapted.
- Inner surrogate: a mean over all time steps of the task's episodes (``tf.reduce_mean``); advantages with
  ``gamma`` 0.99 and GAE lambda 1 (``G_t - b_t``), standardised per task (``center_adv``).
- Baseline: least squares with ridge ``1e-5`` on ``[o, o^2, t, t^2, t^3, 1]`` (``o`` clipped to +-10,
  ``t`` = step / 100), fitted per task on the batch it is used for. The paper's code predicts with the fit of
  the previously processed batch (one baseline shared by all tasks); ProMP's code fits on the batch itself.
- Outer optimiser (``outer``): ``adam``, one Adam step per meta-iteration on the likelihood-ratio surrogate,
  whose gradient is the policy gradient at ``theta'`` chained through the inner step; or ``trpo``, the paper's
  (``maml_npo.py``, rllab's ``ConjugateGradientOptimizer``; :func:`trpo_update`): the surrogate minimised
  subject to ``mean KL(pi_{theta'_old} || pi_{theta'}) <= max_kl`` on the post-update steps, through the inner
  step; conjugate gradient (rllab's 10 iterations, damping 1e-5) on exact Hessian-vector products of the KL
  (the paper's code: finite differences), then a backtracking line search (0.8, 15 sizes), else no step.
- Evaluation (:func:`evaluate`): per held-out task, ``eval_inner_steps`` inner steps, each on
  ``trajectories`` new episodes of the current parameters; the first with ``inner_lr``, later ones with
  ``inner_lr * later_lr_scale`` (the paper's A.2: 0.1, then halved). Metrics ``<part>/return_after{k}`` are
  the mean undiscounted return of the episodes sampled after ``k`` steps (``<part>/distance_after{k}``: the
  final value of ``info[final_info]``), ``<part>/return`` after one. The paper's evaluation code samples 40
  episodes per step (``test_maml_point.py``); here ``trajectories``, as in training.

Exact resume: training tasks and episode seeds derive from (seed, step), action noise from torch's global RNG
(checkpointed by the trainer), and evaluation has its own generator; the only extra state is an env-step count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch.func import vmap

from metalab.config import MAX_EPISODES, MAX_INNER_STEPS, require, require_between, require_widths
from metalab.envs.config import make_env, make_vector_env
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.models.mlp import mlp_forward
from metalab.rl.pearl import to_box
from metalab.rl.policy_gradient import (
    Batch,
    GaussianPolicy,
    Rollouts,
    advantages,
    expand,
    inner_steps,
    log_prob,
    outer_loss,
    policy_kl,
)
from metalab.rl.rollout import Act, derive_seed, dims, is_goal_env, run_episodes, run_vector_episodes
from metalab.rl.sac import sub_params
from metalab.rl.trpo import trpo_step
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX
from metalab.train.loop import Learner
from metalab.utils import Params

OBJECTIVES = ("maml", "promp")
OUTER = ("adam", "trpo")


@dataclass(frozen=True)
class Config:
    """MAML-RL hyperparameters (the ``maml_rl`` section of a config); defaults are the paper's for 2D navigation.

    ``train.meta_batch`` is the number of tasks per meta-iteration (paper: 20), ``train.lr`` the outer Adam rate
    (unused with ``outer: trpo``).
    """

    trajectories: int = 20
    """Episodes per task for each inner step and for the post-update batch (the paper's ``fast_batch_size``)."""
    inner_lr: float = 0.1
    """Inner (fast) policy-gradient step size (paper, A.2: 0.1)."""
    inner_steps: int = 1
    """Inner steps during meta-training, each on new episodes of the current adapted parameters (paper: 1).
    0: no adaptation in training, the paper's *pretrained* baseline (one policy trained by the policy gradient
    on all training tasks at once), adapted only at evaluation, by the same steps as MAML."""
    first_order: bool = False
    """Treat the inner gradients as constants: the outer gradient is the post-update one (no second order)."""
    objective: Literal["maml", "promp"] = "maml"
    """Inner surrogate: ``maml`` (``log pi * A``, the paper's) or ``promp`` (ProMP's LVC, ``pi / stop_grad(pi) * A``:
    the same inner gradient, a lower-variance estimate of its Hessian)."""
    gamma: float = 0.99
    """Discount of the rewards-to-go behind the advantages."""
    hidden: tuple[int, ...] = (100, 100)
    """Hidden layer widths of the policy's mean MLP (ReLU)."""
    init_log_std: float = 0.0
    """Initial log standard deviation of the Gaussian (in the ``[-1, 1]`` action scale)."""
    normalize_advantages: bool = True
    """Standardise advantages per task (the paper's ``center_adv``); the inner step size assumes it."""
    baseline_reg: float = 1e-5
    """Ridge coefficient of the linear feature baseline's least squares."""
    eval_inner_steps: int = 3
    """Evaluation: inner steps on held-out tasks (metrics ``<part>/return_after0`` ... ``_after{this}``)."""
    later_lr_scale: float = 0.5
    """Evaluation: inner steps after the first take ``inner_lr`` times this (paper, A.2: halved)."""
    final_info: str | None = "distance"
    """An ``info`` key whose value at an episode's last step is reported like the return
    (``<part>/distance_after{k}``); null: none."""
    outer: Literal["adam", "trpo"] = "adam"
    """Outer optimiser: ``adam`` (the trainer's, at ``train.lr``) or ``trpo`` (the paper's KL-constrained step,
    :func:`trpo_update`; logs ``train/kl``, ``train/surrogate_gain``, ``train/line_search_steps``)."""
    max_kl: float = 0.01
    """TRPO: the bound on the mean KL between the adapted policies before and after the step (paper: 0.01)."""
    cg_iters: int = 10
    """TRPO: conjugate-gradient iterations for the search direction (rllab: 10)."""
    cg_damping: float = 1e-5
    """TRPO: ``damping * I`` added to the KL's Hessian in the conjugate gradient (rllab's ``reg_coeff``: 1e-5)."""
    line_search_steps: int = 15
    """TRPO: step sizes the line search tries before it rejects the step (rllab's ``max_backtracks``: 15)."""
    backtrack_ratio: float = 0.8
    """TRPO: the factor between the line search's successive step sizes (rllab: 0.8)."""

    def __post_init__(self) -> None:
        require_between(self.trajectories, "trajectories", 1, MAX_EPISODES)
        require(self.inner_lr > 0, "inner_lr", f"must be > 0, got {self.inner_lr}")
        require_between(self.inner_steps, "inner_steps", 0, MAX_INNER_STEPS)
        require(self.objective in OBJECTIVES, "objective",
                f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")  # fmt: skip
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        require_widths(self.hidden, "hidden")
        require(
            abs(self.init_log_std) <= 10, "init_log_std", f"must be in [-10, 10], got {self.init_log_std}"
        )
        require(self.baseline_reg >= 0, "baseline_reg", f"must be >= 0, got {self.baseline_reg}")
        require_between(self.eval_inner_steps, "eval_inner_steps", 0, MAX_INNER_STEPS)
        require(self.later_lr_scale > 0, "later_lr_scale", f"must be > 0, got {self.later_lr_scale}")
        require(
            self.final_info is None or bool(self.final_info), "final_info", "must name an info key or be null"
        )
        require(self.outer in OUTER, "outer", f"must be one of {', '.join(OUTER)}, got {self.outer!r}")
        require(self.max_kl > 0, "max_kl", f"must be > 0, got {self.max_kl}")
        require_between(self.cg_iters, "cg_iters", 1, MAX_INNER_STEPS)
        require(self.cg_damping >= 0, "cg_damping", f"must be >= 0, got {self.cg_damping}")
        require_between(self.line_search_steps, "line_search_steps", 1, MAX_INNER_STEPS)
        require(
            0 < self.backtrack_ratio < 1, "backtrack_ratio", f"must be in (0, 1), got {self.backtrack_ratio}"
        )


# --- episodes -------------------------------------------------------------------------------------------------


@dataclass
class MAMLRL:
    """Everything a MAML-RL run holds: the policy, envs and an env-step count."""

    run: RunConfig
    cfg: Config
    device: torch.device
    policy: GaussianPolicy
    probe: gym.Env
    """The first env: its ``tasks(split)`` name the training, val and test tasks."""
    envs: list[gym.Env]
    """Envs stepped in lockstep (``env.vector: loop``), made as needed; unused with ``venv``."""
    venv: gym.vector.VectorEnv | None
    counters: dict[str, int] = field(default_factory=lambda: {"env_steps": 0})

    def params(self) -> Params:
        return dict(self.policy.named_parameters())


def sampler(params: Params, per_task: int, generator: torch.Generator | None = None) -> Act:
    """Episode ``i`` acts with task ``i // per_task``'s parameters (``params`` are ``(T, ...)``): actions
    ``mean + std * noise``, the noise from ``generator`` (evaluation) or torch's global RNG (training)."""
    tasks, act_dim = params["log_std"].shape
    device = params["log_std"].device
    mean_fn = vmap(mlp_forward)  # per-task parameters, per-task observations

    def act(obs: np.ndarray, goal: np.ndarray, live: list[int]) -> np.ndarray:
        x = torch.zeros(tasks * per_task, obs.shape[1], device=device)  # rows of finished episodes stay 0
        x[live] = torch.from_numpy(obs).to(device)
        with torch.no_grad():
            mean = mean_fn(sub_params(params, "mean"), x.view(tasks, per_task, -1)).reshape(-1, act_dim)[live]
            std = params["log_std"].exp().repeat_interleave(per_task, 0)[live]  # (E, A)
        noise = torch.randn(len(live), act_dim, generator=generator).to(device)
        return (mean + std * noise).cpu().numpy()

    return act


def collect(
    ml: MAMLRL,
    params: Params,
    tasks: Sequence[int],
    seeds: Sequence[int],
    generator: torch.Generator | None = None,
) -> Rollouts:
    """``trajectories`` episodes on each of ``tasks`` with that task's ``params (T, ...)``, all in lockstep."""
    k, final_info = ml.cfg.trajectories, ml.cfg.final_info
    episode_tasks = [t for t in tasks for _ in range(k)]
    act = sampler({n: p.detach() for n, p in params.items()}, k, generator)
    if ml.venv is not None:
        results = run_vector_episodes(ml.venv, act, seeds, episode_tasks, final_info, to_box)
    else:
        while len(ml.envs) < (ml.run.env.num_envs or len(seeds)):
            ml.envs.append(make_env(ml.run.env))
        results = run_episodes(ml.envs, act, seeds, episode_tasks, final_info, to_box)
    n, h = len(results), max(r.experience.rows for r in results)  # episodes, longest episode
    obs = np.zeros((n, h, results[0].experience.obs.shape[1]), np.float32)
    action = np.zeros((n, h, results[0].experience.action.shape[1]), np.float32)
    reward, mask = np.zeros((n, h), np.float32), np.zeros((n, h), np.float32)
    for i, r in enumerate(results):
        e, rows = r.experience, r.experience.rows
        obs[i, :rows], action[i, :rows], reward[i, :rows], mask[i, :rows] = e.obs, e.action, e.reward, 1.0
    ml.counters["env_steps"] += int(mask.sum())

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(ml.device).view(len(tasks), k, *x.shape[1:])

    returns = np.array([r.ret for r in results]).reshape(len(tasks), k)
    final = np.array([r.info[-1] for r in results]).reshape(len(tasks), k) if final_info else None
    return Rollouts(tensor(obs), tensor(action), tensor(reward), tensor(mask), returns, final)


def to_batch(ml: MAMLRL, rollouts: Rollouts, params: Params) -> Batch:
    """A :class:`~metalab.rl.policy_gradient.Batch` of ``rollouts`` sampled with ``params (T, ...)``: advantages
    and old log-probabilities."""
    cfg = ml.cfg
    adv = advantages(rollouts, cfg.gamma, cfg.baseline_reg, cfg.normalize_advantages)
    tasks = rollouts.mask.shape[0]
    obs = rollouts.obs.reshape(tasks, -1, rollouts.obs.shape[-1])  # (T, N, obs_dim)
    action = rollouts.action.reshape(tasks, -1, rollouts.action.shape[-1])  # (T, N, A)
    with torch.no_grad():
        old = vmap(log_prob)({n: p.detach() for n, p in params.items()}, obs, action)  # (T, N)
    return Batch(obs, action, adv.reshape(tasks, -1), rollouts.mask.reshape(tasks, -1), old)


def _summary(rollouts: Rollouts, steps: int, final_info: str | None) -> dict[str, float]:
    """``train/return_after{steps}`` (and ``train/<final_info>_after{steps}``): means over all episodes."""
    out = {f"train/return_after{steps}": float(rollouts.returns.mean())}
    if rollouts.final is not None:
        out[f"train/{final_info}_after{steps}"] = float(rollouts.final.mean())
    return out


# --- trainer hooks --------------------------------------------------------------------------------------------


def loss(ml: MAMLRL, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
    """One meta-iteration: sample, adapt (``inner_steps``), sample again, and return the outer loss; with
    ``outer: trpo``, take the TRPO step here (:func:`trpo_update`) and return None (no step of the trainer's)."""
    cfg, run = ml.cfg, ml.run
    train_tasks = ml.probe.unwrapped.tasks("train")
    rng = np.random.default_rng(derive_seed(run.seed, 1, step))
    tasks = [train_tasks[i] for i in rng.choice(len(train_tasks), run.train.meta_batch, replace=False)]
    n_episodes = len(tasks) * cfg.trajectories
    adapted = expand(ml.params(), len(tasks))
    metrics: dict[str, float] = {}
    pre: list[Batch] = []
    for s in range(cfg.inner_steps + 1):
        rollouts = collect(
            ml, adapted, tasks, [derive_seed(run.seed, 0, step, s, i) for i in range(n_episodes)]
        )
        batch = to_batch(ml, rollouts, adapted)
        metrics.update(_summary(rollouts, s, cfg.final_info))
        if s < cfg.inner_steps:
            pre.append(batch)
            adapted = inner_steps(adapted, batch, cfg.inner_lr, cfg.objective, cfg.first_order)
    total = outer_loss(adapted, batch)
    metrics.update({
        "loss/outer": total.item(),
        "train/log_std": ml.params()["log_std"].mean().item(),
        "train/env_steps": float(ml.counters["env_steps"]),
    })  # fmt: skip
    if cfg.outer == "trpo":
        metrics.update(trpo_update(ml, total, adapted, pre, batch))
        return None, metrics
    return total, metrics


def trpo_update(
    ml: MAMLRL, total: torch.Tensor, adapted: Params, pre: list[Batch], post: Batch
) -> dict[str, float]:
    """The paper's outer step, in place on the policy: minimise the outer loss ``total``
    (:func:`~metalab.rl.policy_gradient.outer_loss` at ``adapted``, with its graph to the policy's parameters)
    subject to ``policy_kl(adapted_old, adapted) <= max_kl``, with the adapted parameters recomputed from
    candidate policy parameters by the same inner steps on the same ``pre`` batches
    (:func:`metalab.rl.trpo.trpo_step`). Returns ``train/kl`` (the mean KL the step
    ends with), ``train/surrogate_gain`` (the decrease of the outer loss), ``train/line_search_steps``
    (backtracks before the accepted step; ``line_search_steps`` when it was rejected) and ``train/trpo_accepted``."""
    cfg, names = ml.cfg, list(ml.params())
    old = {n: p.detach() for n, p in adapted.items()}

    def evaluate(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        candidate = expand(dict(zip(names, values, strict=True)), post.obs.shape[0])
        for batch in pre:
            candidate = inner_steps(candidate, batch, cfg.inner_lr, cfg.objective, cfg.first_order)
        return outer_loss(candidate, post), policy_kl(old, candidate, post)

    result = trpo_step(list(ml.params().values()), total, policy_kl(old, adapted, post), evaluate,
                       max_kl=cfg.max_kl, cg_iters=cfg.cg_iters, damping=cfg.cg_damping,
                       backtrack_ratio=cfg.backtrack_ratio, max_backtracks=cfg.line_search_steps)  # fmt: skip
    return {
        "train/kl": result.kl,
        "train/surrogate_gain": result.loss_before - result.loss_after,
        "train/line_search_steps": float(result.backtracks),
        "train/trpo_accepted": float(result.accepted),
    }


def adaptation_curve(ml: MAMLRL, part: str, episodes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns (and final ``info[final_info]``) ``(episodes, eval_inner_steps + 1)`` of ``episodes`` trials on
    ``part``'s tasks (trial ``i`` on task ``i`` mod their number): the mean over ``trajectories`` episodes
    sampled after ``k`` inner steps, each step on the episodes sampled before it."""
    cfg, run = ml.cfg, ml.run
    part_tasks = ml.probe.unwrapped.tasks(part)
    generator = torch.Generator().manual_seed(derive_seed(run.eval.seed, PART_INDEX[part]))
    columns = cfg.eval_inner_steps + 1
    returns = np.zeros((episodes, columns))
    final = np.zeros((episodes, columns)) if cfg.final_info else None
    for start in range(0, episodes, run.eval.batch):
        trials = list(range(start, min(start + run.eval.batch, episodes)))
        tasks = [part_tasks[i % len(part_tasks)] for i in trials]
        params = {n: p.detach() for n, p in expand(ml.params(), len(trials)).items()}
        for s in range(columns):
            seeds = [
                derive_seed(run.eval.seed, PART_INDEX[part], i, s, j)
                for i in trials
                for j in range(cfg.trajectories)
            ]
            rollouts = collect(ml, params, tasks, seeds, generator)
            returns[trials, s] = rollouts.returns.mean(1)
            if final is not None:
                final[trials, s] = rollouts.final.mean(1)
            if s < cfg.eval_inner_steps:
                lr = cfg.inner_lr if s == 0 else cfg.inner_lr * cfg.later_lr_scale
                batch = to_batch(ml, rollouts, params)
                params = {n: p.detach() for n, p in inner_steps(params, batch, lr, cfg.objective).items()}
    return returns, final


FEW_TASKS = 4
"""A part with at most this many tasks (the half-cheetah's two directions) also gets per-task metrics."""


def evaluate(ml: MAMLRL, part: str, episodes: int) -> dict[str, float]:
    """``<part>/return_after{k}`` and ``<part>/<final_info>_after{k}`` (mean and 95% CI over trials) for
    ``k = 0 .. eval_inner_steps``; ``<part>/return`` (and ``<part>/<final_info>``) after one step. A part of at
    most :data:`FEW_TASKS` tasks also gets them per task, ``<part>/task<t>/...`` (e.g. forward vs backward)."""
    env_steps = ml.counters["env_steps"]
    returns, final = adaptation_curve(ml, part, episodes)
    ml.counters["env_steps"] = env_steps  # evaluation episodes are not training experience
    columns = {"return": returns} | ({ml.cfg.final_info: final} if final is not None else {})
    metrics = _curve_metrics(part, columns)
    part_tasks = ml.probe.unwrapped.tasks(part)
    if len(part_tasks) <= FEW_TASKS:
        trial_task = np.array([part_tasks[i % len(part_tasks)] for i in range(episodes)])
        for task in part_tasks:
            rows = trial_task == task
            if not rows.any():  # fewer trials than tasks
                continue
            metrics |= _curve_metrics(f"{part}/task{task}", {n: v[rows] for n, v in columns.items()})
    return metrics


def _curve_metrics(prefix: str, columns: dict[str, np.ndarray]) -> dict[str, float]:
    """``<prefix>/<name>_after{k}`` with its CI over the rows of each ``(trials, k)`` column, and the headline
    ``<prefix>/<name>`` after one step."""
    metrics: dict[str, float] = {}
    for name, values in columns.items():
        for k in range(values.shape[1]):
            est = mean_ci95(values[:, k].tolist())
            metrics[f"{prefix}/{name}_after{k}"], metrics[f"{prefix}/{name}_after{k}_ci95"] = (
                est.mean,
                est.ci95,
            )
        headline = min(1, values.shape[1] - 1)
        metrics[f"{prefix}/{name}"] = metrics[f"{prefix}/{name}_after{headline}"]
        metrics[f"{prefix}/{name}_ci95"] = metrics[f"{prefix}/{name}_after{headline}_ci95"]
    return metrics


def state(ml: MAMLRL) -> dict[str, Any]:
    """Beyond the policy, optimiser and RNGs (the trainer's): the env-step count."""
    return dict(ml.counters)


def load_state(ml: MAMLRL, saved: dict[str, Any]) -> None:
    ml.counters.update({k: int(v) for k, v in saved.items()})


def _checked_env(run: RunConfig) -> gym.Env:
    """``run``'s env, refused by name unless it is a multi-task env with Box actions (and ``final_info``)."""
    cfg: Config = run.params
    probe = make_env(run.env)
    if not isinstance(probe.action_space, spaces.Box):
        raise ConfigError(
            "env.id", f"MAML-RL needs continuous (Box) actions; {run.env.id} has {probe.action_space}"
        )
    if is_goal_env(probe) or not callable(getattr(probe.unwrapped, "tasks", None)):
        raise ConfigError("env.id", f"MAML-RL needs a multi-task env with tasks(split) and reset(options={{'task': "
                          f"i}}), observations a plain Box; {run.env.id} is not one")  # fmt: skip
    n_train = len(probe.unwrapped.tasks("train"))
    require(run.train.meta_batch <= n_train, "train.meta_batch",
            f"{run.train.meta_batch} tasks per meta-iteration, but {run.env.id} has {n_train} training tasks")  # fmt: skip
    if cfg.final_info is not None:  # a typo fails here, not at the first episode's end
        probe.reset(seed=0)
        info = probe.step(probe.action_space.sample())[4]
        if cfg.final_info not in info:
            raise ConfigError(
                "maml_rl.final_info", f"the env's info has no {cfg.final_info!r}; keys: {sorted(info)}"
            )
    return probe


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """Policy, envs and the trainer hooks of a MAML-RL run (``data_root`` is unused)."""
    cfg: Config = run.params
    probe = _checked_env(run)
    obs_dim, _ = dims(probe)
    act_dim = int(np.prod(probe.action_space.shape))
    policy = GaussianPolicy(obs_dim, cfg.hidden, act_dim, cfg.init_log_std).to(device)
    venv = None
    if run.env.vector != "loop":
        venv = make_vector_env(run.env, run.env.num_envs or run.train.meta_batch * cfg.trajectories)
    ml = MAMLRL(run, cfg, device, policy, probe, envs=[probe], venv=venv)
    return Learner(policy, partial(loss, ml), partial(evaluate, ml), state=partial(state, ml),
                   load_state=partial(load_state, ml))  # fmt: skip
