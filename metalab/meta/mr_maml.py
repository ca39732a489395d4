"""MR-MAML (W): MAML with meta-regularization on weights (Yin, Tucker, Zhou, Levine & Finn, ICLR 2020).

The network's parameters are split in two by name (``stochastic``):

- the *stochastic* ones are not adapted in the inner loop; their meta-parameters are a Gaussian posterior
  ``q(theta) = N(mean, diag(softplus(rho)^2))`` (:class:`metalab.meta.metareg.Gaussian`), sampled once per
  meta-batch by reparameterisation, with ``beta * KL(q || N(0, prior_std^2 I))`` added to the outer loss;
- the others are MAML's: a deterministic initialisation adapted on each task's support set.

The query loss after adaptation, averaged over the meta-batch, plus ``beta * KL`` is minimised over the means,
the scales and the adapted initialisation together. The noise on the stochastic weights makes it costly to
store task-specific information in them (memorisation), so the adapted layers have to take it from the
support set. Which weights: in the authors' released code the distribution sits on the input side, an
encoder that is not adapted (its kernels only: the Bayesian dense layers keep point-estimate biases), below
the adapted MAML network; for sinusoid a 2-layer encoder (100 units, then 5) below the 40-40 MLP, with
``beta = 5e-5``, a ``N(0, I)`` prior and scales starting at ``softplus(-50)``, i.e. at zero.

Here the stochastic weights are sampled once per meta-batch (shared by its tasks) from a stream fixed by the
run's seed and the step, so a resumed run draws the same noise. Evaluation uses the posterior means. With no
stochastic parameters (``stochastic: []``) the model is MAML exactly (the same loss, on the same batch),
which makes a like-for-like baseline; it also runs MAML on the NME sinusoid family, whose inputs carry a
task code (``task.label_assignment: fixed``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from metalab.config import require, require_between
from metalab.data.episodes import Episode, generator_for
from metalab.errors import ConfigError
from metalab.experiment import RunConfig
from metalab.meta import gbml
from metalab.meta.adapt import Params, adapt
from metalab.meta.gbml import Inner, ParamTable, loss_and_score
from metalab.meta.metareg import Gaussian
from metalab.models import MLP
from metalab.train.loop import Learner

NOISE_STREAM = 0x6D72
"""Key that separates the weight-noise stream from the run's episode streams (see :func:`noise_seed`)."""
MAX_STD = 1e3
"""Largest ``prior_std`` / ``init_std``: weights are O(1); anything larger is a typo."""


