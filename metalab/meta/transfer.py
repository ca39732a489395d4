"""Transfer baselines of few-shot classification: pretrain one classifier on every training class, then classify
each episode with a head built from its support set alone (Chen, Liu, Kira, Wang & Huang, "A Closer Look at
Few-shot Classification", ICLR 2019).

Pretraining is plain multi-task classification, no episodes: a Conv-4 (the embedding ProtoNet uses) and a head
over all the classes of the training part, trained by cross-entropy on batches of images drawn uniformly from
that part (:class:`~metalab.data.episodes.ClassBatchSampler`). In the Vinyals split every character in each of
its 4 rotations is a class of its own, as the split lists make it: 4112 classes in ``train``. The pretraining
head (``transfer.train_head``):

- ``linear``: a linear layer (Chen et al.'s "Baseline");
- ``cosine``: ``s * cos(f(x), w_c)``, a scaled cosine similarity to one weight vector per class (their
  "Baseline++"). The scale ``s`` starts at ``transfer.scale`` and is learned (``learn_scale``); the official
  code keeps it fixed (at 10 for over 200 classes, Omniglot's case): ``learn_scale: false`` with the default
  ``scale`` does that.

At test time the pretraining head is dropped and each episode gets a head of its own on the embedding
(``transfer.test_head``), built from the support images and labels only; query labels are read only to score:

- ``prototype``: nearest class mean of the support embeddings (as ProtoNet classifies, without meta-training),
  by negative squared Euclidean distance (``metric: euclidean``) or ``scale * cos`` (``metric: cosine``);
- ``linear``: a new N-way linear layer, from zero, fitted by ``finetune_steps`` full-batch SGD steps (momentum,
  weight decay) on the support cross-entropy (Chen et al.'s fine-tuning of Baseline);
- ``cosine``: a new N-way cosine head with the scale of the pretrained one (``transfer.scale`` after a linear
  pretraining head), its weights started at the support class means and fitted as the linear one is
  (Baseline++'s test). With 0 steps it is the cosine nearest-prototype classifier. Chen et al. start the new
  head at random; the class means make the fit deterministic and give it a sensible start.

The embedding stays frozen unless ``finetune_backbone`` (then the same SGD steps fit the encoder's weights
together with the head, one task at a time, from the pretrained weights each time; the learner's own weights
never change at evaluation).

Why squared Euclidean by default for ``prototype``: it is ProtoNet's metric, so the ``transfer_proto`` configs
differ from ProtoNet by the training alone. Cosine drops the embedding's norm, which a cross-entropy head uses
for confidence rather than class identity; it is the natural metric after a cosine pretraining head.

Evaluation is the shared episodic one (:func:`~metalab.meta.episodic.build_episodic`), so the records read as
the other metric learners' do; BatchNorm is inductive by default (running statistics, ``transfer.batchnorm``).
``train.meta_batch`` is unused (a step's batch is ``transfer.batch_size`` images); with ``--nproc`` each rank
takes its contiguous share of the batch, so ``batch_size`` must be a multiple of the number of processes (and
``train.meta_batch`` too, which the trainer checks for every learner).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metalab.config import MAX_BATCH, MAX_FILTERS, MAX_INNER_STEPS, require, require_between
from metalab.data.episodes import Episode, LabeledBatch
from metalab.data.tasks import EvalSamplers, make_batch_sampler
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta.episodic import Samplers, build_episodic, embed_tasks, squared_distances
from metalab.meta.protonet import class_means
from metalab.models import BatchNormMode, Conv4
from metalab.train import distributed
from metalab.train.loop import Learner
from metalab.train.precision import autocast

TrainHead = Literal["linear", "cosine"]
"""The pretraining head over every training class: ``linear`` (Baseline) or ``cosine`` (Baseline++)."""
TestHead = Literal["prototype", "linear", "cosine"]
"""The head each episode gets from its support set: class means, or a new linear or cosine layer fitted on it."""
Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Config:
    """Transfer-baseline hyperparameters (the ``transfer`` section of a config)."""

    hidden: int = 64
    """Conv-4 filters (the embedding is 64-d on 28x28 Omniglot)."""
    train_head: TrainHead = "linear"
    """Pretraining head: ``linear`` (Baseline) or ``cosine`` (Baseline++: ``scale * cos``)."""
    test_head: TestHead = "prototype"
    """Head of each test episode: ``prototype`` (nearest support class mean), ``linear`` or ``cosine`` (a new
    head fitted on the support set)."""
    metric: Literal["euclidean", "cosine"] = "euclidean"
    """The ``prototype`` head's similarity: negative squared Euclidean distance (ProtoNet's) or
    ``scale * cos``."""
    batch_size: int = 128
    """Images per pretraining step, drawn uniformly from the training part."""
    scale: float = 10.0
    """Cosine heads' scale: the start of the learned one with ``train_head: cosine``, else the fixed scale of
    the test-time cosine heads (10: the official Baseline++ value for over 200 classes)."""
    learn_scale: bool = True
    """Learn the pretraining cosine head's scale (``train_head: cosine`` only); false keeps ``scale``."""
    finetune_steps: int = 100
    """Full-batch SGD steps fitting a ``linear`` or ``cosine`` test head on the support set (0: the initial
    head, zeros or the class means)."""
    finetune_lr: float = 0.1
    """Step size of those SGD steps."""
    finetune_momentum: float = 0.9
    """Their (heavy-ball) momentum."""
    finetune_weight_decay: float = 0.001
    """Their L2 weight decay (added to the gradient, as ``torch.optim.SGD`` does)."""
    finetune_backbone: bool = False
    """Fit the encoder's weights too (from the pretrained ones, per task); false: frozen embedding."""
    batchnorm: BatchNormMode = "inductive"
    """BatchNorm at evaluation: ``inductive`` (running statistics, each query on its own) or ``transductive``
    (the episode's statistics); see :data:`metalab.models.BatchNormMode`."""

    def __post_init__(self) -> None:
        require_between(self.hidden, "hidden", 1, MAX_FILTERS)
        require_between(self.batch_size, "batch_size", 1, MAX_BATCH)
        require_between(self.scale, "scale", 1e-3, 1e3)
        require_between(self.finetune_steps, "finetune_steps", 0, MAX_INNER_STEPS)
        require_between(self.finetune_lr, "finetune_lr", 1e-8, 100.0)
        require(
            0.0 <= self.finetune_momentum < 1.0,
            "finetune_momentum",
            f"must be in [0, 1), got {self.finetune_momentum}",
        )
        require_between(self.finetune_weight_decay, "finetune_weight_decay", 0.0, 10.0)
        require(
            not (self.finetune_backbone and self.test_head == "prototype"),
            "finetune_backbone",
            "fine-tunes the encoder with a fitted head: needs test_head 'linear' or 'cosine', not 'prototype'",
        )


