"""Task batching of the MAML family (``batching: vmap | chunk | loop | grad_loop``): every strategy gives the
plain loop's loss and meta-gradient, through the loss the trainer sees; bad settings are refused by key."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from gbml_helpers import graph_size, variant_run
from torch import nn

from metalab.data.episodes import Episode, EpisodeSampler
from metalab.data.sinusoid import SinusoidTasks
from metalab.errors import ConfigError
from metalab.experiment import run_config_from_dict
from metalab.meta import anil, cavia, gbml, imaml, maml, mamlpp, metasgd, pretrain, reptile
from metalab.models import MLP, Conv4

STRATEGIES = ["vmap", "chunk", "loop", "grad_loop"]


def maml_train_loss(
    model: nn.Module, regression: bool, ep: Episode, cfg: maml.Config
) -> tuple[torch.Tensor, dict[str, float], tuple[torch.Tensor, ...], torch.Tensor]:
    """MAML's training loss as the trainer gets it (``gbml.mean_query_loss``), its metrics, its gradient in the
    network's parameters, and the loss tensor itself (with its graph)."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    inner = gbml.Inner(model, regression, cfg.inner_lr, cfg.inner_steps, cfg.first_order)
    per_task = functools.partial(maml.query_loss, inner)
    batching = gbml.task_batching("maml", cfg, model, not cfg.first_order, grad_loop=True)
    assert batching.mode == cfg.batching
    loss, metrics = gbml.mean_query_loss(per_task, batching, lambda: params, regression)(0, ep)
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
    return loss.detach(), metrics, grads, loss


def assert_same_as_loop(model: nn.Module, regression: bool, ep: Episode, **cfg) -> dict[str, torch.Tensor]:
    """Each strategy against the plain loop: loss, metrics and meta-gradient. Returns the loss tensors."""
    plain = maml.Config(batching="loop", **cfg)
    loop_loss, loop_metrics, loop_grads, _ = maml_train_loss(model, regression, ep, plain)
    assert all(float(g.abs().sum()) > 0 for g in loop_grads[-2:])  # the head really gets a gradient
    tensors = {}
    for mode in STRATEGIES:
        loss, metrics, grads, tensors[mode] = maml_train_loss(
            model, regression, ep, maml.Config(batching=mode, chunk_size=4, **cfg)
        )
        torch.testing.assert_close(loss, loop_loss, rtol=1e-6, atol=1e-7, msg=mode)
        assert metrics.keys() == loop_metrics.keys()
        assert metrics == pytest.approx(loop_metrics, rel=1e-6, abs=1e-7), mode
        for a, b in zip(grads, loop_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=mode)
    return tensors


@pytest.mark.parametrize("first_order", [False, True])
def test_every_strategy_equals_loop_mlp(first_order: bool) -> None:
    """Sinusoid MLP, 6 tasks: chunks of 4 leave a short last chunk."""
    torch.manual_seed(0)
    model = MLP(1, (16, 16), 1).double()
    ep = SinusoidTasks(5, 7, seed=0).sample(0, 6)
    ep = ep._replace(**{k: getattr(ep, k).double() for k in ("support_x", "support_y", "query_x", "query_y")})
    tensors = assert_same_as_loop(model, True, ep, inner_lr=0.05, inner_steps=2, first_order=first_order)
    # grad_loop hands the trainer a surrogate whose graph is only its linear term, a few nodes per parameter
    # tensor whatever the number of tasks: the tasks' graphs are gone.
    assert graph_size(tensors["grad_loop"]) <= 5 * len(dict(model.named_parameters()))
    assert graph_size(tensors["loop"]) > 4 * graph_size(tensors["grad_loop"])


def tiny_conv4_episode(norm: str) -> tuple[nn.Module, Episode]:
    torch.manual_seed(0)
    model = Conv4(1, 4, n_classes=3, strided=True, image_size=16, norm=norm).double()  # type: ignore[arg-type]
    pool = (torch.rand(6, 20, 1, 16, 16) * 255).to(torch.uint8)
    ep = EpisodeSampler(pool, 3, 2, 2, seed=0).sample(0, 5)
    return model, ep._replace(support_x=ep.support_x.double(), query_x=ep.query_x.double())


def test_every_strategy_equals_loop_conv4_second_order() -> None:
    """Second order through a Conv-4 whose per-image normalisation (GroupNorm) vmaps exactly."""
    model, ep = tiny_conv4_episode("layer")
    assert_same_as_loop(model, False, ep, inner_lr=0.4, inner_steps=2)


def test_every_strategy_equals_loop_conv4_batchnorm() -> None:
    """MAML's BatchNorm Conv-4 at second order: every strategy, vmap and chunk included, gives the loop's
    meta-gradient (metalab's BatchNorm2d runs elementary ops under vmap, where torch's fused kernel is wrong)."""
    model, ep = tiny_conv4_episode("batch")
    tensors = assert_same_as_loop(model, False, ep, inner_lr=0.4, inner_steps=2)
    assert graph_size(tensors["grad_loop"]) < graph_size(tensors["loop"])


def test_torch_batchnorm_under_vmap_is_refused_at_second_order() -> None:
    """A model with torch's own BatchNorm (whose vmapped second derivatives are wrong, pytorch/functorch#534)
    may loop, or vmap at first order, but not vmap at second order."""
    model, ep = tiny_conv4_episode("batch")
    for block in model.features:
        block[1] = nn.BatchNorm2d(block[1].num_features, track_running_stats=False).double()
    assert_same_as_loop(model, False, ep, inner_lr=0.4, inner_steps=1, first_order=True)
    for mode in ("vmap", "chunk"):
        with pytest.raises(ConfigError, match="BatchNorm") as info:
            maml_train_loss(model, False, ep, maml.Config(batching=mode))
        assert info.value.key == "maml.batching"


