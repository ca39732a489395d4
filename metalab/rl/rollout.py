"""Running episodes: observation splitting for goal envs, seeded resets, and episode recording.

Every episode starts from ``env.reset(seed=...)`` with a seed derived from (run seed, episode index), so an
environment's state mid-episode is a function of that seed and the actions taken since. That pair is what a
checkpoint stores; loading replays the actions (:meth:`Recorder.load_state`). This works for any env that is
deterministic given its reset seed, without reaching into its internals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from metalab.errors import ConfigError
from metalab.rl.buffer import Experience

GOAL_KEYS = ("observation", "achieved_goal", "desired_goal")


def derive_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys, e.g. ``(run seed, episode index)``; distinct keys give unrelated seeds."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def is_goal_env(env: gym.Env) -> bool:
    """Whether observations are goal dicts (``observation`` / ``achieved_goal`` / ``desired_goal``)."""
    space = env.observation_space
    return isinstance(space, spaces.Dict) and all(k in space.spaces for k in GOAL_KEYS)


def dims(env: gym.Env) -> tuple[int, int]:
    """``(obs_dim, goal_dim)`` of the flat float vectors :func:`split_obs` makes (goal_dim 0: no goal)."""
    space = env.observation_space
    if is_goal_env(env):
        obs, goal = space["observation"], space["desired_goal"]
        return int(np.prod(obs.shape)), int(np.prod(goal.shape))
    if not isinstance(space, spaces.Box | spaces.MultiBinary):
        raise ConfigError("env.id", f"observations must be a Box, MultiBinary or goal Dict, not {space}")
    return int(np.prod(space.shape)), 0


def input_centering(env: gym.Env) -> tuple[np.ndarray, np.ndarray]:
    """``(shift, scale)`` over the flat ``[observation, goal]`` input of :func:`dims` such that
    ``(x - shift) * scale`` maps every bounded dimension from ``[low, high]`` to ``[-1, 1]`` (MultiBinary bits to
    -1/+1); dimensions with an infinite bound pass unchanged (shift 0, scale 1)."""
    space = env.observation_space
    parts = [space["observation"], space["desired_goal"]] if is_goal_env(env) else [space]
    shifts, scales = [], []
    for part in parts:
        if isinstance(part, spaces.MultiBinary):
            low, high = np.zeros(part.shape), np.ones(part.shape)
        else:
            low, high = np.broadcast_to(part.low, part.shape), np.broadcast_to(part.high, part.shape)
        low, high = low.reshape(-1).astype(np.float64), high.reshape(-1).astype(np.float64)
        bounded = np.isfinite(low) & np.isfinite(high) & (high > low)
        low, high = np.where(bounded, low, -1.0), np.where(bounded, high, 1.0)  # unbounded: shift 0, scale 1
        shifts.append((low + high) / 2)
        scales.append(2 / (high - low))
    return np.concatenate(shifts).astype(np.float32), np.concatenate(scales).astype(np.float32)


def split_obs(obs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(observation, achieved_goal, desired_goal)`` as flat float32 vectors; empty goals for plain envs."""
    if isinstance(obs, dict):
        return tuple(np.asarray(obs[k], dtype=np.float32).reshape(-1) for k in GOAL_KEYS)  # type: ignore[return-value]
    empty = np.zeros(0, dtype=np.float32)
    return np.asarray(obs, dtype=np.float32).reshape(-1), empty, empty


def env_action(space: spaces.Space, action: np.ndarray) -> Any:
    """What the env is given for a recorded action: an int, or a float vector clipped into a Box's bounds."""
    if isinstance(space, spaces.Discrete):
        return int(action)
    assert isinstance(space, spaces.Box), f"unsupported action space {space}"
    return np.clip(action, space.low, space.high).astype(space.dtype)


Act = Callable[[np.ndarray, np.ndarray, list[int]], np.ndarray]
"""A batched policy, called once per time step: ``act(obs (E, obs_dim), goal (E, goal_dim), live) -> actions
(E, ...)`` for the ``E`` episodes still running, ``live`` their indices in the list of seeds being run (a
policy with per-episode state, such as PEARL's task variable, picks its rows with it)."""

ToEnv = Callable[[spaces.Space, np.ndarray], Any]
"""What the env is given for the action a policy chose: :func:`env_action` by default."""