# ------------------------------------------------------------------------------------------------ heads


def cosine_logits(x: torch.Tensor, weight: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``scale * cos(x_i, w_c)``: ``(B, D)`` features, ``(C, D)`` class weights -> ``(B, C)`` logits."""
    return scale * F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).T


def head_logits(x: torch.Tensor, params: Params, kind: TestHead, scale: float) -> torch.Tensor:
    """Logits ``(B, N)`` of a fitted ``linear`` (``weight``, ``bias``) or ``cosine`` (``weight``) head."""
    if kind == "linear":
        return x @ params["weight"].T + params["bias"]
    return cosine_logits(x, params["weight"], scale)


def prototype_logits(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int, cfg: Config, scale: float
) -> torch.Tensor:
    """Nearest class mean: ``-||q - c_k||^2`` (``euclidean``) or ``scale * cos(q, c_k)`` (``cosine``) against each
    class mean ``c_k`` of the support. ``(S, D), (S,), (Q, D) -> (Q, n_way)``."""
    means = class_means(support, support_y, n_way)  # (N, D)
    if cfg.metric == "euclidean":
        return -squared_distances(query, means)
    return cosine_logits(query, means, scale)


def initial_head(support: torch.Tensor, support_y: torch.Tensor, n_way: int, kind: TestHead) -> Params:
    """A new head before fitting: a zero linear layer, or cosine weights at the support class means."""
    if kind == "linear":
        return {"weight": support.new_zeros(n_way, support.shape[-1]), "bias": support.new_zeros(n_way)}
    return {"weight": class_means(support, support_y, n_way)}


def sgd(loss: Callable[[Params], torch.Tensor], params: Params, cfg: Config) -> Params:
    """``cfg.finetune_steps`` full-batch SGD steps on ``loss`` with heavy-ball momentum and L2 weight decay, the
    update of ``torch.optim.SGD`` (no dampening), as a pure function: new tensors, ``params`` untouched.

    ``torch.func.grad`` computes gradients even under an outer ``torch.no_grad`` (the evaluation's)."""
    gradient = grad(loss)
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    for _ in range(cfg.finetune_steps):
        g = gradient(params)
        velocity = {
            k: cfg.finetune_momentum * velocity[k] + g[k] + cfg.finetune_weight_decay * params[k]
            for k in params
        }
        params = {k: params[k] - cfg.finetune_lr * velocity[k] for k in params}
    return params


def fit_head(support: torch.Tensor, support_y: torch.Tensor, n_way: int, cfg: Config, scale: float) -> Params:
    """A new ``cfg.test_head`` head fitted on the support set alone: ``(S, D)`` embeddings, ``(S,)`` labels.

    The fit sees nothing of the queries, their labels least of all."""

    def loss(params: Params) -> torch.Tensor:
        return F.cross_entropy(head_logits(support, params, cfg.test_head, scale), support_y)

    return sgd(loss, initial_head(support, support_y, n_way, cfg.test_head), cfg)


def support_head_logits(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int, cfg: Config, scale: float
) -> torch.Tensor:
    """Query logits ``(Q, n_way)`` of one task's frozen embeddings under the test head built from its support."""
    if cfg.test_head == "prototype":
        return prototype_logits(support, support_y, query, n_way, cfg, scale)
    return head_logits(query, fit_head(support, support_y, n_way, cfg, scale), cfg.test_head, scale)


# ------------------------------------------------------------------------------------------------ model


class CosineHead(nn.Module):
    """Baseline++'s classifier: ``scale * cos(z, w_c)`` with one weight vector per class and a scale learned
    (or fixed, ``learn_scale=False``) from ``scale``."""

    def __init__(self, features: int, classes: int, scale: float, learn_scale: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, features) / features**0.5)  # only directions count
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return cosine_logits(z, self.weight, self.scale)


class TransferNet(nn.Module):
    """A Conv-4 ``encoder`` and the pretraining ``head`` over ``classes`` training classes."""

    def __init__(self, classes: int, cfg: Config, image_size: int = 28):
        super().__init__()
        self.encoder = Conv4(1, cfg.hidden, image_size=image_size)
        d = self.encoder.embedding_dim
        self.head: nn.Module = (
            nn.Linear(d, classes)
            if cfg.train_head == "linear"
            else CosineHead(d, classes, cfg.scale, cfg.learn_scale)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images -> ``(B, classes)`` logits."""
        return self.head(self.encoder(x.contiguous(memory_format=torch.channels_last)))


def cosine_scale(model: TransferNet, cfg: Config) -> float:
    """The scale of test-time cosine heads: the pretrained one after a cosine head, else ``cfg.scale``."""
    return float(model.head.scale) if isinstance(model.head, CosineHead) else cfg.scale


def pretrain_loss(model: TransferNet, batch: LabeledBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over every training class of a batch of images; returns (loss, ``(B, classes)`` logits)."""
    logits = model(batch.x)
    return F.cross_entropy(logits, batch.y), logits


# ------------------------------------------------------------------------------------------ evaluation


def finetuned_task_logits(model: TransferNet, ep: Episode, cfg: Config, scale: float) -> torch.Tensor:
    """Query logits ``(Q, N)`` of one (unbatched) task with the encoder fitted together with the new head.

    The fit starts from the pretrained weights and returns new tensors (``model`` is left as it is); the
    loss sees the support images and labels only. The queries are then embedded by the fitted encoder, in
    one forward with the support as :func:`~metalab.meta.episodic.embed_tasks` does (so transductive BatchNorm
    normalises with the episode's statistics)."""
    encoder = model.encoder
    support_x = ep.support_x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        head = initial_head(encoder(support_x), ep.support_y, ep.n_way, cfg.test_head)
    start = {f"head.{k}": v for k, v in head.items()} | {
        f"encoder.{k}": v.detach() for k, v in encoder.named_parameters()
    }

    def split(params: Params) -> tuple[Params, Params]:
        enc = {k.removeprefix("encoder."): v for k, v in params.items() if k.startswith("encoder.")}
        return enc, {k.removeprefix("head."): v for k, v in params.items() if k.startswith("head.")}

    def loss(params: Params) -> torch.Tensor:
        enc, head_params = split(params)
        z = functional_call(encoder, enc, (support_x,))  # (S, D)
        return F.cross_entropy(head_logits(z, head_params, cfg.test_head, scale), ep.support_y)

    enc, head_params = split(sgd(loss, start, cfg))
    images = torch.cat([ep.support_x, ep.query_x]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        z = functional_call(encoder, enc, (images,))  # (S+Q, D)
    return head_logits(z[ep.support_x.shape[0] :], head_params, cfg.test_head, scale)


def episode_logits(model: TransferNet, cfg: Config, ep: Episode) -> torch.Tensor:
    """Query logits ``(T, N*Q, N)`` of a batched episode under the test head (``cfg.test_head``)."""
    scale = cosine_scale(model, cfg)
    if cfg.finetune_backbone:
        return torch.stack([finetuned_task_logits(model, ep.task(t), cfg, scale) for t in range(ep.tasks)])
    n_support = ep.support_x.shape[1]
    with torch.no_grad():  # frozen embedding
        z = embed_tasks(model.encoder, torch.cat([ep.support_x, ep.query_x], dim=1))  # (T, N*(K+Q), D)
    per_task = partial(support_head_logits, n_way=ep.n_way, cfg=cfg, scale=scale)
    return vmap(per_task)(z[:, :n_support], ep.support_y, z[:, n_support:])


# ----------------------------------------------------------------------------------------------- build


def shard_batch(batch: LabeledBatch) -> LabeledBatch:
    """This rank's contiguous share of a batch (all of it on a single rank), as
    :func:`~metalab.train.distributed.shard` shares a meta-batch's tasks."""
    w = distributed.world()
    if not w.distributed:
        return batch
    size = batch.y.shape[0]
    if size % w.size:
        raise ConfigError(
            "transfer.batch_size",
            f"{size} images do not split evenly over {w.size} processes; use a multiple of {w.size}",
        )
    part = slice(w.rank * size // w.size, (w.rank + 1) * size // w.size)
    return LabeledBatch(batch.x[part], batch.y[part])


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """A Conv-4 classifier pretrained on every class of the training part; evaluated episodically with the
    test head of ``run.params`` (see the module docstring)."""
    cfg: Config = run.params
    task = run.task
    require(task.dataset == "omniglot", "task.dataset", "transfer pretrains on Omniglot classes")
    require(
        task.construction == "labeled",
        "task.construction",
        "transfer pretrains on the class labels; augmented tasks have none",
    )
    require(
        task.label_assignment == "shuffled",
        "task.label_assignment",
        "transfer pretrains on every class with its own label, not on episodes: use 'shuffled'",
    )
    batches = make_batch_sampler(task, run.seed, root)
    model = TransferNet(batches.classes, cfg, task.image_size)
    # No episodic training sampler: the episodic loss of build_episodic is replaced below; its evaluation
    # (val/test episodes, accuracy, nll, ece) is kept as it is.
    samplers = Samplers(None, EvalSamplers(task, run.eval.seed, root))
    learner = build_episodic(run, root, device, model, partial(episode_logits, model, cfg), samplers=samplers)

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = shard_batch(batches.sample(step, cfg.batch_size)).to(device)
        with autocast(run.train.autocast, device):  # train.autocast, as the episodic evaluation applies it
            value, logits = pretrain_loss(model, batch)
        metrics = {"train/acc": (logits.argmax(-1) == batch.y).float().mean().item()}
        if isinstance(model.head, CosineHead):
            metrics["train/scale"] = model.head.scale.item()
        return value.float(), metrics

    return dataclasses.replace(learner, loss=loss)
