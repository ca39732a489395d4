"""The shared shape of gradient-based meta-learners (the MAML family): config fields, networks, per-task losses,
task batching, and evaluation after adaptation.

A variant supplies two pure functions of its meta-parameters: a training loss over a batched episode, and
``predict(inner, meta, support_x, support_y, x)``, which adapts to one task's support set as :class:`Inner`
says and returns the adapted model's outputs at ``x``. Evaluation and the sinusoid figure are built on
``predict``, so training and testing go through the variant's one inner loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from metalab.calibration import PooledQueries
from metalab.config import MAX_FILTERS, MAX_INNER_STEPS, MAX_TASKS, require, require_between, require_widths
from metalab.data.episodes import Episode
from metalab.data.sinusoid import sinusoid, with_task_code
from metalab.data.tasks import EvalSamplers, make_sampler
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta.adapt import Params
from metalab.models import MLP, Conv4
from metalab.train.distributed import shard
from metalab.train.evaluate import evaluate_episode_columns, evaluate_episodes
from metalab.train.loop import Learner
from metalab.train.plots import plot_curves

Meta = Any
"""A variant's meta-parameters: a ``Params`` dict, or a dict of them (e.g. weights and learned inner rates)."""
Predict = Callable[["Inner", Meta, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(inner, meta, support_x, support_y, x) -> outputs at x`` of the model adapted to one task."""


@dataclass(frozen=True)
class InnerLoopConfig:
    """Fields every gradient-based variant shares; each variant's ``Config`` adds its own."""

    inner_lr: float = 0.01
    """Inner-loop (adaptation) step size alpha (the initial value where the rates are learned)."""
    inner_steps: int = 1
    """Inner gradient steps during meta-training."""
    eval_inner_steps: int = 10
    """Inner gradient steps at evaluation (may exceed ``inner_steps``; ``metalab eval --inner-steps``)."""
    batching: Literal["auto", "vmap", "chunk", "loop", "grad_loop"] = "auto"
    """How the tasks of a meta-batch are run (see :func:`task_batching`): ``vmap`` (one ``torch.func.vmap``
    over all tasks: by far the fastest for MLPs), ``chunk`` (``vmap`` over ``chunk_size`` tasks at a time),
    ``loop`` (a Python loop; faster for convs on CPU, where per-task weights turn every convolution into a
    grouped one), ``grad_loop`` (a loop that takes each task's meta-gradient at once and frees its graph:
    the memory of one task; variants whose loss is the mean query loss only), or ``auto``: ``vmap``, except
    ``loop`` for a network with convolutions on a CPU."""
    chunk_size: int = 8
    """Tasks per ``vmap`` call with ``batching: chunk``."""
    hidden: int = 64
    """Conv-4 filters (Omniglot) ..."""
    mlp_hidden: tuple[int, ...] = (40, 40)
    """... or MLP hidden sizes (sinusoid)."""

    def __post_init__(self) -> None:
        require(self.inner_lr > 0, "inner_lr", "must be > 0")
        require_between(self.inner_steps, "inner_steps", 1, MAX_INNER_STEPS)
        require_between(self.eval_inner_steps, "eval_inner_steps", 1, MAX_INNER_STEPS)
        require_between(self.chunk_size, "chunk_size", 1, MAX_TASKS, " (tasks per vmap call)")
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require_widths(self.mlp_hidden, "mlp_hidden")


@dataclass(frozen=True)
class Inner:
    """How one task adapts, everything but the meta-parameters and the task's data: the network, its loss, and
    the steps. Per-task functions of the MAML family take it first, ``fn(inner, meta, support_x, support_y,
    ...)``; it is bound with ``functools.partial`` before ``vmap``, which maps over the task tensors alone."""

    model: nn.Module
    """The network, run with ``functional_call`` on adapted parameters."""
    regression: bool
    """MSE loss and score (sinusoid), or cross-entropy loss and accuracy (classification)."""
    lr: float
    """Inner step size alpha (Meta-SGD and MAML++ learn theirs and do not read it)."""
    steps: int
    """Inner gradient steps: ``inner_steps`` in training, ``eval_inner_steps`` at evaluation."""
    first_order: bool = False
    """Treat inner gradients as constants (FOMAML). Evaluation always adapts first order: it takes no outer
    gradient (see :func:`build_learner`)."""

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:func:`task_loss` of ``model`` with ``params`` on ``(x, y)``."""
        return task_loss(self.model, self.regression, params, x, y)


def network(run: RunConfig, cfg: InnerLoopConfig) -> nn.Module:
    """MAML's architectures: an MLP for sinusoid (1 input, or ``x`` and the task code of the NME family), a
    strided Conv-4 with ``task.ways`` logits otherwise."""
    if run.task.dataset == "sinusoid":
        return MLP(run.task.input_features, cfg.mlp_hidden, 1)
    check_ways(run)
    return Conv4(1, cfg.hidden, n_classes=run.task.ways, strided=True, image_size=run.task.image_size)


def check_ways(run: RunConfig) -> None:
    """A classifier head has ``task.ways`` outputs, so training must use as many ways as testing."""
    if run.task.train_ways not in (None, run.task.ways):
        raise ConfigError(
            "task.train_ways", f"{run.algo}'s head has task.ways outputs: train_ways must equal ways"
        )


def task_loss(
    model: nn.Module, regression: bool, params: Params, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Loss of ``model`` with ``params`` on one task's ``(x, y)``: MSE for regression, cross-entropy otherwise."""
    return output_loss(functional_call(model, params, (x,)), y, regression)


def output_loss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    return F.mse_loss(out, y) if regression else F.cross_entropy(out, y)


def output_score(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    """What evaluation reports per task: MSE for regression, accuracy for classification."""
    return F.mse_loss(out, y) if regression else (out.argmax(-1) == y).float().mean()


def loss_and_score(out: torch.Tensor, y: torch.Tensor, regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's (query loss, query score: accuracy or MSE) from the adapted model's outputs ``out`` at the query
    inputs. The loss stays differentiable; the score is detached."""
    return output_loss(out, y, regression), output_score(out, y, regression).detach()


def mean_query_loss(
    per_task: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    batching: TaskBatching,
    meta: Callable[[], Meta],
    regression: bool,
) -> Callable[[int, Episode], tuple[torch.Tensor, dict[str, float]]]:
    """The usual training loss: ``per_task(meta, *task)`` query losses averaged over the meta-batch.

    With ``grad_loop`` batching the loss is :func:`freed_mean_loss`'s surrogate: the same value and the same
    gradient, with each task's graph freed as soon as its gradient is taken.
    """
    score = "mse" if regression else "acc"

    def train_loss(step: int, ep: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        if batching.mode == "grad_loop":
            loss, scores = freed_mean_loss(per_task, ep, meta())
        else:
            losses, scores = map_tasks(per_task, ep, batching, meta())
            loss = losses.mean()
        return loss, {f"train/{score}": scores.mean().item()}

    return train_loss


def freed_mean_loss(
    per_task: Callable[..., tuple[torch.Tensor, torch.Tensor]], ep: Episode, meta: Meta
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over the tasks of ``ep`` of ``per_task(meta, *task)``'s loss, differentiated task by task.

    Each task's meta-gradient is taken with ``torch.autograd.grad`` as soon as its loss exists, which frees
    that task's graph (its inner steps and their second-order terms) before the next task runs: peak memory is
    one task's graph, not the meta-batch's. The trainer calls ``backward`` on what a loss returns, so the
    gradients are handed over as a surrogate (as in :func:`metalab.meta.imaml.surrogate`): its value is the
    mean query loss, its gradient in ``meta`` the mean of the per-task gradients. Returns
    ``(surrogate, scores)``, scores ``(T,)``.
    """
    leaves = [t for t in _tensors(meta) if t.requires_grad]
    total = [torch.zeros_like(t) for t in leaves]  # sum over tasks of d loss_t / d leaf
    losses, scores = [], []
    for i in range(ep.tasks):
        loss, score = per_task(meta, *ep.task(i)[:4])
        if loss.requires_grad:  # not under no_grad
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # frees this task's graph
            for acc, g in zip(total, grads, strict=True):
                if g is not None:  # None: the loss does not depend on this leaf
                    acc.add_(g)
        losses.append(loss.detach())
        scores.append(score)
    mean = torch.stack(losses).mean()
    if not leaves:
        return mean, torch.stack(scores)
    linear = sum((t * (g / ep.tasks)).sum() for t, g in zip(leaves, total, strict=True))
    return linear - linear.detach() + mean, torch.stack(scores)


def _tensors(meta: Meta) -> list[torch.Tensor]:
    """The tensors of ``meta`` (a ``Params`` dict or a dict of them), in order."""
    if isinstance(meta, dict):
        return [t for v in meta.values() for t in _tensors(v)]
    return [meta]


def params_of(model: nn.Module) -> Callable[[], Params]:
    """The meta-parameters of variants that meta-learn only the network's weights: its current parameter dict."""
    return lambda: dict(model.named_parameters())


def has_torch_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds torch's own BatchNorm layers, whose second derivatives are wrong under vmap
    (metalab's :class:`~metalab.models.BatchNorm2d` is exact there)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def auto_mode(
    convolutional: bool, device: torch.device, grad_loop: bool = False
) -> Literal["vmap", "loop", "grad_loop"]:
    """``batching: auto``: ``vmap``, except a loop for convolutional networks on a CPU: ``grad_loop`` where the
    variant supports it (``grad_loop=True``), else ``loop``.

    Measured for second-order MAML (``python -m benchmarks.maml_speed``; results/maml_speed.json). 2-core CPU
    (under load): one vmap over 25 sinusoid tasks ran 14.6x faster than ``higher``, but for the Conv-4 (5-way
    1-shot, meta-batch 32) vmap ran at 0.57x and the loop at 1.08x, since per-task weights turn every
    convolution into a grouped one. NVIDIA H200: vmap ran at 17.0x (sinusoid) and 16.7x (Conv-4) against 1.4x
    and 1.2x for the loop. Precision on that GPU (Conv-4, 8 tasks, float32 meta-gradient against a float64
    one): the vmapped grouped convolutions are less precise than the loop's, 5.9e-2 relative error against 8.0e-3 with
    torch's default TF32 convolutions, 2.3e-4 against 2.3e-6 without TF32 (in float64 both agree to 1e-15;
    on the CPU, meta-batch 32, 3.1e-5 against 1.9e-6). Set ``batching: loop`` where that matters more than a
    14x faster step. Of the two loops on the CPU, ``grad_loop`` ran at 1.06x ``higher`` with 0.99x its peak
    memory, ``loop`` at 1.08x with 17x (it keeps every task's graph until the backward pass): the same speed
    within the noise of a shared machine, so ``grad_loop`` where it applies.
    """
    if convolutional and device.type == "cpu":
        return "grad_loop" if grad_loop else "loop"
    return "vmap"


class TaskBatching(NamedTuple):
    """A config's ``batching`` resolved for one model (``auto`` decided, refusals made): how the tasks of a
    meta-batch are run. Build it with :func:`task_batching`."""

    mode: Literal["vmap", "chunk", "loop", "grad_loop"]
    chunk_size: int | None = None
    """Tasks per ``vmap`` call (``chunk`` only; None: all at once)."""

    @property
    def vmapped(self) -> bool:
        return self.mode in ("vmap", "chunk")


def task_batching(
    algo: str, cfg: InnerLoopConfig, model: nn.Module, second_order: bool, grad_loop: bool = False
) -> TaskBatching:
    """Resolve ``cfg.batching`` for ``model`` (``auto``: :func:`auto_mode` for the model's device).

    ``grad_loop`` must be implemented by the variant's loss (``grad_loop=True``: its loss is
    :func:`mean_query_loss`); elsewhere it is refused. Second-order gradients through torch's own vmapped
    BatchNorm are silently wrong (pytorch/functorch#534; the loop is right), so ``vmap`` and ``chunk`` are
    refused for models that hold it; metalab's networks use :class:`~metalab.models.BatchNorm2d`, exact there.
    """
    key = f"{algo}.batching"
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    device = next(model.parameters()).device
    mode = cfg.batching if cfg.batching != "auto" else auto_mode(convolutional, device, grad_loop)
    if mode == "grad_loop" and not grad_loop:
        raise ConfigError(
            key,
            f"grad_loop applies to variants whose loss is the mean query loss (maml, anil, cavia, metasgd), "
            f"not {algo}; use loop",
        )
    if mode in ("vmap", "chunk") and second_order and has_torch_batchnorm(model):
        loops = "loop, grad_loop or auto" if grad_loop else "loop or auto"
        raise ConfigError(
            key,
            f"{mode} gives wrong second-order gradients through torch's BatchNorm (a PyTorch limitation; "
            f"metalab.models.BatchNorm2d is exact under vmap); "
            f"use batching: {loops}, or first-order gradients",
        )
    return TaskBatching(mode, cfg.chunk_size if mode == "chunk" else None)


def map_tasks(fn: Callable[..., Any], ep: Episode, batching: TaskBatching, *shared: Any) -> Any:
    """``fn(*shared, support_x, support_y, query_x, query_y)`` for every task of ``ep``, stacked on dim 0.

    ``shared`` (meta-parameters) is the same for every task; the result is a tensor, tuple or dict of
    ``(T, ...)`` tensors, computed by ``vmap`` (over all tasks or ``chunk_size`` at a time) or by a loop over
    tasks (``loop`` and ``grad_loop``: freeing graphs is the business of :func:`freed_mean_loss`).
    """
    if batching.vmapped:
        in_dims = (None,) * len(shared) + (0, 0, 0, 0)
        return vmap(fn, in_dims=in_dims, chunk_size=batching.chunk_size)(*shared, *ep[:4])
    return _stack([fn(*shared, *ep.task(i)[:4]) for i in range(ep.tasks)])


def _stack(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, dict):
        return {k: _stack([o[k] for o in outs]) for k in first}
    if isinstance(first, tuple):
        return tuple(_stack(list(items)) for items in zip(*outs, strict=True))
    return torch.stack(outs)


def detached(meta: Meta) -> Meta:
    """A copy of ``meta`` cut from the autograd graph (the tensors are shared, not cloned)."""
    if isinstance(meta, dict):
        return {k: detached(v) for k, v in meta.items()}
    return meta.detach()


class ParamTable(nn.Module):
    """Learned tensors keyed by a network's parameter names: Meta-SGD's rates, MAML++'s per-step rates and
    BatchNorm weights. Being parameters of the learner's model, they are checkpointed and loaded by
    ``metalab eval`` with it. Attribute names cannot hold dots, so ``.`` is stored as ``:``.
    """

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        for name, value in values.items():
            self.register_parameter(name.replace(".", ":"), nn.Parameter(value.detach().clone()))

    def as_dict(self) -> Params:
        return {name.replace(":", "."): p for name, p in self._parameters.items() if p is not None}


def build_learner(
    run: RunConfig,
    root: Path,
    device: torch.device,
    *,
    model: nn.Module,
    meta: Callable[[], Meta],
    train_loss: Callable[[int, Episode], tuple[torch.Tensor, dict[str, float]]],
    predict: Predict,
    inner: Inner,
    batching: TaskBatching,
    parameters: list[nn.Parameter] | None = None,
) -> Learner:
    """The trainer's view of a variant: ``train_loss(step, episode)`` to minimise, and evaluation of ``predict``
    after ``eval_inner_steps`` inner steps on each test task (mean and 95% CI): MSE for regression; for
    classification accuracy, NLL and the pooled ECE of the adapted logits
    (:class:`~metalab.calibration.PooledQueries`).

    ``model`` is what is checkpointed and, unless ``parameters`` says otherwise, trained; ``meta()`` gives the
    meta-parameters that ``predict`` adapts from; ``inner`` is the variant's training inner loop, which
    evaluation runs with ``eval_inner_steps`` steps, first order (no outer gradient is taken there).
    """
    cfg: InnerLoopConfig = run.params
    regression = run.task.dataset == "sinusoid"
    train = make_sampler(run.task, "train", run.seed, root)
    evals = EvalSamplers(run.task, run.eval.seed, root)
    tested = replace(inner, steps=cfg.eval_inner_steps, first_order=True)

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return train_loss(step, shard(train.sample(step, run.train.meta_batch)).to(device))

    def evaluate(part: str, n: int) -> dict[str, float]:
        def one_task(m: Meta, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
            out = predict(tested, m, sx, sy, qx)
            return output_score(out, qy, regression) if regression else out

        def adapted(ep: Episode) -> torch.Tensor:
            with torch.no_grad():  # torch.func.grad still differentiates inside; no outer graph is kept
                return map_tasks(one_task, ep, batching, detached(meta()))

        if regression:
            est = evaluate_episodes(adapted, evals[part], n, run.eval.batch, device)
            return {f"{part}/mse": est.mean, f"{part}/mse_ci95": est.ci95}
        pooled = PooledQueries()  # classification: accuracy, NLL and the pooled ECE of the adapted logits
        columns = evaluate_episode_columns(
            lambda ep: pooled.columns(adapted(ep), ep.query_y), evals[part], n, run.eval.batch, device
        )
        return pooled.metrics(part, *columns)

    def figures(run_dir: Path) -> list[Path]:
        if not regression:
            return []
        path = run_dir / "sinusoid_fits.png"
        steps = sorted({1, cfg.eval_inner_steps})
        name = f"{run.algo} (first order)" if getattr(cfg, "first_order", False) else run.algo
        figure = sinusoid_figure(
            predict, tested, detached(meta()), evals["test"], path, steps=steps, name=name, device=device
        )
        return [figure]

    return Learner(model, loss, evaluate, parameters=parameters, figures=figures)


def sinusoid_figure(
    predict: Predict,
    inner: Inner,
    meta: Meta,
    tasks: Any,
    path: Path,
    *,
    steps: list[int],
    name: str,
    device: torch.device,
) -> Path:
    """Predictions on 4 test tasks before adaptation and after each of ``steps`` inner steps on K points
    (``inner`` with its number of steps replaced)."""
    n = 4
    ep = tasks.sample(0, n).to(device)
    amplitude, phase = tasks.functions(0, n)
    x = torch.linspace(-5, 5, 200, device=device).reshape(1, -1, 1).expand(n, -1, -1)  # (n, 200, 1)
    curves = {"true": sinusoid(x.cpu(), amplitude[:, None, None], phase[:, None, None])}
    with torch.no_grad():
        for s in [0, *steps]:
            at_s = replace(inner, steps=s)

            def fit(sx: torch.Tensor, sy: torch.Tensor, xs: torch.Tensor, at_s: Inner = at_s) -> torch.Tensor:
                return predict(at_s, meta, sx, sy, with_task_code(xs, sx))  # NME tasks: x and the task's code

            label = "before adaptation" if s == 0 else f"after {s} step{'s' * (s > 1)}"
            curves[label] = vmap(fit)(ep.support_x, ep.support_y, x).cpu()
    points = [(ep.support_x[i, :, 0].cpu(), ep.support_y[i, :, 0].cpu()) for i in range(n)]
    return plot_curves(
        path, x[0, :, 0].cpu(), {k: v[..., 0] for k, v in curves.items()}, points, f"{name}, K={ep.k_shot}"
    )