class EpisodeResult(NamedTuple):
    """A finished episode: its transitions, undiscounted return and success (NaN if the env doesn't say)."""

    experience: Experience
    ret: float
    success: float
    info: np.ndarray | None = None
    """``(T,)`` float32 values of ``info[info_key]`` at each step, when an ``info_key`` was asked for."""


def _info_value(info: dict[str, Any], key: str) -> np.float32:
    if key not in info:
        raise KeyError(f"the env's info has no {key!r}; keys: {sorted(info)}")
    return np.float32(info[key])


class Recorder:
    """Steps one env through one episode at a time, recording its transitions."""

    def __init__(self, env: gym.Env, info_key: str | None = None, to_env: ToEnv = env_action):
        self.env = env
        self.info_key = info_key
        self.to_env = to_env
        self.seed = 0
        self.actions: list[np.ndarray] = []
        self._rows: list[tuple] = []
        self._infos: list[np.float32] = []
        self.obs = self.achieved = self.goal = np.zeros(0, dtype=np.float32)  # set by reset()

    def reset(self, seed: int, options: dict[str, Any] | None = None) -> None:
        """Start an episode from ``env.reset(seed=seed, options=options)``."""
        self.seed = seed
        self.obs, self.achieved, self.goal = split_obs(self.env.reset(seed=seed, options=options)[0])
        self.actions, self._rows, self._infos = [], [], []

    def step(self, action: np.ndarray) -> EpisodeResult | None:
        """Take ``action``; returns the episode once it terminates or is truncated (then call :meth:`reset`)."""
        raw, reward, terminated, truncated, info = self.env.step(self.to_env(self.env.action_space, action))
        next_obs, next_achieved, next_goal = split_obs(raw)
        self._rows.append((self.obs, self.achieved, self.goal, action, np.float32(reward), next_obs,
                           next_achieved, bool(terminated)))  # fmt: skip
        if self.info_key is not None:
            self._infos.append(_info_value(info, self.info_key))
        self.actions.append(action)
        self.obs, self.achieved, self.goal = next_obs, next_achieved, next_goal
        if not (terminated or truncated):
            return None
        success = float(info["is_success"]) if "is_success" in info else float("nan")
        return _finished(self._rows, success, self._infos if self.info_key is not None else None)

    def state(self) -> dict[str, Any]:
        """The episode's reset seed and actions so far: enough to rebuild the env's state by replay."""
        return {
            "seed": self.seed,
            "actions": torch.from_numpy(np.array(self.actions)) if self.actions else None,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Reset with the saved seed and replay the saved actions."""
        self.reset(int(state["seed"]))
        if state["actions"] is not None:
            for action in state["actions"].numpy():
                if self.step(action) is not None:
                    raise ValueError("replayed actions ended the episode: the env is not deterministic")


def _finished(rows: list[tuple], success: float, infos: list[np.float32] | None) -> EpisodeResult:
    experience = Experience(*(np.stack(column) for column in zip(*rows, strict=True)))
    info = np.array(infos, dtype=np.float32) if infos is not None else None
    return EpisodeResult(experience, float(experience.reward.sum()), success, info)


def _task_options(tasks: Sequence[int] | None, i: int) -> dict[str, Any] | None:
    return None if tasks is None else {"task": tasks[i]}


def run_episodes(
    envs: Sequence[gym.Env],
    act: Act,
    seeds: Sequence[int],
    tasks: Sequence[int] | None = None,
    info_key: str | None = None,
    to_env: ToEnv = env_action,
) -> list[EpisodeResult]:
    """One episode per seed, ``len(envs)`` at a time in lockstep so ``act`` (:data:`Act`) sees a batch.

    A multi-task env is reset with ``options={"task": tasks[i]}`` for episode ``i``; ``info_key`` records that
    info value at every step (:attr:`EpisodeResult.info`); ``to_env`` maps a chosen action to the env's.
    """
    results: list[EpisodeResult] = []
    recorders = [Recorder(env, info_key, to_env) for env in envs]
    for start in range(0, len(seeds), len(envs)):
        chunk = seeds[start : start + len(envs)]
        running = recorders[: len(chunk)]
        for i, (recorder, seed) in enumerate(zip(running, chunk, strict=True)):
            recorder.reset(seed, _task_options(tasks, start + i))
        done: dict[int, EpisodeResult] = {}
        while len(done) < len(chunk):
            live = [i for i in range(len(chunk)) if i not in done]
            actions = act(np.stack([running[i].obs for i in live]), np.stack([running[i].goal for i in live]),
                          [start + i for i in live])  # fmt: skip
            for i, action in zip(live, actions, strict=True):
                result = running[i].step(action)
                if result is not None:
                    done[i] = result
        results += [done[i] for i in range(len(chunk))]
    return results


def run_vector_episodes(
    venv: gym.vector.VectorEnv,
    act: Act,
    seeds: Sequence[int],
    tasks: Sequence[int] | None = None,
    info_key: str | None = None,
    to_env: ToEnv = env_action,
) -> list[EpisodeResult]:
    """:func:`run_episodes` through a gymnasium vector env made by
    :func:`metalab.envs.config.make_vector_env`: one episode per seed (and task), ``venv.num_envs`` at a time,
    the same episodes for the same seeds (the envs are reset with them).

    All envs step together; one whose episode has ended is given a placeholder action until the others end
    (its autoreset episode is discarded), and ``act`` sees only the running ones. A last chunk smaller than
    ``num_envs`` fills the spare envs with episodes that are discarded too.
    """
    n = venv.num_envs
    space = venv.single_action_space
    results: list[EpisodeResult] = []
    for start in range(0, len(seeds), n):
        chunk = list(seeds[start : start + n])
        spare = [len(chunk) - 1] * (n - len(chunk))  # spare envs rerun the chunk's last episode
        options = None
        if tasks is not None:
            options = {"per_env": [_task_options(tasks, start + i) for i in [*range(len(chunk)), *spare]]}
        raw, _ = venv.reset(seed=chunk + [chunk[-1]] * len(spare), options=options)
        rows: list[list[tuple]] = [[] for _ in chunk]
        infos: list[list[np.float32]] = [[] for _ in chunk]
        current = [split_obs(_row(raw, i)) for i in range(n)]
        done: dict[int, EpisodeResult] = {}
        while len(done) < len(chunk):
            live = [i for i in range(len(chunk)) if i not in done]
            chosen = act(np.stack([current[i][0] for i in live]), np.stack([current[i][2] for i in live]),
                         [start + i for i in live])  # fmt: skip
            actions = [placeholder(space)] * n
            for i, a in zip(live, chosen, strict=True):
                actions[i] = to_env(space, a)
            raw, reward, terminated, truncated, info = venv.step(np.stack(actions))
            for j, i in enumerate(live):
                nxt = split_obs(_row(raw, i))
                obs, achieved, goal = current[i]
                rows[i].append((obs, achieved, goal, chosen[j], np.float32(reward[i]), nxt[0], nxt[1],
                                bool(terminated[i])))  # fmt: skip
                if info_key is not None:
                    infos[i].append(_info_value(_row_info(info, i), info_key))
                current[i] = nxt
                if terminated[i] or truncated[i]:
                    step_info = _row_info(info, i)
                    success = float(step_info["is_success"]) if "is_success" in step_info else float("nan")
                    done[i] = _finished(rows[i], success, infos[i] if info_key is not None else None)
        results += [done[i] for i in range(len(chunk))]
    return results


def placeholder(space: spaces.Space) -> Any:
    """A valid action for an env whose episode is over (it is ignored): the first action, or zeros clipped into
    the box."""
    if isinstance(space, spaces.Discrete):
        return int(space.start)
    return env_action(space, np.zeros(space.shape, dtype=np.float32))


def _row(raw: Any, i: int) -> Any:
    """Env ``i``'s observation in a vector env's batched observation (an array, or a dict of arrays)."""
    return {k: v[i] for k, v in raw.items()} if isinstance(raw, dict) else raw[i]


def _row_info(info: dict[str, Any], i: int) -> dict[str, Any]:
    """Env ``i``'s info from a vector env's batched info (values, each with a ``_key`` mask of the envs that set
    it)."""
    row = {}
    for key, values in info.items():
        mask = info.get(f"_{key}")
        if not key.startswith("_") and (mask is None or mask[i]):
            row[key] = values[i]
    return row
