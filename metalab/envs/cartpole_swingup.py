"""Cart-pole swing-up: the continuous-action cart-pole task of PETS (Chua, Calandra, McAllister, Levine, "Deep
Reinforcement Learning in a Handful of Trials using Probabilistic Dynamics Models", NeurIPS 2018): the pole
starts hanging down and must be swung up and balanced above the cart, near the rail's origin.

Choices (metalab's own; the physical constants are those of the classic cart-pole, Barto, Sutton, Anderson
1983, and gym's ``CartPole``; the reward is PETS's form; no implementation is followed):

- Physics: a cart of mass ``M = 1.0`` on a frictionless, unbounded horizontal rail, and a uniform rod of mass
  ``m = 0.1`` and length ``L = 1.0`` (half-length ``l = 0.5``, moment of inertia ``m l^2 / 3`` about its centre)
  on a frictionless hinge; gravity ``g = 9.8``. ``theta`` is the pole's angle from upright, positive when the
  tip leans towards ``+x``: the tip is at ``(x + L sin theta, L cos theta)`` above the hinge. The equations of
  motion (Lagrange's, :func:`derivatives`), with ``J = m l^2 + m l^2 / 3`` the rod's inertia about the hinge:
  ``(M + m) x'' + m l cos(theta) theta'' = F + m l sin(theta) theta'^2`` and
  ``m l cos(theta) x'' + J theta'' = m g l sin(theta)``.
- Action: one number in ``[-1, 1]`` (clipped), the horizontal force ``F = 10 a`` newtons on the cart.
- Time: ``dt = 0.05`` s per step (200 steps = 10 s), integrated by 4 classical Runge-Kutta substeps of
  0.0125 s with the force held (:func:`integrate`); with no force, the energy (:func:`energy`) and the horizontal
  momentum stay constant to 3e-5 J and 1e-5 kg m/s over 50 steps from states of up to 20 J.
- Start: hanging down at rest, ``(x, theta, x', theta') = (0, pi, 0, 0)`` plus independent Gaussian noise of
  standard deviation 0.05 on each, from the reset seed.
- Observation: ``[x, x', cos theta, sin theta, theta']``, float32: the angle enters through its cosine and sine
  only, so it never wraps.
- Reward of a step, from the state after it (the planner's copy in torch:
  :func:`metalab.rl.env_models.cartpole_swingup_reward`):
  ``exp(-|tip - (0, L)|^2 / L^2) - 0.01 a^2`` with ``a`` the clipped action: 1 with the pole upright over the
  origin, ``exp(-4) = 0.018`` hanging below it, and near 0 wherever the cart is more than about ``2 L`` from
  the origin. Doing nothing scores about 3.5 per episode (at most ``200 exp(-4) = 3.7``); a hand-written
  energy-pumping and LQR controller (``tests/test_env_cartpole_swingup.py``) swings up within 3 s and scores
  155-165; CEM planning with the true dynamics (horizon 25, 200 candidates, 5 rounds) about 178.
- Episodes never terminate: the cart has no rail limit (the reward's distance term keeps it near the origin);
  they are truncated after 200 steps. ``info`` holds ``tip_distance``, ``|tip - (0, L)|`` after the step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from metalab.envs.tasks import check_action

CARTPOLE_SWINGUP_ID = "metalab/CartPoleSwingUp-v0"

GRAVITY = 9.8
"""m/s^2."""
CART_MASS = 1.0
"""``M``, kg."""
POLE_MASS = 0.1
"""``m``, kg: a uniform rod."""
POLE_LENGTH = 1.0
"""``L``, m: hinge to tip (the classic cart-pole's half-length 0.5 is ``L / 2``)."""
MAX_FORCE = 10.0
"""Newtons of the action ``a = 1``."""
DT = 0.05
"""Seconds per env step."""
SUBSTEPS = 4
"""Runge-Kutta substeps per env step."""
MAX_STEPS = 200
"""Steps of an episode (then truncated)."""
ACTION_COST = 0.01
"""Weight of ``a^2`` in the reward."""
INIT_STD = 0.05
"""Standard deviation of the Gaussian noise on each of ``(x, theta, x', theta')`` at reset."""

_HALF = POLE_LENGTH / 2  # l, hinge to the rod's centre of mass
_HINGE_INERTIA = POLE_MASS * _HALF**2 * 4 / 3  # J = m l^2 + m l^2 / 3


def derivatives(state: np.ndarray, force: np.ndarray | float) -> np.ndarray:
    """The time derivative of ``state = (x, theta, x', theta')`` ``(..., 4)`` under a horizontal ``force`` on the
    cart (newtons, broadcast against ``state[..., 0]``): ``(x', theta', x'', theta'')`` ``(..., 4)``, from the
    equations of motion in the module docstring, solved for ``x''`` and ``theta''``."""
    theta, x_dot, theta_dot = state[..., 1], state[..., 2], state[..., 3]
    sin, cos = np.sin(theta), np.cos(theta)
    coupling = POLE_MASS * _HALF * cos  # the off-diagonal of the mass matrix
    total = CART_MASS + POLE_MASS
    cart_side = force + POLE_MASS * _HALF * sin * theta_dot**2
    pole_side = POLE_MASS * GRAVITY * _HALF * sin
    det = total * _HINGE_INERTIA - coupling**2  # > 0: the mass matrix is positive definite
    x_acc = (_HINGE_INERTIA * cart_side - coupling * pole_side) / det
    theta_acc = (total * pole_side - coupling * cart_side) / det
    return np.stack([x_dot, theta_dot, x_acc, theta_acc], axis=-1)


def integrate(
    state: np.ndarray, force: np.ndarray | float, dt: float = DT, substeps: int = SUBSTEPS
) -> np.ndarray:
    """``state`` ``(..., 4)`` after ``dt`` seconds of ``force`` held: ``substeps`` classical Runge-Kutta steps."""
    h = dt / substeps
    for _ in range(substeps):
        k1 = derivatives(state, force)
        k2 = derivatives(state + h / 2 * k1, force)
        k3 = derivatives(state + h / 2 * k2, force)
        k4 = derivatives(state + h * k3, force)
        state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state


def energy(state: np.ndarray) -> np.ndarray:
    """Kinetic plus potential energy of ``state`` ``(..., 4)`` in joules, the potential measured from the hinge's
    height (upright at rest: ``m g l``; hanging at rest: ``-m g l``); conserved when no force acts."""
    theta, x_dot, theta_dot = state[..., 1], state[..., 2], state[..., 3]
    kinetic = (
        0.5 * (CART_MASS + POLE_MASS) * x_dot**2
        + POLE_MASS * _HALF * np.cos(theta) * x_dot * theta_dot
        + 0.5 * _HINGE_INERTIA * theta_dot**2
    )
    return kinetic + POLE_MASS * GRAVITY * _HALF * np.cos(theta)


def observe(state: np.ndarray) -> np.ndarray:
    """The observation ``[x, x', cos theta, sin theta, theta']`` ``(..., 5)`` float32 of ``state`` ``(..., 4)``."""
    x, theta, x_dot, theta_dot = np.moveaxis(state, -1, 0)
    return np.stack([x, x_dot, np.cos(theta), np.sin(theta), theta_dot], axis=-1).astype(np.float32)


class CartPoleSwingUp(gym.Env):
    """PETS's cart-pole swing-up: a force in ``[-1, 1]`` (times 10 N) on a cart swings a hanging pole up and
    balances it over the origin (see the module docstring for the physics, constants and reward)."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, max_steps: int = MAX_STEPS):
        if max_steps < 1:
            raise ValueError(f"CartPoleSwingUp needs max_steps >= 1, got {max_steps}")
        self.max_steps = max_steps
        big = np.finfo(np.float32).max  # unbounded but finite: the gymnasium checker warns on infinite bounds
        high = np.array([big, big, 1.0, 1.0, big], dtype=np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.state = np.array([0.0, np.pi, 0.0, 0.0])
        """``(x, theta, x', theta')`` float64, ``theta`` unwrapped (privileged: the observation holds its cos and
        sin)."""
        self._steps = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options:
            raise ValueError(f"CartPoleSwingUp takes no reset options, got {sorted(options)}")
        self.state = np.array([0.0, np.pi, 0.0, 0.0]) + self.np_random.normal(0.0, INIT_STD, 4)
        self._steps = 0
        return observe(self.state), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(check_action(action, 1), -1.0, 1.0)
        self.state = integrate(self.state, MAX_FORCE * float(a[0]))
        self._steps += 1
        obs = observe(self.state)
        x, theta = self.state[0], self.state[1]
        distance = float(np.hypot(x + POLE_LENGTH * np.sin(theta), POLE_LENGTH * (np.cos(theta) - 1.0)))
        reward = float(np.exp(-(distance**2) / POLE_LENGTH**2) - ACTION_COST * float(a[0]) ** 2)
        return obs, reward, False, self._steps >= self.max_steps, {"tip_distance": distance}
