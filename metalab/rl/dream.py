"""DREAM: decoupled reward-free exploration and execution in meta-RL (Liu, Raghunathan, Liang & Finn, ICML 2021).

End-to-end meta-RL (:mod:`metalab.rl.rl2`) learns to explore only from the exploitation return, which needs a
good exploiter, which needs good exploration. DREAM breaks that loop with the problem id ``mu``, known during
meta-training. Four parts train together, one Adam step on the sum of their losses:

- **Execution**: a Q-network ``Q_exec(s, z, a)`` on ``z ~ N(F(mu), rho^2 I)``, ``F`` a learned embedding of the
  training problem's id, behind an information bottleneck ``ib_weight * 0.5 * max(||F||^2, ib_cap)``: the
  official code's cap (ezliu/dream, ``ib_cap = 10``) by default, the paper's plain KL with ``ib_cap: 0``, and
  from ``ib_anneal_step`` on the plain KL with weight ``ib_late_weight``.
- **Decoder**: a GRU ``g`` that reads the exploration episode and predicts ``F(mu)`` after every step.
- **Exploration**: a recurrent Q-network rewarded by each step's information gain about ``z``,
  ``||g(tau_{:t}) - F(mu)||^2 - ||g(tau_{:t+1}) - F(mu)||^2`` minus a step cost ``c`` (paper, eq. 5-6),
  recomputed with the current decoder at every update. With ``reward_folds`` the gain is cross-fitted: each
  episode is rewarded by a decoder that never learned on its problem, which removes the distracting buses'
  shortcut (a decoder that reads the distracting rides of the training problems to guess the useful ones).
- As in the official loop, every ``decoded_every``-th meta-episode also executes on the decoded ``z``, and every
  ``exec_decoded_every``-th update the execution loss reads ``z`` from the decoder (gradient into it).

Both Q-networks use double-DQN targets with hard target copies. At meta-test time (held-out problems, no id) the
explorer runs greedily, the decoder turns its episode into ``z = g(tau)`` and the executor acts greedily on it;
``train/oracle_return`` (the executor given the true ``F(mu)``) tells an execution failure from an exploration
one. What each of these choices fixed, measured on CityGrid: ``docs/notes/dream.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.nn import functional as nnf  # not F: F is the paper's problem embedding

from metalab.config import MAX_BATCH, MAX_UNITS, require, require_between
from metalab.experiment import RunConfig
from metalab.models import MLP
from metalab.models.mlp import mlp_forward
from metalab.rl.buffer import ReplayBuffer
from metalab.rl.common import linear_schedule, td_target
from metalab.rl.meta_episodes import (
    Policy,
    Progress,
    QLearningConfig,
    Step,
    evaluate_meta,
    history_dim,
    make_problems,
    play_episode,
    play_meta_episode,
    recurrent_policy,
    render_meta_episode,
    steps_to_sequence,
)
from metalab.rl.recurrent import Params, RecurrentNet, Sequences, TransitionNet, sequence_td_loss, to_tensors
from metalab.rl.rollout import derive_seed
from metalab.stats import mean_ci95
from metalab.train.loop import Learner


@dataclass(frozen=True)
class Config(QLearningConfig):
    """DREAM hyperparameters (the ``dream`` section of a config); the Q-learning fields are documented in
    :class:`~metalab.rl.meta_episodes.QLearningConfig` (``batch_size``: exploration sequences per update, also the
    decoder's batch)."""

    z_dim: int = 16
    """Size of the task encoding ``z``."""
    noise: float = 0.1
    """``rho``: standard deviation of the Gaussian noise added to ``F(mu)`` during meta-training."""
    ib_weight: float = 1.0
    """Weight of the information bottleneck ``0.5 max(||F(mu)||^2, ib_cap)``."""
    ib_cap: float = 10.0
    """Squared norm of ``F(mu)`` below which the bottleneck does not push (official code: 10; 0: plain KL)."""
    decoded_every: int = 2
    """Every this many training meta-episodes, execute on the decoder's ``z`` instead of ``F(mu)`` (0: never)."""
    step_cost: float = 0.1
    """``c``: subtracted from every exploration reward (prefer short, informative exploration)."""
    step_cost_from: int = 0
    """Exploration steps are free before this trainer step and cost ``step_cost`` from it on. Where the explorer
    can end its episode (the official ``end_episode``), a cost from the start teaches it to stop before any
    decoder has learned what a ride is worth; with the cross-fitted reward, whose decoders learn only from the
    rides other explorations made, that is permanent (see docs/notes/dream.md). 0: from the start (paper)."""
    exec_batch_size: int = 128
    """Execution transitions per update (their buffer holds ``buffer_size`` times the horizon)."""
    ib_anneal_step: int = 0
    """From this trainer step on, the bottleneck is the plain KL ``0.5 ||F(mu)||^2`` (no cap) with weight
    ``ib_late_weight``: once execution relies on ``z``, squeeze out what it does not need (the distracting buses,
    which exploration should then not have to find). 0: never."""
    ib_late_weight: float = 0.01
    """Weight of the uncapped bottleneck from ``ib_anneal_step`` on."""
    decoder_input: str = "history"
    """What the decoder's GRU reads at each step. ``history``: the explorer's input (observation, previous action
    and reward). ``transitions``: the last transition ``(s, a, s')`` through a two-layer MLP, integer-valued
    observation dimensions one-hot (the official decoder embeds each transition this way, grid coordinates as
    discrete embeddings), so a ride is one input feature (where from, where to) instead of something the GRU has
    to assemble across steps."""
    reward_folds: int = 0
    """0: the explorer's reward is the information gain measured by the decoder (paper). ``K >= 2``: cross-fitted:
    the training problems are split at random into ``K`` folds, ``K`` more decoders each learn on all folds but
    one, and an exploration episode is rewarded by the gain of the decoder that never learned on its problem. A
    step then pays only for what it tells about a problem the decoder has not seen, as at meta-test time, not for
    correlations that hold only among the training problems (on CityGrid, where the distracting buses go)."""
    exec_decoded_every: int = 2
    """Every this many updates, the execution TD loss reads ``z`` from the decoder run on each transition's own
    exploration episode (gradient into the decoder) instead of ``F(mu)`` plus noise, as the official code does
    on alternate meta-episodes; so execution learns to act on the encodings it gets at meta-test time. 0: never."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_between(self.z_dim, "z_dim", 1, MAX_UNITS)
        require_between(self.exec_batch_size, "exec_batch_size", 1, MAX_BATCH)
        require_between(self.reward_folds, "reward_folds", 0, 64)
        for key in (
            "noise",
            "ib_weight",
            "ib_cap",
            "ib_anneal_step",
            "ib_late_weight",
            "step_cost",
            "step_cost_from",
            "decoded_every",
            "exec_decoded_every",
            "reward_folds",
        ):
            require(getattr(self, key) >= 0, key, "must be >= 0")
        require(self.reward_folds != 1, "reward_folds", "must be 0 (off) or >= 2")
        require(
            self.decoder_input in ("history", "transitions"),
            "decoder_input",
            "must be history or transitions",
        )


class ExecRows(NamedTuple):
    """Execution transitions (NumPy rows) with the training problem they came from."""

    obs: np.ndarray  # (R, obs_dim) float32
    action: np.ndarray  # (R,) int64
    reward: np.ndarray  # (R,) float32
    next_obs: np.ndarray  # (R, obs_dim)
    terminated: np.ndarray  # (R,) bool
    task: np.ndarray  # (R,) int64: index of the training problem
    explore_slot: np.ndarray  # (R,) int64: exploration buffer row that held this meta-episode's exploration
    episode: np.ndarray  # (R,) int64: the meta-episode's number (that row is stale once it holds a later one)


class DREAM(nn.Module):
    """The four learned parts: problem embedding ``F``, executor, decoder and explorer."""

    def __init__(self, n_problems: int, space: gym.spaces.Box, n_actions: int, cfg: Config, seed: int = 0):
        super().__init__()
        obs_dim = int(np.prod(space.shape))

        def decoder() -> nn.Module:
            if cfg.decoder_input == "transitions":
                return TransitionNet(space, n_actions, cfg.z_dim, cfg.hidden)
            return RecurrentNet(history_dim(obs_dim, n_actions), cfg.z_dim, cfg.hidden)

        self.embedding = nn.Embedding(n_problems, cfg.z_dim)  # F(mu)
        self.executor = MLP(obs_dim + cfg.z_dim, (cfg.hidden, cfg.hidden), n_actions)
        self.decoder = decoder()
        self.explorer = RecurrentNet(history_dim(obs_dim, n_actions), n_actions, cfg.hidden)
        # cross-fitted exploration reward: fold_decoders[k] never learns on the problems of fold k
        self.fold_decoders = nn.ModuleList([decoder() for _ in range(cfg.reward_folds)])
        folds = np.random.default_rng(seed).permutation(n_problems) % max(cfg.reward_folds, 1)
        self.register_buffer("fold", torch.from_numpy(folds.astype(np.int64)), persistent=False)


def information_gain_rewards(predictions: torch.Tensor, z: torch.Tensor, step_cost: float) -> torch.Tensor:
    """Exploration rewards ``(B, T)`` from the decoder's predictions ``(B, T+1, Z)`` before and after each step
    and the target encodings ``z (B, Z)``: the drop in squared error the step brought, minus ``step_cost``."""
    error = (predictions - z[:, None]).pow(2).sum(-1)  # (B, T+1)
    return error[:, :-1] - error[:, 1:] - step_cost


def bottleneck(encoding: torch.Tensor, cap: float = 0.0) -> torch.Tensor:
    """``0.5 max(||F(mu)||^2, cap)`` averaged over the batch; with ``cap = 0``, the KL of ``N(F, rho^2 I)`` to
    ``N(0, I)`` up to constants. Below the cap the penalty is flat: no gradient."""
    return 0.5 * encoding.pow(2).sum(-1).clamp_min(cap).mean()


def exec_td_loss(
    executor: Params, target: Params, z: torch.Tensor, batch: tuple[torch.Tensor, ...], cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """TD loss of ``Q_exec(s, z)`` on a batch ``(obs, action, reward, next_obs, terminated)`` and the mean Q."""
    obs, action, reward, next_obs, terminated = batch
    q = mlp_forward(executor, torch.cat([obs, z], -1)).gather(-1, action[:, None]).squeeze(-1)  # (B,)
    with torch.no_grad():
        nxt = torch.cat([next_obs, z.detach()], -1)
        online_next = mlp_forward(executor, nxt) if cfg.double else None
        y = td_target(reward, terminated.to(reward.dtype), mlp_forward(target, nxt), cfg.gamma, online_next)
    return nnf.smooth_l1_loss(q, y), q.detach().mean()


def final_predictions(model: DREAM, explorations: Sequences, device: torch.device) -> torch.Tensor:
    """The decoder's ``z`` after each whole exploration episode (``R`` padded rows): ``(R, Z)``. The GRU is
    causal, so padding after an episode's last step does not change its prediction there."""
    inputs = torch.from_numpy(explorations.inputs).to(device)  # (R, T+1, D)
    last = torch.from_numpy(explorations.mask.sum(1)).to(device)  # (R,) real steps: final prediction's index
    return model.decoder(inputs)[0][torch.arange(len(last), device=device), last]


def exec_encodings(
    model: DREAM,
    task_code: torch.Tensor,
    explorations: Sequences,
    still_stored: np.ndarray,
    device: torch.device,
) -> torch.Tensor:
    """Execution encodings ``(B, Z)``: :func:`final_predictions` of the ``B`` rows of ``explorations`` (with
    gradient into the decoder) where ``still_stored``, ``task_code`` elsewhere (rows whose exploration has left the buffer)."""
    if not still_stored.any():
        return task_code
    rows = np.flatnonzero(still_stored)
    chosen = Sequences(*(column[rows] for column in explorations))
    decoded = final_predictions(model, chosen, device)  # (L, Z)
    return task_code.index_put((torch.from_numpy(rows).to(device),), decoded)


def cross_fitted(
    model: DREAM,
    inputs: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    task: np.ndarray,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold decoders on a batch of exploration sequences ``inputs (B, T+1, D)`` of training problems ``task``
    with targets ``z (B, Z)`` and prefix weights ``(B, T+1)``: their summed loss, each on the rows outside its
    fold, and each row's predictions ``(B, T+1, Z)`` (detached) by the decoder of its own fold."""
    fold = model.fold[torch.from_numpy(task).to(device)]  # (B,)
    predictions = torch.stack([decoder(inputs)[0] for decoder in model.fold_decoders])  # (K, B, T+1, Z)
    errors = (predictions - z[:, None]).pow(2).sum(-1)  # (K, B, T+1)
    learns = fold[None, :] != torch.arange(len(model.fold_decoders), device=device)[:, None]  # (K, B)
    w = weight[None] * learns[..., None].to(weight.dtype)
    loss = ((errors * w).sum((1, 2)) / w.sum((1, 2)).clamp_min(1.0)).sum()
    return loss, predictions.detach()[fold, torch.arange(len(fold), device=device)]


def decode(model: DREAM, sequence: Sequences, device: torch.device) -> torch.Tensor:
    """The decoder's ``z`` after a whole exploration episode (one row): ``(Z,)``."""
    with torch.no_grad():
        return final_predictions(model, sequence, device)[0]


def exec_policy(
    model: DREAM, z: torch.Tensor, n_actions: int, eps: float, rng: np.random.Generator, device: torch.device
) -> Policy:
    """Epsilon-greedy execution on the fixed encoding ``z``."""

    def act(obs: np.ndarray, prev_action: int, prev_reward: float, first: bool) -> int:
        x = torch.cat([torch.from_numpy(np.asarray(obs, np.float32)).to(device), z])
        with torch.no_grad():
            q = model.executor(x[None])[0]
        explore = eps > 0 and rng.random() < eps
        return int(rng.integers(n_actions)) if explore else int(q.argmax())

    return act


@dataclass
class Dream:
    """Everything a DREAM run holds: the model, target copies, the two replay buffers, envs and counters."""

    run: RunConfig
    cfg: Config
    device: torch.device
    env: gym.Env
    eval_env: gym.Env
    n_actions: int
    horizon: int
    train_problems: list
    model: DREAM
    targets: dict[str, Params]
    """Hard target copies of the ``executor`` and ``explorer`` parameters."""
    explore_buffer: ReplayBuffer[Sequences]
    exec_buffer: ReplayBuffer[ExecRows]
    explore_episode: np.ndarray
    """``(buffer_size,)`` the meta-episode each exploration row holds (-1: none yet)."""
    rng: np.random.Generator
    progress: Progress = field(default_factory=Progress)

    def sequence(self, steps: list[Step], task: int = -1) -> Sequences:
        """One exploration episode as a padded sequence row."""
        return steps_to_sequence([steps], self.n_actions, task, self.horizon)


def params(part: nn.Module) -> Params:
    return dict(part.named_parameters())


def noisy_encoding(dream: Dream, index: int) -> torch.Tensor:
    """``z ~ N(F(mu), rho^2 I)`` for training problem ``index`` (no gradient)."""
    with torch.no_grad():
        f = dream.model.embedding.weight[index]
        noise = dream.rng.standard_normal(dream.cfg.z_dim).astype(np.float32)
        return f + dream.cfg.noise * torch.from_numpy(noise).to(dream.device)


def collect(dream: Dream, eps: float) -> dict[str, float]:
    """Play one meta-episode on a random training problem (epsilon-greedy) into both buffers."""
    cfg, progress, model = dream.cfg, dream.progress, dream.model
    index = int(dream.rng.integers(len(dream.train_problems)))
    decoded = cfg.decoded_every > 0 and progress.episodes % cfg.decoded_every == cfg.decoded_every - 1
    z = noisy_encoding(dream, index)

    def exploit(steps: list[Step]) -> Policy:
        task_code = decode(model, dream.sequence(steps), dream.device) if decoded else z
        return exec_policy(model, task_code, dream.n_actions, eps, dream.rng, dream.device)

    explore = recurrent_policy(model.explorer, dream.n_actions, eps, dream.rng, dream.device)
    seed = derive_seed(dream.run.seed, 0, progress.episodes)
    episode = play_meta_episode(dream.env, dream.train_problems[index], seed, explore, exploit)
    slot = dream.explore_buffer.pos
    dream.explore_buffer.add(dream.sequence(episode.explore, index))
    dream.explore_episode[slot] = progress.episodes
    steps = episode.exploit
    dream.exec_buffer.add(ExecRows(
        obs=np.stack([s.obs for s in steps]).astype(np.float32),
        action=np.array([s.action for s in steps], np.int64),
        reward=np.array([s.reward for s in steps], np.float32),
        next_obs=np.stack([s.next_obs for s in steps]).astype(np.float32),
        terminated=np.array([s.terminated for s in steps], bool),
        task=np.full(len(steps), index, np.int64),
        explore_slot=np.full(len(steps), slot, np.int64),
        episode=np.full(len(steps), progress.episodes, np.int64),
    ))  # fmt: skip
    progress.record(episode)
    return {"train/decoded": float(decoded)}


def execution_losses(dream: Dream, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Execution on ``z ~ N(F(mu), rho^2 I)`` (or on the decoder's ``z`` every ``exec_decoded_every``-th
    update) and the bottleneck on ``F(mu)``, weighted: their sum and metrics."""
    cfg, model, device = dream.cfg, dream.model, dream.device
    rows = dream.exec_buffer.sample_rows(cfg.exec_batch_size, dream.rng)
    batch = tuple(torch.from_numpy(a).to(device) for a in rows[:5])
    f = model.embedding(torch.from_numpy(rows.task).to(device))  # (B, Z)
    noise = torch.from_numpy(dream.rng.standard_normal(f.shape).astype(np.float32)).to(device)
    task_code = f + cfg.noise * noise
    decoded = cfg.exec_decoded_every > 0 and step % cfg.exec_decoded_every == cfg.exec_decoded_every - 1
    if decoded:
        still_stored = dream.explore_episode[rows.explore_slot] == rows.episode
        explorations = dream.explore_buffer.rows(rows.explore_slot)
        task_code = exec_encodings(model, task_code, explorations, still_stored, device)
    exec_loss, q_exec = exec_td_loss(params(model.executor), dream.targets["executor"], task_code, batch, cfg)
    late = cfg.ib_anneal_step > 0 and step >= cfg.ib_anneal_step
    ib = bottleneck(f, 0.0 if late else cfg.ib_cap)
    ib_weight = cfg.ib_late_weight if late else cfg.ib_weight
    metrics = {"loss/exec": exec_loss.item(), "loss/bottleneck": ib.item(), "train/ib_weight": ib_weight,
               "train/q_exec": q_exec.item()}  # fmt: skip
    return exec_loss + ib_weight * ib, metrics


def exploration_losses(dream: Dream, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The decoder and the explorer on the same exploration sequences (trainer step ``step``): their losses and
    metrics."""
    cfg, model, device = dream.cfg, dream.model, dream.device
    seq = dream.explore_buffer.sample_rows(cfg.batch_size, dream.rng)
    batch = to_tensors(seq, device)
    inputs, mask = batch.inputs, batch.mask
    z = model.embedding(torch.from_numpy(seq.task).to(device)).detach()  # (B, Z)
    predictions = model.decoder(inputs)[0]  # (B, T+1, Z)
    weight = torch.cat([torch.ones_like(mask[:, :1]), mask], 1).to(predictions.dtype)  # prefixes 0..T
    errors = (predictions - z[:, None]).pow(2).sum(-1)  # (B, T+1)
    decoder_loss = (errors * weight).sum() / weight.sum()
    if cfg.reward_folds:
        fold_loss, decoded_predictions = cross_fitted(model, inputs, z, weight, seq.task, device)
        decoder_loss = decoder_loss + fold_loss
    else:
        decoded_predictions = predictions.detach()
    step_cost = cfg.step_cost if step >= cfg.step_cost_from else 0.0
    reward = information_gain_rewards(decoded_predictions, z, step_cost) * mask
    explore_loss, q_explore = sequence_td_loss(model.explorer, params(model.explorer), dream.targets["explorer"],
                                               batch._replace(reward=reward), cfg.gamma, cfg.double)  # fmt: skip
    metrics = {"loss/decoder": decoder_loss.item(), "loss/explore": explore_loss.item(),
               "train/q_explore": q_explore.item(), "train/decoder_error_final": errors[:, -1].mean().item(),
               "train/explore_reward": (reward.sum(1)).mean().item(),
               "train/step_cost": step_cost}  # fmt: skip
    return decoder_loss, explore_loss, metrics


def loss(dream: Dream, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
    """One trainer step: a meta-episode when due, then one update of all four parts (none before
    ``learning_starts`` meta-episodes)."""
    cfg = dream.cfg
    eps = linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_fraction * dream.run.train.steps, step)
    collected = collect(dream, eps) if step % cfg.collect_every == 0 else {}
    metrics = {"train/epsilon": eps, **collected, **dream.progress.metrics()}
    if dream.progress.episodes < max(cfg.learning_starts, 1):
        return None, metrics
    execution, exec_metrics = execution_losses(dream, step)
    decoder_loss, explore_loss, explore_metrics = exploration_losses(dream, step)
    return execution + decoder_loss + explore_loss, {**metrics, **exec_metrics, **explore_metrics}


def after_update(dream: Dream, step: int) -> None:
    """Hard target copies every ``target_every`` updates."""
    if (step + 1) % dream.cfg.target_every == 0:
        for name, target in dream.targets.items():
            target.update({k: v.detach().clone() for k, v in params(getattr(dream.model, name)).items()})


def agent(dream: Dream) -> tuple[Policy, Callable[[list[Step]], Policy]]:
    """The meta-test agent: the greedy explorer, and the greedy executor on the decoder's ``z``."""

    def exploit(steps: list[Step]) -> Policy:
        z = decode(dream.model, dream.sequence(steps), dream.device)
        return exec_policy(dream.model, z, dream.n_actions, 0.0, dream.rng, dream.device)

    return recurrent_policy(dream.model.explorer, dream.n_actions, 0.0, dream.rng, dream.device), exploit


def evaluate(dream: Dream, part: str, episodes: int) -> dict[str, float]:
    """The whole agent on ``part``'s problems, and ``train/oracle_return``: the executor on training problems."""
    # The whole agent (exploration, decoding, execution) on held-out and on training problems: when the latter
    # is high and the former low, decoding does not generalise to new problems (e.g. the encoding F(mu) still
    # carries problem identity, such as the distracting buses, that exploration cannot or should not find).
    metrics = evaluate_meta(dream.eval_env, part, episodes, dream.run.eval.seed, lambda: agent(dream))
    # The executor alone on training problems, told their true encoding F(mu) (no noise): when this is low
    # too, execution has not learned to use z; when only the held-out return is low, exploration or decoding
    # is what fails.
    returns = []
    for i in range(episodes):
        index = i % len(dream.train_problems)
        with torch.no_grad():
            z = dream.model.embedding.weight[index]
        seed = derive_seed(dream.run.eval.seed, 2, i)
        policy = exec_policy(dream.model, z, dream.n_actions, 0.0, dream.rng, dream.device)
        steps, _ = play_episode(dream.eval_env, seed, {"problem": dream.train_problems[index]}, policy)
        returns.append(sum(s.reward for s in steps))
    oracle = mean_ci95(returns)
    return {**metrics, "train/oracle_return": oracle.mean, "train/oracle_return_ci95": oracle.ci95}


def figures(dream: Dream, run_dir: Path) -> list[Path]:
    """A rendered meta-episode on the first test problem."""
    problem = dream.env.unwrapped.problems("test")[0]
    filmed = gym.make(dream.run.env.id, render_mode="rgb_array")
    return [
        render_meta_episode(filmed, problem, dream.run.eval.seed, *agent(dream), run_dir / "meta_episode.png")
    ]


def state(dream: Dream) -> dict[str, Any]:
    """What a checkpoint needs beyond the model: targets, buffers, RNG and counters."""
    return {
        "targets": {n: {k: v.detach().clone() for k, v in t.items()} for n, t in dream.targets.items()},
        "explore_buffer": dream.explore_buffer.state(),
        "explore_episode": torch.from_numpy(dream.explore_episode.copy()),
        "exec_buffer": dream.exec_buffer.state(),
        "rng": dream.rng.bit_generator.state,
        "progress": dream.progress.state(),
    }


def load_state(dream: Dream, saved: dict[str, Any]) -> None:
    for name, target in dream.targets.items():
        target.update({k: v.to(dream.device) for k, v in saved["targets"][name].items()})
    dream.explore_buffer.load_state(saved["explore_buffer"])
    dream.explore_episode[:] = saved["explore_episode"].numpy()
    dream.exec_buffer.load_state(saved["exec_buffer"])
    dream.rng.bit_generator.state = saved["rng"]
    dream.progress.load_state(saved["progress"])


def build(run: RunConfig, data_root: Path, device: torch.device) -> Learner:
    """DREAM's networks, replay buffers and trainer hooks (``data_root`` unused)."""
    cfg: Config = run.params
    env, eval_env, n_actions, _, horizon, train_problems = make_problems(run.env, "DREAM", run.eval.episodes)
    model = DREAM(len(train_problems), env.observation_space, n_actions, cfg, derive_seed(run.seed, 3))
    model = model.to(device)
    dream = Dream(
        run, cfg, device, env, eval_env, n_actions, horizon, train_problems, model,
        targets={name: {k: v.detach().clone() for k, v in params(getattr(model, name)).items()}
                 for name in ("executor", "explorer")},
        explore_buffer=ReplayBuffer(cfg.buffer_size, Sequences),
        exec_buffer=ReplayBuffer(cfg.buffer_size * horizon, ExecRows),
        explore_episode=np.full(cfg.buffer_size, -1, np.int64),
        rng=np.random.default_rng(derive_seed(run.seed, 1)),
    )  # fmt: skip
    return Learner(model, partial(loss, dream), partial(evaluate, dream), state=partial(state, dream),
                   load_state=partial(load_state, dream), after_update=partial(after_update, dream),
                   figures=partial(figures, dream))  # fmt: skip
