"""Cart-pole swing-up (PETS's cartpole): the gymnasium checker, shapes and seeding, clipping and truncation, the
physics (energy and momentum balances, the hanging rest), the reward, and a hand-written swing-up controller
(energy pumping, then a linear-quadratic regulator) that shows the task can be solved in 200 steps."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from metalab.envs import CARTPOLE_SWINGUP_ID, CartPoleSwingUp, EnvConfig, make_env
from metalab.envs import cartpole_swingup as cp

HALF = cp.POLE_LENGTH / 2
HINGE_INERTIA = cp.POLE_MASS * HALF**2 * 4 / 3


def random_states(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [rng.normal(0, 1, n), rng.uniform(-np.pi, np.pi, n), rng.normal(0, 2, n), rng.normal(0, 5, n)], axis=1
    )


def momentum(state: np.ndarray) -> np.ndarray:
    """Horizontal momentum of cart and pole: its rate of change is the force on the cart."""
    x_dot, theta_dot = state[..., 2], state[..., 3]
    return (cp.CART_MASS + cp.POLE_MASS) * x_dot + cp.POLE_MASS * HALF * np.cos(state[..., 1]) * theta_dot


def test_passes_the_gymnasium_env_checker_and_is_registered() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports soft problems as warnings: fail on them too
        check_env(gym.make(CARTPOLE_SWINGUP_ID).unwrapped)
    env = make_env(EnvConfig(id=CARTPOLE_SWINGUP_ID))
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert env.observation_space.shape == (5,)
    assert EnvConfig(id=CARTPOLE_SWINGUP_ID).name == "cartpoleswingup"


def test_reset_hangs_down_and_seeding_is_reproducible() -> None:
    env = CartPoleSwingUp()
    obs, info = env.reset(seed=3)
    assert obs.shape == (5,) and obs.dtype == np.float32 and info == {}
    assert obs[2] < -0.98 and abs(obs[0]) < 0.3  # cos(theta) ~ -1: hanging, near the origin
    np.testing.assert_allclose(obs, cp.observe(env.state))
    actions = np.random.default_rng(0).uniform(-1, 1, (30, 1)).astype(np.float32)

    def trajectory(seed: int) -> np.ndarray:
        first, _ = env.reset(seed=seed)
        return np.stack([first] + [env.step(a)[0] for a in actions])

    assert np.array_equal(trajectory(3), trajectory(3))
    assert not np.allclose(trajectory(3), trajectory(4))
    starts = np.stack([CartPoleSwingUp().reset(seed=s)[0] for s in range(200)])
    assert 0.03 < np.std(starts[:, 3]) < 0.07  # sin(theta) ~ -(theta - pi): the 0.05 start noise
    with pytest.raises(ValueError, match="no reset options"):
        env.reset(options={"task": 1})


def test_truncated_after_200_steps_never_terminated_and_actions_clipped() -> None:
    env = CartPoleSwingUp()
    env.reset(seed=0)
    ends = [env.step(np.array([1.0 if t % 40 < 20 else -1.0], np.float32))[2:4] for t in range(200)]
    assert ends == [(False, False)] * 199 + [(False, True)]
    env.reset(seed=1)
    clipped = env.step(np.array([5.0], np.float32))
    env.reset(seed=1)
    full = env.step(np.array([1.0], np.float32))
    assert np.array_equal(clipped[0], full[0]) and clipped[1] == full[1]
    with pytest.raises(ValueError, match="1 finite numbers"):
        env.step(np.array([np.nan], np.float32))
    with pytest.raises(ValueError, match="1 finite numbers"):
        env.step(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="max_steps >= 1"):
        CartPoleSwingUp(max_steps=0)


def test_energy_and_momentum_are_conserved_without_force() -> None:
    states = random_states(100)
    energy, p = cp.energy(states), momentum(states)
    for _ in range(50):
        states = cp.integrate(states, 0.0)
    assert np.abs(energy).max() > 5  # fast states: the pole whirls
    np.testing.assert_allclose(cp.energy(states), energy, rtol=0, atol=1e-4)  # measured: 2.8e-5 J
    np.testing.assert_allclose(momentum(states), p, rtol=0, atol=3e-5)  # measured: 7.4e-6


def test_force_does_work_and_impulse() -> None:
    """A force ``F`` held on the cart for a step adds ``F * (x' - x)`` to the energy (its work) and ``F * dt`` to
    the horizontal momentum (its impulse): ``cp.energy`` is written apart from the equations of motion, so
    this checks the equations, not only the integrator."""
    states = random_states(100, seed=1)
    force = np.random.default_rng(2).uniform(-cp.MAX_FORCE, cp.MAX_FORCE, 100)
    after = cp.integrate(states, force)
    work = force * (after[:, 0] - states[:, 0])
    np.testing.assert_allclose(cp.energy(after) - cp.energy(states), work, rtol=0, atol=1e-5)
    np.testing.assert_allclose(momentum(after) - momentum(states), force * cp.DT, rtol=0, atol=1e-6)


def test_without_force_the_pole_stays_down() -> None:
    env = CartPoleSwingUp()
    env.reset(seed=0)
    rows = [env.step(np.zeros(1, np.float32)) for _ in range(200)]
    cos = np.array([o[2] for o, *_ in rows])
    assert cos.max() < -0.98  # small swings about the bottom, which the start's energy cannot leave
    returns = sum(r for _, r, *_ in rows)
    assert 3.0 < returns < 3.7  # at most 200 exp(-4) = 3.66, the tip hanging still L below the hinge at x = 0


def test_reward_is_the_tip_distance_form() -> None:
    env = CartPoleSwingUp()
    env.reset(seed=0)
    env.state = np.array([0.0, 0.0, 0.0, 0.0])  # balanced upright over the origin: stays there
    obs, reward, *_, info = env.step(np.zeros(1, np.float32))
    assert reward == pytest.approx(1.0) and info["tip_distance"] == pytest.approx(0.0)
    env.state = np.array([0.3, np.pi / 2, 0.0, 0.0])
    obs, reward, *_, info = env.step(np.array([-0.5], np.float32))
    x, cos, sin = float(obs[0]), float(obs[2]), float(obs[3])
    distance = np.hypot(x + cp.POLE_LENGTH * sin, cp.POLE_LENGTH * (cos - 1))
    assert info["tip_distance"] == pytest.approx(distance, rel=1e-5)
    assert reward == pytest.approx(np.exp(-(distance**2) / cp.POLE_LENGTH**2) - 0.01 * 0.25, rel=1e-5)


def lqr_gain(q: tuple[float, ...] = (1.0, 10.0, 0.1, 0.1), r: float = 1.0) -> np.ndarray:
    """The discrete-time LQR gain ``(1, 4)`` on ``(x, theta, x', theta')`` of the env step linearised about the
    upright rest (central differences), by iterating the Riccati equation; the control is the action ``a``."""
    zero, eps = np.zeros(4), 1e-6
    a = np.stack([(cp.integrate(zero + d, 0.0) - cp.integrate(zero - d, 0.0)) / (2 * eps) for d in np.eye(4) * eps],
                 axis=1)  # fmt: skip
    push = cp.MAX_FORCE * eps
    b = ((cp.integrate(zero, push) - cp.integrate(zero, -push)) / (2 * eps))[:, None]
    q_mat, p = np.diag(q), np.diag(q)
    for _ in range(2000):
        k = np.linalg.solve(r + b.T @ p @ b, b.T @ p @ a)
        p = q_mat + a.T @ p @ (a - b @ k)
    return k


def swing_up(state: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Energy pumping (the cart accelerates so as to raise the pole's energy towards the upright rest's, held near
    the origin by a spring and damper) until the pole is within about 30 degrees of upright, then LQR."""
    x, theta, x_dot, theta_dot = state
    wrapped = (theta + np.pi) % (2 * np.pi) - np.pi
    if np.cos(wrapped) > 0.85:
        u = -(gain @ np.array([x, wrapped, x_dot, theta_dot]))[0]
    else:
        height = HALF * (np.cos(theta) - 1)  # of the pole's centre of mass, from its upright height
        pole_energy = 0.5 * HINGE_INERTIA * theta_dot**2 + cp.POLE_MASS * cp.GRAVITY * height
        acceleration = 10.0 * pole_energy * theta_dot * np.cos(theta) - 4.0 * x - 2.0 * x_dot
        u = (cp.CART_MASS + cp.POLE_MASS) * acceleration / cp.MAX_FORCE
    return np.clip(np.array([u], np.float32), -1.0, 1.0)


def test_a_swing_up_is_feasible_in_200_steps() -> None:
    """The hand-written controller swings the pole up within 60 steps (3 s) and balances it over the origin for
    the rest: returns of 155-165 (doing nothing: 3.7). CEM planning with the true dynamics and a 25-step horizon
    scores about 178 (not run here: 40 s per episode)."""
    gain = lqr_gain()
    env = CartPoleSwingUp()
    for seed in range(3):
        env.reset(seed=seed)
        ret, upright = 0.0, []
        for _ in range(200):
            obs, reward, *_ = env.step(swing_up(env.state, gain))
            ret += reward
            upright.append(obs[2] > 0.95)
        assert 145 < ret < 170, (seed, ret)
        assert all(upright[60:]) and abs(obs[0]) < 0.1, seed
