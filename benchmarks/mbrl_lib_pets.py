"""The peer of ``benchmarks.mbrl``'s ``pets-pendulum``: mbrl-lib's PETS (Pineda et al. 2021, package ``mbrl``) on
Pendulum-v1 at the same budget. Runs inside a separate environment that has mbrl-lib (it does not install beside
metalab: see ``benchmarks.mbrl``), imports nothing from metalab, and prints one JSON line of results.

    .venv-mbrl/bin/python benchmarks/mbrl_lib_pets.py --seed 0 --test-seeds 11 12 ...

mbrl-lib's PETS loop (``mbrl.algorithms.pets.train``), written out with its components so that the trained
agent can then be tested: its ``GaussianMLP`` ensemble, ``ModelTrainer``, ``ModelEnv``, replay buffer, and
``TrajectoryOptimizerAgent`` with its CEM. Settings: metalab's ``configs/mbrl_pendulum.yaml`` where both
libraries have the knob (5 members of 3 x 64 SiLU units, TSinf propagation (mbrl-lib: ``fixed_model``), 10
particles, CEM of 5 rounds of 200 sequences of 25 actions with 20 elites and momentum 0.1, one random episode,
then a refit before every MPC episode, 2,200 env steps); mbrl-lib's own PETS defaults (its
``pets_inv_pendulum`` override) for model training: Adam at 1.43e-3, weight decay 3.3e-5, minibatches of 256,
20% held out for early stopping with patience 50, at most 31 epochs per fit, fixed log-variance bounds. The
reward function sees the next observation (mbrl-lib's signature is ``reward(action, next_obs)``): Pendulum's
cost on the next state's angle and velocity, where metalab's uses the state before the step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import gymnasium as gym
import mbrl.env.termination_fns
import mbrl.models
import mbrl.planning
import mbrl.util.common
import numpy as np
import omegaconf
import torch

HORIZON, POPULATION, ITERATIONS, ELITES, MOMENTUM, PARTICLES = 25, 200, 5, 20, 0.1, 10
EPISODE, EPISODES = 200, 11  # one random, ten MPC


def pendulum_reward(action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's reward on the next observation ``(cos, sin, thetadot)``: ``(N, 1)``."""
    theta = torch.atan2(next_obs[:, 1], next_obs[:, 0])
    torque = action[:, 0].clamp(-2.0, 2.0)
    return -(theta**2 + 0.1 * next_obs[:, 2] ** 2 + 0.001 * torque**2)[:, None]


def config(seed: int) -> omegaconf.DictConfig:
    return omegaconf.OmegaConf.create({
        "seed": seed,
        "device": "cpu",
        "dynamics_model": {
            "_target_": "mbrl.models.GaussianMLP", "_recursive_": False, "device": "cpu", "num_layers": 4, "in_size": "???",
            "out_size": "???", "ensemble_size": 5, "hid_size": 64, "deterministic": False,
            "propagation_method": "fixed_model", "learn_logvar_bounds": False,
            "activation_fn_cfg": {"_target_": "torch.nn.SiLU"},
        },
        "algorithm": {
            "learned_rewards": False, "target_is_delta": True, "normalize": True,
            "normalize_double_precision": True, "dataset_size": EPISODE * EPISODES,
        },
        "overrides": {
            "model_lr": 0.00143, "model_wd": 0.000033, "model_batch_size": 256, "validation_ratio": 0.2,
            "patience": 50, "num_epochs_train_model": 31, "num_elites": 5, "trial_length": EPISODE,
        },
    })  # fmt: skip


def agent_config(low: np.ndarray, high: np.ndarray) -> omegaconf.DictConfig:
    return omegaconf.OmegaConf.create({
        "_target_": "mbrl.planning.TrajectoryOptimizerAgent", "_recursive_": False,
        "action_lb": low.tolist(), "action_ub": high.tolist(), "planning_horizon": HORIZON, "replan_freq": 1,
        "verbose": False,
        "optimizer_cfg": {
            "_target_": "mbrl.planning.CEMOptimizer", "num_iterations": ITERATIONS,
            "elite_ratio": ELITES / POPULATION, "population_size": POPULATION, "alpha": MOMENTUM, "device": "cpu",
            "lower_bound": "???", "upper_bound": "???", "return_mean_elites": True, "clipped_normal": False,
        },
    })  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument(
        "--test-seeds", type=int, nargs="+", required=True, help="reset seeds of the test episodes"
    )
    p.add_argument(
        "--episodes", type=int, default=EPISODES, help="training episodes, the first random (smoke runs)"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = gym.make("Pendulum-v1")
    env.reset(seed=args.seed)
    env.action_space.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
    cfg = config(args.seed)
    start = time.perf_counter()
    model = mbrl.util.common.create_one_dim_tr_model(cfg, obs_shape, act_shape)
    buffer = mbrl.util.common.create_replay_buffer(cfg, obs_shape, act_shape, rng=rng, obs_type=np.double,
                                                   action_type=np.double, reward_type=np.double)  # fmt: skip
    mbrl.util.common.rollout_agent_trajectories(env, EPISODE, mbrl.planning.RandomAgent(env), {},
                                                replay_buffer=buffer)  # fmt: skip
    model_env = mbrl.models.ModelEnv(env, model, mbrl.env.termination_fns.no_termination, pendulum_reward,
                                     generator=generator)  # fmt: skip
    trainer = mbrl.models.ModelTrainer(
        model, optim_lr=cfg.overrides.model_lr, weight_decay=cfg.overrides.model_wd
    )
    agent = mbrl.planning.create_trajectory_optim_agent_for_model(
        model_env, agent_config(env.action_space.low, env.action_space.high), num_particles=PARTICLES
    )
    train_returns = []
    with tempfile.TemporaryDirectory() as work_dir:
        for _ in range(
            args.episodes - 1
        ):  # refit, then one MPC episode (PETS: freq_train_model = trial length)
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
    print(json.dumps({"train_returns": [float(r) for r in train_returns], "test_returns": test_returns,
                      "seconds": train_seconds, "env_steps": EPISODE * args.episodes}))  # fmt: skip


if __name__ == "__main__":
    main()
