"""The thin trainer: an optimizer loop around an algorithm's ``loss(step)``, with everything a long run needs.

An algorithm hands over a :class:`Learner`; :func:`fit` owns the rest: optimizer and schedule, gradient
clipping, progress bar, CSV/TensorBoard logs, periodic evaluation, atomic checkpoints, exact resume, a stop
on NaN/inf loss that keeps the last good checkpoint, and Ctrl-C that checkpoints before exiting.

Resume is exact because a checkpoint holds model, optimizer, schedule and every RNG state, and because
training batches are pure functions of the step index (see :mod:`metalab.data.episodes`).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from metalab.config import MAX_EPISODES, MAX_STEPS, MAX_TASKS, require, require_between
from metalab.errors import CheckpointError, ConfigError, NonFiniteLossError
from metalab.progress import progress
from metalab.train import distributed
from metalab.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_mismatch,
)
from metalab.train.logger import MetricLogger
from metalab.train.precision import emulated_bf16
from metalab.train.schedule import Extend, LrPlan, restore_schedule

log = logging.getLogger(__name__)

SELECTABLE = ("val/", "train/")
"""Metric namespaces model selection may read; ``test/`` is never one of them."""
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Outer-loop optimisation and bookkeeping."""

    steps: int = 1000
    """Optimizer steps (meta-iterations)."""
    meta_batch: int = 32
    """Tasks per step."""
    lr: float = 1e-3
    """Adam learning rate (the outer / meta learning rate)."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule over ``steps``."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; null for no clipping."""
    skip_nonfinite: int = 0
    """Skip an update whose loss (or, with ``grad_clip``, gradient norm) is not finite, at most this many steps
    in a row (counted in ``train/skipped_steps``); past that, and always with 0, training stops with an error.
    For learners whose rare outlier batches overflow (e.g. learned inner rates on high-amplitude tasks)."""
    log_every: int = 10
    """Log training metrics every this many steps."""
    eval_every: int = 500
    """Evaluate every this many steps (and at the end)."""
    eval_episodes: int = 100
    """Episodes of each periodic evaluation. Training evaluates the ``val`` part only (metrics ``val/...``); the
    ``test`` part is evaluated once, after training, on episodes no periodic evaluation draws."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much training time, counted across resumes; null for no limit."""
    checkpoint_every: int = 500
    """Checkpoint every this many steps (and at the end, on Ctrl-C)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; ``auto`` takes a GPU when one is present."""
    keep_best: str | None = None
    """Model selection: a ``val/...`` metric of the periodic evaluation (e.g. ``val/acc``) or one measured on
    training data (``train/...``, e.g. ``train/problems_return`` of meta-RL, on training problems only); a
    ``test/...`` metric is refused. The weights at the best evaluation so far are kept in the checkpoint and
    exported to ``best.pt`` (ties go to the later one), and :func:`fit` ends with them loaded, so the final
    test scores the selected model. Null: the final weights."""
    keep_best_mode: Literal["max", "min"] = "max"
    """Whether ``keep_best`` is better higher (accuracy, return) or lower (a loss)."""
    autocast: Literal["none", "bf16"] = "none"
    """``bf16``: the learner's forward passes (the training loss and every evaluation, val and test alike) run
    under ``torch.autocast`` with bfloat16: convolutions, matrix products and the activations between them in
    bfloat16; losses, prototypes and squared distances in float32; weights, BatchNorm's running statistics,
    gradients and optimizer state in float32. Only the episodic metric learners
    (:func:`metalab.meta.episodic.build_episodic`) and SNAIL take it; :func:`fit` refuses it for the others.
    It pays on a CPU with native bfloat16 (``avx512_bf16`` / ``amx_bf16`` flags) or a recent GPU (1.9-2.1x a
    training step on this project's CPU, ``benchmarks.throughput``); elsewhere it can be slower."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", "must be >= 1")
        require(self.meta_batch >= 1, "meta_batch", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")
        require(self.skip_nonfinite >= 0, "skip_nonfinite", "must be >= 0")
        require(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be > 0 or null")
        for key in ("log_every", "eval_every", "eval_episodes", "checkpoint_every"):
            require(getattr(self, key) >= 1, key, "must be >= 1")
        require_between(self.steps, "steps", 1, MAX_STEPS)
        require_between(self.meta_batch, "meta_batch", 1, MAX_TASKS)
        require_between(self.eval_episodes, "eval_episodes", 1, MAX_EPISODES)
        require(
            self.keep_best is None or self.keep_best.startswith(SELECTABLE),
            "keep_best",
            f"must name a validation or training metric (val/... or train/...), got {self.keep_best!r}: "
            f"selecting on test data would make the test a validation",
        )


@dataclass
class Learner:
    """What an algorithm gives the trainer.

    ``loss(step)`` draws batch ``step`` itself (deterministically) and returns the loss to minimise plus
    metrics to log; ``evaluate(part, episodes)`` returns metrics named ``<part>/...`` on a fixed set of
    ``episodes`` episodes of a data part, "val" or "test" (and may add ``train/...`` metrics measured on
    training data). :func:`fit` only ever asks for "val".

    A loss of ``None`` means "no update this step": the step still counts (an RL learner may only collect
    experience before its learning starts), but the optimizer and the schedule are left untouched, so the
    schedule counts updates.
    """

    model: nn.Module
    loss: Callable[[int], tuple[torch.Tensor | None, dict[str, float]]]
    evaluate: Callable[[str, int], dict[str, float]]
    parameters: list[nn.Parameter] | None = None
    """What the optimizer updates; defaults to ``model.parameters()``."""
    figures: Callable[[Path], list[Path]] | None = None
    """Draws the algorithm's own figures into a run directory after training (optional)."""
    state: Callable[[], dict] | None = None
    """Extra state to checkpoint beyond model/optimizer/RNG (a replay buffer, env state); tensors and plain data."""
    load_state: Callable[[dict], None] | None = None
    """Restores what ``state`` returned, on resume."""
    after_update: Callable[[int], None] | None = None
    """Called with the step index right after each optimizer step (e.g. to move a DQN target network)."""
    autocast: bool = False
    """Whether ``loss`` and ``evaluate`` apply ``train.autocast`` (:func:`metalab.train.precision.autocast`);
    :func:`fit` refuses a ``train.autocast`` other than ``none`` for a learner that does not."""


