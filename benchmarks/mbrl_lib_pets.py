"""The peers of ``benchmarks.mbrl``'s ``pets-pendulum``, ``pets-cartpole-swingup`` and ``pets-half-cheetah``:
mbrl-lib's PETS (Pineda et al. 2021, package ``mbrl``) on Pendulum-v1, metalab's cart-pole swing-up or
HalfCheetah-v5 (``--task``) at the same budget. Runs inside a separate environment that has mbrl-lib (it does
not install beside metalab: see ``benchmarks.mbrl``), imports from metalab only the cart-pole swing-up env and
its reward (mbrl-lib's PETS cart-pole is a MuJoCo model of other sizes), and prints one JSON line of results. mbrl-lib is imported inside :func:`main` only, so metalab's
tests can check the settings here against metalab's configs.

    .venv-mbrl/bin/python -m benchmarks.mbrl_lib_pets --task half-cheetah --seed 0 --test-seeds 11 12
    .venv-mbrl/bin/python -m benchmarks.mbrl_lib_pets --task half-cheetah --seed 0 --test-seeds 11 \
        --episodes 2 --episode-steps 60                  # a smoke run: 120 env steps, about a minute

mbrl-lib's PETS loop (``mbrl.algorithms.pets.train``), written out with its components so that the trained
agent can then be tested: its ``GaussianMLP`` ensemble, ``ModelTrainer``, ``ModelEnv``, replay buffer, and
``TrajectoryOptimizerAgent`` with its CEM; one random episode, then a refit before every MPC episode (PETS:
``freq_train_model`` = the trial length), fixed log-variance bounds, TSinf propagation (mbrl-lib:
``fixed_model``), CEM's momentum 0.1. Per task (:data:`TASKS`), metalab's config where both libraries have the
knob and mbrl-lib's own PETS override of a similar task for model training:

- ``pendulum``: ``configs/mbrl_pendulum.yaml``: 5 members of 64 SiLU units, 10 particles, CEM of 5 rounds of
  200 sequences of 25 actions with 20 elites, 11 episodes of 200 steps (2,200 env steps); but 4 hidden layers,
  where metalab's have 3 (mbrl-lib's ``num_layers`` counts hidden layers; kept as first recorded). Model training
  from ``pets_inv_pendulum``: Adam at 1.43e-3, weight decay 3.3e-5, minibatches of 256, 20% held out for early
  stopping with patience 50, at most 31 epochs per fit. The reward sees the next observation (mbrl-lib's
  signature is ``reward(action, next_obs)``): Pendulum's cost on the next state's angle and velocity, where
  metalab's uses the state before the step.
- ``cartpole-swingup``: ``configs/mbrl_cartpole_swingup.yaml``: 5 members of 3 x 64 SiLU units, 10 particles,
  CEM of 5 rounds of 200 sequences of 25 actions with 20 elites, 16 episodes of 200 steps (3,200 env steps).
  Model training from ``pets_cartpole_paper_version`` (mbrl-lib's settings for PETS's own swing-up task; its
  ``pets_cartpole`` is the balancing task): Adam at 1e-4, weight decay 3e-5, minibatches of 256, no held-out
  data, 25 epochs per fit (patience 25). The reward is metalab's
  (:func:`metalab.rl.env_models.cartpole_swingup_reward`), a function of the next observation and the action.
- ``cartpole-swingup-metalab-fit``: the same, with metalab's model training (Adam at 1e-3, no weight decay,
  minibatches of 32, and as many epochs over the ``n`` transitions at each fit as make metalab's 1,000
  updates), a labelled peer that tells PETS apart from the training settings.
- ``half-cheetah``: ``configs/mbrl_half_cheetah.yaml``: 5 members of 3 x 200 SiLU units, 10 particles, CEM of 5
  rounds of 100 sequences of 30 actions with 10 elites, 7 episodes of 1,000 steps (7,000 env steps). Model
  training from ``pets_halfcheetah``: Adam at 2.8e-4, weight decay 1e-4, minibatches of 32, no held-out data,
  12 epochs per fit (patience 12). The env is wrapped as metalab's planner env is (:class:`ForwardVelocity`:
  the step's forward velocity appended to the observation), so the planning reward
  (:func:`half_cheetah_reward`) is the env's own, read from ``next_obs``; every entry, that one included, is
  predicted as a change, as metalab does (mbrl-lib's own half-cheetah predicts its velocity entry directly,
  leaves it out of the model's input and feeds the root angle as its sine and cosine: not done here, so both
  libraries learn the same model).

A planning call at the half-cheetah sizes costs 0.47 s on one thread of the CPU that measured metalab's 0.44 s
(busy with two other jobs), so a seed takes about as long as ``pets-half-cheetah``'s: about an hour.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch


def pendulum_reward(action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's reward on the next observation ``(cos, sin, thetadot)``: ``(N, 1)``."""
    theta = torch.atan2(next_obs[:, 1], next_obs[:, 0])
    torque = action[:, 0].clamp(-2.0, 2.0)
    return -(theta**2 + 0.1 * next_obs[:, 2] ** 2 + 0.001 * torque**2)[:, None]


