"""Meta-episodes: one exploration episode (no task reward) followed by one scored exploitation episode on the same
hidden problem, the protocol of DREAM (Liu et al., ICML 2021) on :mod:`metalab.envs.citygrid`.

An agent plays a meta-episode through two policies, each a stateful callable
``policy(obs, prev_action, prev_reward, first) -> action`` (``first``: the first step of an episode, when
``prev_action`` is -1 and ``prev_reward`` 0). RL² passes one recurrent policy for both phases, so its memory
runs across the boundary; DREAM builds its exploitation policy from the exploration episode
(``exploit(explore_steps)``). Everything here is NumPy and the env; the networks stay in the algorithms.

A *trial* (:func:`play_trial`, RL²'s ``trial_episodes``) is the other protocol, Duan et al.'s: several episodes
on one problem, every one rewarded, one policy for all of them; it needs no exploration mode of the env
(``reset(options={"problem": p})`` only), so it runs on :class:`metalab.envs.navigation.Navigation2DDiscrete`.
:func:`evaluate_trials` reports the return of the episode after ``k`` earlier ones of a trial.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from PIL import Image, ImageDraw

from metalab.config import MAX_BATCH, MAX_UNITS, require, require_between
from metalab.envs.config import EnvConfig, make_env
from metalab.errors import ConfigError
from metalab.rl.recurrent import RecurrentNet, Sequences, one_hot
from metalab.rl.rollout import derive_seed
from metalab.stats import mean_ci95
from metalab.train.evaluate import PART_INDEX

MAX_META_EPISODES = 1_000_000
"""Largest replay buffer of the recurrent Q-learners, in meta-episodes."""
MAX_TRIAL_EPISODES = 100
"""Most episodes of one trial (:func:`play_trial`)."""


@dataclass(frozen=True)
class QLearningConfig:
    """What the recurrent Q-learners of meta-RL share (RL²'s whole config; DREAM adds its own fields)."""

    gamma: float = 0.99
    """Discount factor (RL²: across the whole meta-episode)."""
    buffer_size: int = 20_000
    """Replay capacity in meta-episodes."""
    batch_size: int = 32
    """Stored sequences per TD update."""
    learning_starts: int = 100
    """Meta-episodes of collection before the first update."""
    target_every: int = 250
    """Copy the online Q-network(s) to the target(s) every this many trainer steps."""
    double: bool = True
    """Double DQN targets."""
    eps_start: float = 1.0
    """Initial epsilon of epsilon-greedy exploration."""
    eps_end: float = 0.05
    """Final epsilon."""
    eps_fraction: float = 0.5
    """Fraction of the trainer steps over which epsilon decays linearly."""
    hidden: int = 128
    """Width of the recurrent networks' input layer and GRU (DREAM: also the executor MLP's hidden layers)."""
    collect_every: int = 1
    """Trainer steps (updates) per collected meta-episode: the replay ratio. Meta-episodes played = steps / this."""

    def __post_init__(self) -> None:
        require(0 <= self.gamma < 1, "gamma", "must be in [0, 1)")
        require(self.collect_every >= 1, "collect_every", "must be >= 1")
        require(self.target_every >= 1, "target_every", "must be >= 1")
        require_between(self.buffer_size, "buffer_size", 1, MAX_META_EPISODES)
        require_between(self.batch_size, "batch_size", 1, MAX_BATCH)
        require_between(self.hidden, "hidden", 1, MAX_UNITS)
        require(self.learning_starts >= 0, "learning_starts", "must be >= 0")
        for key in ("eps_start", "eps_end", "eps_fraction"):
            require(0 <= getattr(self, key) <= 1, key, "must be in [0, 1]")


class Policy(Protocol):
    def __call__(self, obs: np.ndarray, prev_action: int, prev_reward: float, first: bool) -> int: ...


class Step(NamedTuple):
    """One transition of an episode."""

    obs: np.ndarray  # (obs_dim,) float32
    action: int
    reward: float
    next_obs: np.ndarray
    terminated: bool


class MetaEpisode(NamedTuple):
    problem: int
    explore: list[Step]
    exploit: list[Step]
    success: bool
    """The exploitation episode reached its goal."""

    @property
    def exploit_return(self) -> float:
        return float(sum(s.reward for s in self.exploit))


class Progress:
    """Meta-episodes and env steps played so far, and the last 100 training exploitation returns and successes
    (checkpointed)."""

    def __init__(self) -> None:
        self.episodes = 0
        self.env_steps = 0
        self.returns: deque[float] = deque(maxlen=100)
        self.successes: deque[float] = deque(maxlen=100)

    def record(self, episode: MetaEpisode) -> None:
        """Count ``episode``."""
        self.episodes += 1
        self.env_steps += len(episode.explore) + len(episode.exploit)
        self.returns.append(episode.exploit_return)
        self.successes.append(float(episode.success))

    def metrics(self) -> dict[str, float]:
        """The running training metrics (none before the first meta-episode)."""
        if not self.returns:
            return {}
        return {
            "train/return": float(np.mean(self.returns)),
            "train/success": float(np.mean(self.successes)),
            "train/env_steps": float(self.env_steps),
        }

    def state(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "env_steps": self.env_steps,
            "returns": torch.tensor(list(self.returns), dtype=torch.float64),
            "successes": torch.tensor(list(self.successes), dtype=torch.float64),
        }

    def load_state(self, saved: dict[str, Any]) -> None:
        self.episodes = int(saved["episodes"])
        self.env_steps = int(saved["env_steps"])
        self.returns.clear()
        self.returns.extend(saved["returns"].tolist())
        self.successes.clear()
        self.successes.extend(saved["successes"].tolist())


class Problems(NamedTuple):
    """The environment side of a meta-RL run."""

    env: gym.Env
    """Training meta-episodes are played here."""
    eval_env: gym.Env
    """Evaluation meta-episodes are played here (so evaluation never disturbs the training env)."""
    n_actions: int
    obs_dim: int
    horizon: int
    """Steps per episode."""
    train_problems: list[int]
    """Problem ids of meta-training (the held-out ones are ``env.unwrapped.problems("test")``)."""


def make_problems(cfg: EnvConfig, algo: str, test_episodes: int) -> Problems:
    """Two envs of ``cfg`` checked to be a discrete-action problem family whose test (``test_episodes``
    meta-episodes) reaches a test problem, and their dimensions."""
    env, eval_env = problem_env(make_env(cfg)), problem_env(make_env(cfg))
    check_test_episodes(env, test_episodes)
    if not isinstance(env.action_space, spaces.Discrete):
        raise ConfigError(
            "env.id", f"{algo} (Q-learning) needs discrete actions; {cfg.id} has {env.action_space}"
        )
    return Problems(env, eval_env, int(env.action_space.n), int(np.prod(env.observation_space.shape)),
                    episode_steps(env), env.unwrapped.problems("train"))  # fmt: skip


def problem_env(env: gym.Env) -> gym.Env:
    """``env`` checked to be a meta-RL problem family (``problems(split)`` and ``reset(options={"problem"})``)."""
    if not hasattr(env.unwrapped, "problems"):
        raise ConfigError("env.id", f"{env.spec.id if env.spec else env} has no hidden problems (meta-RL needs "
                          "an env such as metalab/CityGrid-v0)")  # fmt: skip
    return env


def check_test_episodes(env: gym.Env, episodes: int) -> None:
    """Refuse a test of ``episodes`` meta-episodes that ends before the first test id: the held-out problems
    are played in order and the val ids are among them (:func:`evaluate_meta`)."""
    try:
        heldout = env.unwrapped.problems("heldout")
    except ValueError:  # a family without CityGrid's held-out split (navigation's trials): nothing to check
        return
    val_ids = set(env.unwrapped.problems("val"))
    first_test = next(i for i, p in enumerate(heldout) if p not in val_ids)
    if episodes <= first_test:
        raise ConfigError(
            "eval.episodes",
            f"{episodes} test meta-episodes reach no test problem; use at least {first_test + 1}",
        )


def play_episode(env: gym.Env, seed: int, options: dict, policy: Policy) -> tuple[list[Step], bool]:
    """One episode from ``env.reset(seed, options)`` driven by ``policy``; its steps and whether it succeeded."""
    obs, _ = env.reset(seed=seed, options=options)
    steps: list[Step] = []
    prev_action, prev_reward, success = -1, 0.0, False
    while True:
        action = int(policy(obs, prev_action, prev_reward, not steps))
        next_obs, reward, terminated, truncated, info = env.step(action)
        steps.append(Step(obs, action, float(reward), next_obs, bool(terminated)))
        success = bool(info.get("is_success", terminated))
        if terminated or truncated:
            return steps, success
        obs, prev_action, prev_reward = next_obs, action, float(reward)


def play_meta_episode(
    env: gym.Env,
    problem: int,
    seed: int,
    explore: Policy,
    exploit: Callable[[list[Step]], Policy],
) -> MetaEpisode:
    """Explore ``problem`` with ``explore``, then exploit it with ``exploit(exploration steps)``."""
    explore_steps, _ = play_episode(env, derive_seed(seed, 0), {"problem": problem, "explore": True}, explore)
    policy = exploit(explore_steps)
    exploit_steps, success = play_episode(env, derive_seed(seed, 1), {"problem": problem}, policy)
    return MetaEpisode(problem, explore_steps, exploit_steps, success)


class Trial(NamedTuple):
    """Episodes played one after the other on one problem (:func:`play_trial`)."""

    problem: int
    episodes: list[list[Step]]
    successes: list[bool]

    def returns(self) -> list[float]:
        """The undiscounted return of each episode."""
        return [float(sum(s.reward for s in episode)) for episode in self.episodes]

    def as_meta_episode(self) -> MetaEpisode:
        """The trial as a :class:`MetaEpisode` for :class:`Progress`: its earlier episodes as the exploration, its
        last as the exploitation (so ``train/return`` is the last episode's)."""
        earlier = [s for episode in self.episodes[:-1] for s in episode]
        return MetaEpisode(self.problem, earlier, self.episodes[-1], self.successes[-1])


def play_trial(env: gym.Env, problem: int, seed: int, policy: Policy, episodes: int) -> Trial:
    """``episodes`` rewarded episodes of ``problem`` (``reset(options={"problem": problem})``, episode ``e`` from
    ``derive_seed(seed, e)``), all driven by ``policy``: RL²'s recurrent policy keeps its memory across them."""
    played = [play_episode(env, derive_seed(seed, e), {"problem": problem}, policy) for e in range(episodes)]
    return Trial(problem, [steps for steps, _ in played], [success for _, success in played])


def evaluate_trials(
    env: gym.Env, part: str, trials: int, eval_seed: int, policy: Callable[[], Policy], episodes: int
) -> dict[str, float]:
    """``trials`` trials of ``episodes`` episodes cycling through the problems of ``part``, trial ``i`` from
    ``derive_seed(eval_seed, PART_INDEX[part], i)`` with a fresh ``policy()`` (memory reset between trials).

    ``<part>/return_after{k}``: the mean return of the episode after ``k`` earlier ones of the trial, for
    ``k < episodes``, with ``_ci95`` over trials; ``<part>/return``: that of the last episode."""
    problems = env.unwrapped.problems(part)
    keys = (eval_seed, PART_INDEX[part])
    returns = np.array([play_trial(env, problems[i % len(problems)], derive_seed(*keys, i), policy(),
                                   episodes).returns() for i in range(trials)])  # fmt: skip
    metrics: dict[str, float] = {}
    for k in range(episodes):
        est = mean_ci95(returns[:, k].tolist())
        metrics[f"{part}/return_after{k}"], metrics[f"{part}/return_after{k}_ci95"] = est.mean, est.ci95
    metrics[f"{part}/return"], metrics[f"{part}/return_ci95"] = est.mean, est.ci95
    return metrics


def history_input(
    obs: np.ndarray, prev_action: int, prev_reward: float, first: bool, n_actions: int
) -> np.ndarray:
    """What a recurrent agent reads at a step: ``[obs, one_hot(prev action), prev reward, first]``."""
    extra = np.array([prev_reward, float(first)], dtype=np.float32)
    return np.concatenate([np.asarray(obs, np.float32), one_hot(prev_action, n_actions), extra])


def history_dim(obs_dim: int, n_actions: int) -> int:
    return obs_dim + n_actions + 2


def episode_steps(env: gym.Env) -> int:
    """The step limit of one episode of ``env`` (its ``max_steps``)."""
    limit = getattr(env.unwrapped, "max_steps", None)
    if limit is None:
        raise ConfigError(
            "env.id", "meta-RL needs an env with a fixed episode length (a max_steps attribute)"
        )
    return int(limit)


def recurrent_policy(
    net: RecurrentNet, n_actions: int, eps: float, rng: np.random.Generator, device: torch.device
) -> Policy:
    """An epsilon-greedy policy over ``net``'s Q-values whose hidden state lives as long as the policy."""
    h: torch.Tensor | None = None

    def act(obs: np.ndarray, prev_action: int, prev_reward: float, first: bool) -> int:
        nonlocal h
        x = torch.from_numpy(history_input(obs, prev_action, prev_reward, first, n_actions)).to(device)
        with torch.no_grad():
            q, h = net(x[None, None], h)  # (1, 1, A)
        explore = eps > 0 and rng.random() < eps  # greedy evaluation draws nothing
        return int(rng.integers(n_actions)) if explore else int(q[0, -1].argmax())

    return act


def steps_to_sequence(episodes: Sequence[list[Step]], n_actions: int, task: int, length: int) -> Sequences:
    """One :class:`Sequences` row of consecutive episodes read as one history (RL²: exploration then
    exploitation; DREAM's explorer: the exploration episode alone), zero-padded to ``length`` steps.

    The last step of the last episode is terminal (the history ends there); episode boundaries inside are not,
    so value flows from later episodes back into earlier ones.
    """
    inputs, actions, rewards = [], [], []
    prev_action, prev_reward = -1, 0.0
    for episode in episodes:
        for i, step in enumerate(episode):
            first = i == 0
            if first:
                prev_action, prev_reward = -1, 0.0
            inputs.append(history_input(step.obs, prev_action, prev_reward, first, n_actions))
            actions.append(step.action)
            rewards.append(step.reward)
            prev_action, prev_reward = step.action, step.reward
    last = episodes[-1][-1]
    inputs.append(history_input(last.next_obs, last.action, last.reward, False, n_actions))
    t = len(actions)
    if t > length:
        raise ValueError(f"{t} steps do not fit a sequence of {length}")
    row = Sequences(
        inputs=np.zeros((1, length + 1, inputs[0].shape[0]), np.float32),
        action=np.zeros((1, length), np.int64),
        reward=np.zeros((1, length), np.float32),
        terminal=np.zeros((1, length), bool),
        mask=np.zeros((1, length), bool),
        task=np.array([task], dtype=np.int64),
    )
    row.inputs[0, : t + 1] = np.stack(inputs)
    row.action[0, :t] = actions
    row.reward[0, :t] = rewards
    row.terminal[0, t - 1] = True
    row.mask[0, :t] = True
    return row


Agent = Callable[[], tuple[Policy, Callable[[list[Step]], Policy]]]
"""Makes the two policies of one meta-episode: ``(explore, exploit)`` with ``exploit(explore steps) -> policy``."""


def play_problems(
    env: gym.Env, problems: list[int], episodes: int, keys: tuple[int, ...], agent: Agent
) -> list[MetaEpisode]:
    """``episodes`` meta-episodes cycling through ``problems``, meta-episode ``i`` from ``derive_seed(*keys, i)``.
    ``agent()`` is called once per meta-episode (fresh memory)."""
    results = []
    for i in range(episodes):
        explore, exploit = agent()
        seed = derive_seed(*keys, i)
        results.append(play_meta_episode(env, problems[i % len(problems)], seed, explore, exploit))
    return results


def summarize(prefix: str, results: list[MetaEpisode], walking: float | None) -> dict[str, float]:
    """``<prefix>return`` (mean exploitation return) and, where the env knows the return of walking to the goal
    without any exploration (CityGrid), ``<prefix>beats_walking``: the fraction of meta-episodes whose return
    beats it, which separates agents that use what they explored from agents that walk (every CityGrid agent
    that walks reaches its goal, so reaching it says nothing); elsewhere ``<prefix>success``. With 95% CIs."""
    ret = mean_ci95([r.exploit_return for r in results])
    out = {f"{prefix}return": ret.mean, f"{prefix}return_ci95": ret.ci95}
    if walking is None:
        est, name = mean_ci95([float(r.success) for r in results]), "success"
    else:
        est, name = mean_ci95([float(r.exploit_return > walking + 1e-6) for r in results]), "beats_walking"
    out[f"{prefix}{name}"], out[f"{prefix}{name}_ci95"] = est.mean, est.ci95
    return out


def evaluate_meta(env: gym.Env, part: str, episodes: int, eval_seed: int, agent: Agent) -> dict[str, float]:
    """Meta-episodes on the problems of ``part``, and as many on the training problems.

    ``val``: the val problems (``val/...``). ``test``: all held-out problems (val and test ids), reported as
    ``test/...`` on the test ids alone and ``test/heldout_...`` on all of them (DREAM's test set, to compare with
    the paper); the val ids are played with the test seeds, never with those of a periodic evaluation.
    ``train/problems_return`` (and ``_beats_walking``): on the training problems, what model selection
    (``train.keep_best``) may watch as it never looks at a held-out problem; beside the held-out return it also
    tells a failure to generalise (high on training problems, low on new ones) from a failure to learn.
    """
    walking = getattr(env.unwrapped, "walking_return", None)
    keys = (eval_seed, PART_INDEX[part])
    if part == "val":
        metrics = summarize(
            "val/", play_problems(env, env.unwrapped.problems("val"), episodes, keys, agent), walking
        )
    else:
        check_test_episodes(env, episodes)
        results = play_problems(env, env.unwrapped.problems("heldout"), episodes, keys, agent)
        val_ids = set(env.unwrapped.problems("val"))
        metrics = summarize("test/", [r for r in results if r.problem not in val_ids], walking)
        metrics.update(summarize("test/heldout_", results, walking))
    seen = play_problems(env, env.unwrapped.problems("train"), episodes, keys, agent)
    return {**metrics, **summarize("train/problems_", seen, walking)}


def render_meta_episode(
    env: gym.Env,
    problem: int,
    seed: int,
    explore: Policy,
    exploit: Callable[[list[Step]], Policy],
    path: Path,
) -> Path:
    """Play one meta-episode on ``env`` (made with ``render_mode="rgb_array"``) and save a PNG strip: the
    exploration episode on the top row, the exploitation episode below, one frame per state."""
    rows: list[list[np.ndarray]] = [[], []]

    def filmed(policy: Policy, row: list[np.ndarray]) -> Policy:
        def act(obs: np.ndarray, prev_action: int, prev_reward: float, first: bool) -> int:
            row.append(env.render())
            return policy(obs, prev_action, prev_reward, first)

        return act

    def exploit_filmed(steps: list[Step]) -> Policy:
        rows[0].append(env.render())  # the env still shows the last exploration state
        return filmed(exploit(steps), rows[1])

    episode = play_meta_episode(env, problem, seed, filmed(explore, rows[0]), exploit_filmed)
    rows[1].append(env.render())
    h, w, _ = rows[0][0].shape
    pad = 4
    width = max(len(r) for r in rows)
    canvas = Image.new("RGB", (width * (w + pad) + pad, 2 * (h + pad) + pad + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for r, frames in enumerate(rows):
        for c, frame in enumerate(frames):
            canvas.paste(Image.fromarray(frame), (pad + c * (w + pad), 16 + pad + r * (h + pad)))
    draw.text((pad, 2), f"problem {problem}: exploration (top), exploitation (bottom), "
                        f"return {episode.exploit_return:.2f}", fill="black")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