@dataclass(frozen=True)
class Config(gbml.InnerLoopConfig):
    """MR-MAML hyperparameters (the ``mr_maml`` section); the shared fields are documented in
    :class:`~metalab.meta.gbml.InnerLoopConfig`."""

    first_order: bool = False
    """Treat inner gradients as constants."""
    stochastic: tuple[str, ...] = ("body.0.weight", "body.2.weight")
    """Parameters with a Gaussian posterior, not adapted in the inner loop: each entry is a parameter name or a
    module prefix (``body.0`` covers ``body.0.weight`` and ``body.0.bias``). The default is the kernels of the
    MLP's first two layers (the authors' sinusoid encoder with ``mlp_hidden: [100, 5, 40, 40]``); for the
    Conv-4, e.g. ``features.0.0.weight`` (the first convolution). Empty: no posterior, MAML itself."""
    beta: float = 5e-5
    """Weight of ``KL(q || prior)`` (summed over the stochastic weights) in the outer loss; 0 turns the
    regularizer off (the weights stay stochastic)."""
    prior_std: float = 1.0
    """Standard deviation of the prior ``N(0, prior_std^2 I)`` (the authors': 1)."""
    init_std: float = 1e-4
    """Initial posterior standard deviation of every stochastic weight (means start at the network's
    initialisation). The authors start at ``softplus(-50)``, essentially 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        require(self.prior_std > 0, "prior_std", f"must be > 0, got {self.prior_std}")
        require_between(self.prior_std, "prior_std", 0, MAX_STD)
        require(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        require_between(self.init_std, "init_std", 0, MAX_STD)
        for i, name in enumerate(self.stochastic):
            require(bool(name.strip()), f"stochastic[{i}]", "must name a parameter or module, got ''")
        require(
            len(set(self.stochastic)) == len(self.stochastic), "stochastic", "lists a name more than once"
        )


def stochastic_names(params: Params, selectors: tuple[str, ...], key: str) -> list[str]:
    """The names in ``params`` that ``selectors`` (names or module prefixes) pick, in the network's order.

    Refuses (``ConfigError`` on ``key``) a selector that picks nothing, and a choice that leaves nothing to
    adapt."""
    for s in selectors:
        if not any(n == s or n.startswith(f"{s}.") for n in params):
            listed = ", ".join(list(params)[:8])
            raise ConfigError(key, f"{s!r} names no parameter of this network (parameters: {listed}, ...)")
    chosen = [n for n in params if any(n == s or n.startswith(f"{s}.") for s in selectors)]
    if len(chosen) == len(params):
        raise ConfigError(key, "covers every parameter: the inner loop would have nothing to adapt")
    return chosen


class MRMAMLModel(nn.Module):
    """The network and the posterior scales of its stochastic parameters, in one module so that both are
    checkpointed and optimised together. The network's own parameters are the adapted initialisation and the
    posterior means."""

    def __init__(self, net: nn.Module, stochastic: list[str], init_std: float):
        super().__init__()
        self.net = net
        params = dict(net.named_parameters())
        self.rho = ParamTable(Gaussian.around({k: params[k].detach() for k in stochastic}, init_std).rho)

    def posterior(self) -> Gaussian:
        params = dict(self.net.named_parameters())
        rho = self.rho.as_dict()
        return Gaussian({k: params[k] for k in rho}, rho)

    def meta(self, fixed: Params | None = None) -> dict[str, Params]:
        """``{"fixed": stochastic weights (the posterior means unless given), "theta": adapted init}``."""
        params = dict(self.net.named_parameters())
        rho = self.rho.as_dict()
        means = {k: params[k] for k in rho}
        theta = {k: v for k, v in params.items() if k not in rho}
        return {"fixed": means if fixed is None else fixed, "theta": theta}


def predict(
    inner: Inner, meta: dict[str, Params], support_x: torch.Tensor, support_y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """One task: ``inner.steps`` inner steps on the adapted parameters (the stochastic ones held at
    ``meta["fixed"]``), then the outputs at ``x``."""
    fixed = meta["fixed"]

    def loss_fn(theta: Params, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return inner.loss({**fixed, **theta}, xs, ys)

    adapted = adapt(meta["theta"], loss_fn, (support_x, support_y), inner.steps, inner.lr, inner.first_order)
    return functional_call(inner.model, {**fixed, **adapted}, (x,))


def query_loss(
    inner: Inner,
    meta: dict[str, Params],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's (query loss after adaptation, query score), differentiable in both parts of ``meta``."""
    out = predict(inner, meta, support_x, support_y, query_x)
    return loss_and_score(out, query_y, inner.regression)


def noise_seed(seed: int) -> int:
    """Seed of the weight-noise stream: step ``s`` draws from ``generator_for(noise_seed(seed), s)``."""
    return int(np.random.SeedSequence([seed, NOISE_STREAM]).generate_state(1)[0])


def network(run: RunConfig, cfg: Config) -> nn.Module:
    """MAML's networks, with an MLP as wide as the task's inputs (the NME sinusoid family carries a code)."""
    if run.task.dataset == "sinusoid":
        return MLP(run.task.input_features, cfg.mlp_hidden, 1)
    return gbml.network(run, cfg)


def build(run: RunConfig, root: Path, device: torch.device) -> Learner:
    """Network, posterior, training loss and evaluation for an MR-MAML run."""
    cfg: Config = run.params
    regression = run.task.dataset == "sinusoid"
    net = network(run, cfg)
    names = stochastic_names(dict(net.named_parameters()), cfg.stochastic, f"{run.algo}.stochastic")
    model = MRMAMLModel(net, names, cfg.init_std).to(device)
    batching = gbml.task_batching(run.algo, cfg, model.net, not cfg.first_order, grad_loop=True)
    inner = Inner(model.net, regression, cfg.inner_lr, cfg.inner_steps, cfg.first_order)
    per_task = functools.partial(query_loss, inner)
    seed = noise_seed(run.seed)

    def train_loss(step: int, ep: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        posterior = model.posterior()
        meta = model.meta(posterior.sample(generator_for(seed, step)))
        loss, metrics = gbml.mean_query_loss(per_task, batching, lambda: meta, regression)(step, ep)
        kl = posterior.kl(cfg.prior_std)
        stds = [s.detach().flatten() for s in posterior.std().values()]
        extra = {"train/kl": kl.item()}
        if stds:
            extra["train/std_mean"] = torch.cat(stds).mean().item()
        # beta = 0 adds nothing, not 0 * KL (a float32 std that underflows to 0 makes the KL infinite).
        return (loss + cfg.beta * kl if cfg.beta else loss), {**metrics, **extra}

    # The optimizer must see the scales as well as the network: both are parameters of the model.
    return gbml.build_learner(
        run,
        root,
        device,
        model=model,
        meta=model.meta,
        train_loss=train_loss,
        predict=predict,
        inner=inner,
        batching=batching,
        parameters=list(model.parameters()),
    )