def test_auto_batching_by_network_and_device() -> None:
    """``auto``: vmap for MLPs everywhere and for convolutional networks on a GPU; a loop for them on a CPU, the
    graph-freeing one where the variant supports it."""
    assert gbml.auto_mode(False, torch.device("cpu")) == "vmap"
    assert gbml.auto_mode(False, torch.device("cpu"), grad_loop=True) == "vmap"
    assert gbml.auto_mode(True, torch.device("cpu")) == "loop"
    assert gbml.auto_mode(True, torch.device("cpu"), grad_loop=True) == "grad_loop"
    assert gbml.auto_mode(True, torch.device("cuda"), grad_loop=True) == "vmap"
    model, _ = tiny_conv4_episode("batch")
    assert gbml.task_batching("maml", maml.Config(), model, second_order=True).mode == "loop"
    assert gbml.task_batching("maml", maml.Config(), model, True, grad_loop=True).mode == "grad_loop"
    assert gbml.task_batching("maml", maml.Config(), MLP(1, (4,), 1), second_order=True).mode == "vmap"


@pytest.mark.parametrize("algo", ["maml", "anil", "cavia", "metasgd"])
def test_grad_loop_is_the_loop_for_every_mean_query_loss_variant(
    algo: str, sinusoid_config, tmp_path: Path
) -> None:
    """Through ``build`` and ``Learner.loss`` (Meta-SGD's meta-parameters are a nested dict with the rates)."""
    results = []
    for mode in ("loop", "grad_loop"):
        torch.manual_seed(0)
        module = {"maml": maml, "anil": anil, "cavia": cavia, "metasgd": metasgd}[algo]
        run = variant_run(sinusoid_config, algo, batching=mode, inner_steps=2)
        learner = module.build(run, tmp_path, torch.device("cpu"))
        loss, metrics = learner.loss(3)
        loss.backward()
        grads = [p.grad.clone() for p in learner.model.parameters()]
        results.append((loss.detach(), metrics, grads))
    (loss, metrics, grads), (freed_loss, freed_metrics, freed_grads) = results
    torch.testing.assert_close(freed_loss, loss)
    assert freed_metrics == pytest.approx(metrics)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    for a, b in zip(freed_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grad_loop_without_grad_is_the_mean_loss() -> None:
    """Under ``no_grad`` (nothing to free) the loop still returns the mean query loss and the scores."""
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    ep = SinusoidTasks(5, 5, seed=0).sample(0, 3)
    cfg = maml.Config(batching="grad_loop")
    per_task = functools.partial(maml.query_loss, gbml.Inner(model, True, cfg.inner_lr, 1))
    with torch.no_grad():
        loss, scores = gbml.freed_mean_loss(per_task, ep, dict(model.named_parameters()))
        losses, _ = gbml.map_tasks(per_task, ep, gbml.TaskBatching("loop"), dict(model.named_parameters()))
    torch.testing.assert_close(loss, losses.mean())
    assert scores.shape == (3,)


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("size", [0, -2])
def test_bad_chunk_size_is_refused_by_key(size: int) -> None:
    with pytest.raises(ConfigError) as info:
        maml.Config(batching="chunk", chunk_size=size)
    assert info.value.key == "chunk_size"
    run = {
        "algo": "maml",
        "task": {"dataset": "sinusoid", "ways": 1},
        "maml": {"batching": "chunk", "chunk_size": size},
    }
    with pytest.raises(ConfigError, match="chunk_size") as info:
        run_config_from_dict(run)
    assert info.value.key == "maml.chunk_size"
    run["maml"]["chunk_size"] = 2.5
    with pytest.raises(ConfigError) as info:
        run_config_from_dict(run)
    assert info.value.key == "maml.chunk_size"


def test_unknown_batching_lists_the_choices() -> None:
    run = {"algo": "anil", "task": {"dataset": "sinusoid", "ways": 1}, "anil": {"batching": "chunked"}}
    with pytest.raises(ConfigError, match=r"'chunk'.*'grad_loop'") as info:
        run_config_from_dict(run)
    assert info.value.key == "anil.batching"


@pytest.mark.parametrize("algo", ["imaml", "reptile", "mamlpp", "pretrain"])
def test_grad_loop_is_refused_where_it_cannot_apply(algo: str, sinusoid_config, tmp_path: Path) -> None:
    """Variants whose loss is not the mean query loss: iMAML and Reptile keep no graph through the tasks anyway,
    MAML++ weights every step's loss, the pretrained baseline has no tasks in training."""
    module = {"imaml": imaml, "reptile": reptile, "mamlpp": mamlpp, "pretrain": pretrain}[algo]
    run = variant_run(sinusoid_config, algo, batching="grad_loop")
    with pytest.raises(ConfigError, match="grad_loop") as info:
        module.build(run, tmp_path, torch.device("cpu"))
    assert info.value.key == f"{algo}.batching"


def test_auto_and_chunk_resolution() -> None:
    mlp, conv = MLP(1, (4,), 1), Conv4(1, 4, n_classes=2, strided=True, image_size=16)
    assert gbml.task_batching("maml", maml.Config(), mlp, True) == gbml.TaskBatching("vmap")
    assert gbml.task_batching("maml", maml.Config(), conv, True) == gbml.TaskBatching("loop")
    chunk = maml.Config(batching="chunk", chunk_size=3)
    assert gbml.task_batching("maml", chunk, mlp, True) == gbml.TaskBatching("chunk", 3)
    assert gbml.task_batching("maml", chunk, mlp, True).vmapped
    assert (
        gbml.task_batching("maml", maml.Config(batching="loop", chunk_size=3), mlp, True).chunk_size is None
    )