@dataclass
class FitResult:
    step: int
    """Steps completed."""
    interrupted: bool
    """Stopped by Ctrl-C (a checkpoint was saved)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last periodic evaluation."""
    seconds: float = 0.0
    """Training time of the run, across resumes."""
    best_step: int | None = None
    """With ``keep_best``: the step whose weights the learner ends with (None without it, or before any
    evaluation)."""
    best_value: float | None = None
    """With ``keep_best``: that step's value of the metric."""


def _make_optimizer(
    learner: Learner, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, LrPlan]:
    """Adam over the learner's parameters and a scheduler that follows an :class:`LrPlan` of ``cfg``."""
    params = learner.parameters if learner.parameters is not None else list(learner.model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    plan = LrPlan.start(cfg)
    # A plain function (not the bound method): LambdaLR then keeps it out of its state dict.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda update: plan.factor(update))
    return opt, sched, plan


PROGRESS_SECONDS = 30.0
"""Seconds between the plain progress lines of training when stderr is no terminal (CI logs, pipes)."""


class _TrainProgress:
    """Training progress through :func:`metalab.progress.progress`: a tqdm bar on a terminal, else a log line
    every :data:`PROGRESS_SECONDS` with the step, steps/s, loss and ETA. A resumed run counts the steps of this
    session (so the rate and the ETA are this session's), and says which step it started from."""

    def __init__(self, steps: int, step: int, name: str | None):
        """``name`` None: no progress at all (a rank other than 0)."""
        desc = name if step == 0 else f"{name} from step {step}"
        self._bar = (
            None if name is None else progress(steps - step, desc, unit="step", every=PROGRESS_SECONDS)
        )

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def set_postfix(self, **values: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def write(self, message: str) -> None:
        """A line of its own: above a tqdm bar, or a log line."""
        if isinstance(self._bar, tqdm):
            self._bar.write(message)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _NoLogger:
    """The metric log of a rank other than 0: it writes nothing."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class _StopFlag:
    """Turns the first SIGINT into a request to stop after the current step; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt received: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


Weights = dict[str, torch.Tensor]
Best = tuple[int, float, Weights]  # keep_best: (step, value, a copy of the model's state at that step)


def weights_file(run_dir: Path, cfg: TrainConfig) -> str:
    """The file in ``run_dir`` with the weights the run ends with: ``best.pt`` when it selected them with
    ``keep_best``, else its last checkpoint."""
    return BEST if cfg.keep_best is not None and (run_dir / BEST).is_file() else CHECKPOINT


def _select(
    cfg: TrainConfig, metrics: dict[str, float], step: int, best: Best | None, learner: Learner, run_dir: Path
) -> Best | None:
    """``keep_best``: take a copy of the weights (and export them to ``best.pt``) if this evaluation is at least
    as good as ``best``."""
    if cfg.keep_best not in metrics:
        raise ConfigError(
            "train.keep_best",
            f"{cfg.keep_best!r} is not a metric of this run's evaluation; it has: {', '.join(sorted(metrics))}",
        )
    value = float(metrics[cfg.keep_best])
    if not math.isfinite(value):
        return best
    if best is not None and (value < best[1] if cfg.keep_best_mode == "max" else value > best[1]):
        return best
    weights = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
    _export_best(cfg, run_dir, (step, value, weights))
    return step, value, weights


def _export_best(cfg: TrainConfig, run_dir: Path, best: Best) -> None:
    """Write the selected weights to ``best.pt`` (for ``metalab eval`` and other readers). The checkpoint holds
    them too and is what a resume trusts: a crash between the two writes leaves ``best.pt`` one evaluation
    ahead, and the resume rewrites it."""
    step, value, weights = best
    save_checkpoint(run_dir / BEST, {"step": step, "metric": cfg.keep_best, "value": value, "model": weights})


def _resumed_best(cfg: TrainConfig, state: dict, run_dir: Path) -> Best | None:
    """The selection a checkpoint records, with ``best.pt`` brought in line with it."""
    if state.get("best") is None:
        return None
    step, value = int(state["best"][0]), float(state["best"][1])
    if state.get("best_model") is None:  # checkpoints written before they carried the weights
        exported = load_checkpoint(run_dir / BEST)
        if int(exported["step"]) != step:
            raise CheckpointError(
                f"{run_dir / BEST} holds step {exported['step']}, the run's checkpoint says {step}"
            )
        return step, value, exported["model"]
    best = (step, value, state["best_model"])
    exported = load_checkpoint(run_dir / BEST) if (run_dir / BEST).is_file() else None
    if exported is None or int(exported["step"]) != step:
        log.warning(
            "train.keep_best: %s rewritten with the checkpoint's selection (step %d)", run_dir / BEST, step
        )
        _export_best(cfg, run_dir, best)
    return best


@dataclass
class _Session:
    """What :func:`fit` carries from step to step, and what a checkpoint saves besides model and optimizer."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    plan: LrPlan
    step: int = 0
    elapsed: float = 0.0
    """Training seconds of earlier sessions of this run."""
    skipped: int = 0
    """Updates skipped for a non-finite loss, in all."""
    in_a_row: int = 0
    """Updates skipped since the last good one."""
    best: Best | None = None
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        """Training seconds of the whole run so far."""
        return self.elapsed + time.perf_counter() - self.start

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]


def _restore(learner: Learner, cfg: TrainConfig, run: _Session, run_dir: Path, extend: Extend | None) -> None:
    """Load ``run_dir``'s checkpoint into ``learner`` and ``run`` (raises CheckpointError when it does not fit)."""
    ckpt_path = run_dir / CHECKPOINT
    state = load_checkpoint(ckpt_path)
    try:
        learner.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if learner.load_state is not None:
            learner.load_state(state["learner"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt_path} does not fit this run's model/config: {state_mismatch(e)}"
        ) from None
    run.step = int(state["step"])
    restore_schedule(cfg, state, run.sched, run.plan, run.step, extend)
    run.elapsed = float(state.get("elapsed", 0.0))
    run.skipped, run.in_a_row = state.get("skipped", (0, 0))
    if cfg.keep_best is not None:
        run.best = _resumed_best(cfg, state, run_dir)
    log.info("resumed from %s at step %d", ckpt_path, run.step)


def _checkpoint(learner: Learner, run: _Session, run_dir: Path) -> None:
    """Write the run's state to ``run_dir``'s checkpoint (atomically; rank 0 only)."""
    if not distributed.world().main:
        return
    best = run.best
    state = {
        "step": run.step,
        "model": learner.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "lr_plan": run.plan.state(),
        "rng": rng_state(),
        "elapsed": run.seconds(),
        "skipped": (run.skipped, run.in_a_row),
        "best": None if best is None else best[:2],
        "best_model": None if best is None else best[2],
    }
    if learner.state is not None:
        state["learner"] = learner.state()
    save_checkpoint(run_dir / CHECKPOINT, state)


def _update(
    learner: Learner,
    cfg: TrainConfig,
    run: _Session,
    loss: torch.Tensor,
    metrics: dict[str, float],
    ckpt: Path,
) -> None:
    """One optimizer step on ``loss`` (gradients averaged over ranks, clipped), or a skipped one when the loss or
    the gradient is not finite on some rank; too many skipped in a row raise NonFiniteLossError."""
    (finite,) = distributed.agree([bool(torch.isfinite(loss.detach()).all())], "all")
    if finite:
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(run.params())
        if cfg.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(run.params(), cfg.grad_clip)
            metrics["train/grad_norm"] = float(norm)
            finite = bool(torch.isfinite(norm))
    if not finite:
        run.opt.zero_grad(set_to_none=True)
        run.skipped, run.in_a_row = run.skipped + 1, run.in_a_row + 1
        if run.in_a_row > cfg.skip_nonfinite:
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {run.step} ({run.in_a_row} non-finite in a row, "
                f"train.skip_nonfinite={cfg.skip_nonfinite}); training stopped. The last good "
                f"checkpoint ({ckpt if ckpt.exists() else 'none yet'}) is kept. Try "
                f"a lower train.lr, set train.grad_clip, or raise train.skip_nonfinite."
            )
        log.warning("non-finite loss or gradient at step %d: update skipped", run.step)
    else:
        run.in_a_row = 0
        run.opt.step()
        run.sched.step()
        distributed.average_buffers(learner.model)
        if learner.after_update is not None:
            learner.after_update(run.step)
    if run.skipped:
        metrics["train/skipped_steps"] = run.skipped


def _finish(learner: Learner, cfg: TrainConfig, run: _Session, metrics: dict[str, float]) -> FitResult:
    """The result of a finished run; with ``train.keep_best``, the learner gets the selected weights back."""
    best = run.best
    if cfg.keep_best is None:
        return FitResult(run.step, False, metrics, run.seconds())
    if best is None:
        log.warning(
            "train.keep_best: no evaluation recorded %s; the learner keeps its last weights", cfg.keep_best
        )
        return FitResult(run.step, False, metrics, run.seconds())
    learner.model.load_state_dict(best[2])
    log.info("train.keep_best: weights of step %d (%s = %.4f)", best[0], cfg.keep_best, best[1])
    return FitResult(run.step, False, metrics, run.seconds(), best_step=best[0], best_value=best[1])


def fit(
    learner: Learner,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    extend: Extend | None = None,
    resumed: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``learner`` for ``cfg.steps`` steps in ``run_dir``, resuming from its checkpoint if ``resume``.

    On resume, ``cfg`` may differ from the checkpoint's run in its bookkeeping, in ``lr`` (the restored optimizer
    then uses the new rate) and in ``steps`` (a cosine schedule then needs ``extend``, see
    :meth:`LrPlan.extend`); a change the checkpoint does not fit raises before anything is written.
    ``resumed(step)`` is called once the checkpoint's state is restored and checked, before training goes on.
    """
    if cfg.autocast != "none" and not learner.autocast:
        raise ConfigError(
            "train.autocast",
            f"{cfg.autocast!r} is taken by the episodic metric learners and SNAIL only; use 'none'",
        )
    why = emulated_bf16(next(learner.model.parameters()).device) if cfg.autocast == "bf16" else None
    if why:
        log.warning(
            "train.autocast=bf16 on %s: likely slower than float32; train.autocast=none turns it off", why
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    main = distributed.world().main  # with several ranks (metalab.train.distributed), rank 0 logs and writes
    distributed.check_meta_batch(cfg.meta_batch)
    run = _Session(*_make_optimizer(learner, cfg))
    if resume:
        _restore(learner, cfg, run, run_dir, extend)
        if resumed is not None:
            resumed(run.step)
    run.start = time.perf_counter()
    logger = MetricLogger(run_dir, resume_step=run.step if resume else None) if main else _NoLogger()
    metrics: dict[str, float] = {}
    bar = _TrainProgress(cfg.steps, run.step, run_dir.name if main else None)
    spent = resume and cfg.max_minutes is not None and run.elapsed >= 60 * cfg.max_minutes
    if spent:  # a run that stopped on its time budget: resuming it takes no further step
        log.info("train.max_minutes=%s was spent at step %d: nothing to train", cfg.max_minutes, run.step)
    try:
        with _StopFlag() as stop:
            while run.step < cfg.steps and not spent:
                learner.model.train()
                loss, train_metrics = learner.loss(run.step)
                if loss is not None:
                    _update(learner, cfg, run, loss, train_metrics, run_dir / CHECKPOINT)
                run.step += 1
                bar.update()
                if run.step % cfg.log_every == 0:
                    logged = {"train/lr": run.sched.get_last_lr()[0], **train_metrics}
                    if loss is not None:
                        logged = distributed.average_metrics({"train/loss": loss.item(), **logged})
                        bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
                    logger.log(run.step, logged)
                out_of_time = cfg.max_minutes is not None and run.seconds() >= 60 * cfg.max_minutes
                out_of_time, stopping = distributed.agree([out_of_time, stop.requested])
                last = run.step == cfg.steps or out_of_time
                if main and (run.step % cfg.eval_every == 0 or last):
                    learner.model.eval()
                    metrics = learner.evaluate("val", cfg.eval_episodes)
                    logger.log(run.step, {**metrics, "time/train_seconds": run.seconds()})
                    bar.write(f"step {run.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                    if cfg.keep_best is not None:
                        run.best = _select(cfg, metrics, run.step, run.best, learner, run_dir)
                if run.step % cfg.checkpoint_every == 0 or last or stopping:
                    _checkpoint(learner, run, run_dir)
                if stopping:
                    return FitResult(run.step, True, metrics, run.seconds())
                if out_of_time:
                    log.info("train.max_minutes=%s reached at step %d", cfg.max_minutes, run.step)
                    break
    finally:
        bar.close()
        logger.close()
    return _finish(learner, cfg, run, metrics)