def cartpole_swingup_reward(action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    """metalab's cart-pole swing-up reward in mbrl-lib's signature: ``(N, 1)``."""
    from metalab.rl.env_models import cartpole_swingup_reward as reward

    return reward(None, action, next_obs)[:, None]


HALF_CHEETAH_FORWARD = 17
"""Index of the step's forward velocity in the observation of :class:`ForwardVelocity` around HalfCheetah-v5."""


def half_cheetah_reward(action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    """HalfCheetah-v5's reward (its default weights): the step's forward velocity, read from the observation
    entry :class:`ForwardVelocity` appends, minus ``0.1 |a|^2``: ``(N, 1)``."""
    return (next_obs[:, HALF_CHEETAH_FORWARD] - 0.1 * action.square().sum(1))[:, None]


class ForwardVelocity(gym.Wrapper):
    """Appends the root's forward velocity over the last step, HalfCheetah's ``info["x_velocity"]`` (the reward's
    forward term), to each observation; after a reset, the root's x-velocity, observation entry 8. The default
    observation leaves the root's x position out, so without it the reward is not a function of ``next_obs``."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(
            np.append(space.low, -np.inf), np.append(space.high, np.inf), dtype=space.dtype
        )

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        obs, info = self.env.reset(**kwargs)
        return np.append(obs, obs[8]), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return np.append(obs, info["x_velocity"]), reward, terminated, truncated, info


class Task(NamedTuple):
    """One task's env, budget, model, planner and model training."""

    env_id: str
    episode: int
    """Env steps per episode (the env's time limit)."""
    episodes: int
    """Training episodes, the first one random."""
    reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layers: int
    """Hidden layers of each member (mbrl-lib's ``num_layers`` counts the hidden layers)."""
    hidden: int
    members: int
    particles: int
    horizon: int
    population: int
    iterations: int
    elites: int
    momentum: float
    training: dict[str, Any]
    """mbrl-lib's model-training settings (its ``overrides`` keys)."""
    wrap: Callable[[gym.Env], gym.Env] | None = None
    fit_updates: int | None = None
    """When set, each fit runs as many epochs over the transitions so far as make ``fit_updates`` minibatch
    updates (metalab's fixed number per fit, :func:`epochs_per_fit`) in place of ``training``'s fixed epochs."""


TASKS = {
    # metalab's configs/mbrl_pendulum.yaml (its 3 x 64 units: here 4 x 64, as first recorded), mbrl-lib's
    # pets_inv_pendulum model training.
    "pendulum": Task("Pendulum-v1", 200, 11, pendulum_reward, layers=4, hidden=64, members=5, particles=10,
                     horizon=25, population=200, iterations=5, elites=20, momentum=0.1,
                     training={"model_lr": 0.00143, "model_wd": 0.000033, "model_batch_size": 256,
                               "validation_ratio": 0.2, "patience": 50, "num_epochs_train_model": 31}),
    # metalab's configs/mbrl_cartpole_swingup.yaml, mbrl-lib's pets_cartpole_paper_version model training.
    "cartpole-swingup": Task("metalab/CartPoleSwingUp-v0", 200, 16, cartpole_swingup_reward, layers=3, hidden=64,
                             members=5, particles=10, horizon=25, population=200, iterations=5, elites=20,
                             momentum=0.1,
                             training={"model_lr": 0.0001, "model_wd": 0.00003, "model_batch_size": 256,
                                       "validation_ratio": 0.0, "patience": 25, "num_epochs_train_model": 25}),
    # metalab's configs/mbrl_half_cheetah.yaml, mbrl-lib's pets_halfcheetah model training.
    "half-cheetah": Task("HalfCheetah-v5", 1000, 7, half_cheetah_reward, layers=3, hidden=200, members=5,
                         particles=10, horizon=30, population=100, iterations=5, elites=10, momentum=0.1,
                         training={"model_lr": 0.00028, "model_wd": 0.0001, "model_batch_size": 32,
                                   "validation_ratio": 0.0, "patience": 12, "num_epochs_train_model": 12},
                         wrap=ForwardVelocity),
}  # fmt: skip
# The swing-up with metalab's model training (configs/mbrl_cartpole_swingup.yaml: Adam at 1e-3, no weight decay,
# minibatches of 32, 1,000 updates per fit), a labelled peer: is the gap PETS or the training settings?
TASKS["cartpole-swingup-metalab-fit"] = TASKS["cartpole-swingup"]._replace(
    training={"model_lr": 0.001, "model_wd": 0.0, "model_batch_size": 32, "validation_ratio": 0.0},
    fit_updates=1000,
)


def make_env(task: Task, episode_steps: int | None = None) -> gym.Env:
    """The task's env, its episodes cut to ``episode_steps`` when given (smoke runs)."""
    if task.env_id.startswith("metalab/"):
        import metalab.envs  # noqa: F401  (registers metalab's env ids)

    env = gym.make(task.env_id, max_episode_steps=episode_steps)
    return task.wrap(env) if task.wrap else env


def elite_ratio(task: Task) -> float:
    """CEM's elites as mbrl-lib's fraction of the population (it keeps ``ceil(population * ratio)``)."""
    ratio = task.elites / task.population
    assert math.ceil(task.population * ratio) == task.elites, task
    return ratio


def epochs_per_fit(task: Task, transitions: int) -> int:
    """The fewest epochs of a fit on ``transitions`` that make ``task.fit_updates`` minibatch updates (an
    epoch of mbrl-lib's iterator ends with a short minibatch: ``ceil(transitions / batch)`` updates)."""
    assert task.fit_updates, task
    return math.ceil(task.fit_updates / math.ceil(transitions / task.training["model_batch_size"]))


def config(task: Task, seed: int, dataset_size: int) -> Any:
    import omegaconf

    return omegaconf.OmegaConf.create({
        "seed": seed,
        "device": "cpu",
        "dynamics_model": {
            "_target_": "mbrl.models.GaussianMLP", "_recursive_": False, "device": "cpu",
            "num_layers": task.layers, "in_size": "???", "out_size": "???", "ensemble_size": task.members,
            "hid_size": task.hidden, "deterministic": False, "propagation_method": "fixed_model",
            "learn_logvar_bounds": False, "activation_fn_cfg": {"_target_": "torch.nn.SiLU"},
        },
        "algorithm": {
            "learned_rewards": False, "target_is_delta": True, "normalize": True,
            "normalize_double_precision": True, "dataset_size": dataset_size,
        },
        "overrides": {**task.training, "num_elites": task.members, "trial_length": task.episode},
    })  # fmt: skip


def agent_config(task: Task, low: np.ndarray, high: np.ndarray) -> Any:
    import omegaconf

    return omegaconf.OmegaConf.create({
        "_target_": "mbrl.planning.TrajectoryOptimizerAgent", "_recursive_": False,
        "action_lb": low.tolist(), "action_ub": high.tolist(), "planning_horizon": task.horizon,
        "replan_freq": 1, "verbose": False,
        "optimizer_cfg": {
            "_target_": "mbrl.planning.CEMOptimizer", "num_iterations": task.iterations,
            "elite_ratio": elite_ratio(task), "population_size": task.population, "alpha": task.momentum,
            "device": "cpu", "lower_bound": "???", "upper_bound": "???", "return_mean_elites": True,
            "clipped_normal": False,
        },
    })  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="pendulum", help="which task (default pendulum)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument(
        "--test-seeds", type=int, nargs="+", required=True, help="reset seeds of the test episodes"
    )
    p.add_argument(
        "--episodes", type=int, default=None,
        help="training episodes, the first random (default: the task's; fewer for smoke runs)",
    )  # fmt: skip
    p.add_argument(
        "--episode-steps", type=int, default=None,
        help="env steps per episode (default: the task's time limit; fewer for smoke runs)",
    )  # fmt: skip
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if args.episodes is None:
        args.episodes = task.episodes
    if args.episode_steps is None:
        args.episode_steps = task.episode
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    if not 1 <= args.episode_steps <= task.episode:
        p.error(f"--episode-steps must be in [1, {task.episode}], got {args.episode_steps}")
    return args


def progress(line: str, start: float) -> None:
    """One progress line on stderr (stdout carries the JSON result only)."""
    print(
        f"{time.strftime('%H:%M:%S')} {line} ({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    import mbrl.env.termination_fns
    import mbrl.models
    import mbrl.planning
    import mbrl.util.common

    args = parse_args(argv)
    task = TASKS[args.task]
    torch.set_num_threads(1)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = make_env(task, args.episode_steps)
    env.reset(seed=args.seed)
    env.action_space.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    cfg = config(task, args.seed, args.episode_steps * args.episodes)
    start = time.perf_counter()
    model = mbrl.util.common.create_one_dim_tr_model(cfg, obs_shape, act_shape)
    buffer = mbrl.util.common.create_replay_buffer(cfg, obs_shape, act_shape, rng=rng, obs_type=np.double,
                                                   action_type=np.double, reward_type=np.double)  # fmt: skip
    mbrl.util.common.rollout_agent_trajectories(env, args.episode_steps, mbrl.planning.RandomAgent(env), {},
                                                replay_buffer=buffer)  # fmt: skip
    progress(f"episode 1/{args.episodes} (random actions)", start)
    model_env = mbrl.models.ModelEnv(env, model, mbrl.env.termination_fns.no_termination, task.reward,
                                     generator=generator)  # fmt: skip
    trainer = mbrl.models.ModelTrainer(
        model, optim_lr=cfg.overrides.model_lr, weight_decay=cfg.overrides.model_wd
    )
    agent = mbrl.planning.create_trajectory_optim_agent_for_model(
        model_env,
        agent_config(task, env.action_space.low, env.action_space.high),
        num_particles=task.particles,
    )
    train_returns = []
    with tempfile.TemporaryDirectory() as work_dir:
        for _ in range(
            args.episodes - 1
        ):  # refit, then one MPC episode (PETS: freq_train_model = trial length)
            if task.fit_updates:  # no early stop: patience as long as the fit
                epochs = epochs_per_fit(task, len(buffer))
                cfg.overrides.num_epochs_train_model = cfg.overrides.patience = epochs
            mbrl.util.common.train_model_and_save_model_and_data(
                model, trainer, cfg.overrides, buffer, work_dir
            )
            obs, _ = env.reset()
            agent.reset()
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = mbrl.util.common.step_env_and_add_to_buffer(
                    env, obs, agent, {}, buffer
                )
                total += reward
                done = terminated or truncated
            train_returns.append(total)
            progress(f"episode {len(train_returns) + 1}/{args.episodes} return {total:.1f}", start)
    train_seconds = time.perf_counter() - start
    test_returns = []
    for seed in args.test_seeds:
        obs, _ = env.reset(seed=seed)
        agent.reset()
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs))
            total += reward
            done = terminated or truncated
        test_returns.append(float(total))
        progress(f"test episode {len(test_returns)}/{len(args.test_seeds)} return {total:.1f}", start)
    print(json.dumps({"task": args.task, "env": task.env_id, "train_returns": [float(r) for r in train_returns],
                      "test_returns": test_returns, "seconds": train_seconds,
                      "env_steps": args.episode_steps * args.episodes}))  # fmt: skip


if __name__ == "__main__":
    main()
