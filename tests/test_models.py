"""Architectures: output shapes, parameter names, and use through torch.func (functional_call, vmap)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, vmap

from metalab.models import MLP, BatchNorm2d, Conv4, conv4
from metalab.models.mlp import mlp_forward


@pytest.mark.parametrize(
    ("strided", "image_size", "dim"),
    [(False, 28, 64), (True, 28, 256), (False, 84, 64 * 5 * 5), (True, 16, 64)],
)
def test_conv4_embedding_dim(strided: bool, image_size: int, dim: int) -> None:
    torch.manual_seed(0)
    model = Conv4(1, 64, strided=strided, image_size=image_size)
    assert model.embedding_dim == dim
    assert model.head is None
    z = model(torch.rand(6, 1, image_size, image_size))
    assert z.shape == (6, dim)


def test_conv4_head_logits() -> None:
    torch.manual_seed(0)
    model = Conv4(1, 32, n_classes=5, strided=True)
    assert model(torch.rand(10, 1, 28, 28)).shape == (10, 5)
    assert model.head.weight.shape == (5, 32 * 2 * 2)
    names = dict(model.named_parameters())
    assert "head.weight" in names and "head.bias" in names
    assert list(model.named_buffers()) == []  # nothing hidden from functional_call / vmap


def test_conv4_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="too small"):
        Conv4(image_size=8)


def test_conv4_functional_call_matches_module_and_uses_given_params() -> None:
    torch.manual_seed(0)
    model = Conv4(1, 8, n_classes=3)
    x = torch.rand(4, 1, 28, 28)
    params = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(model, params, (x,)), model(x))
    zeroed = {k: torch.zeros_like(v) if k.startswith("head") else v for k, v in params.items()}
    assert torch.equal(functional_call(model, zeroed, (x,)), torch.zeros(4, 3))


def test_conv4_vmap_over_tasks_equals_loop() -> None:
    torch.manual_seed(0)
    model = Conv4(1, 8, n_classes=5, strided=True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.rand(3, 10, 1, 28, 28)  # (T, B, C, H, W)
    batched = vmap(lambda xb: functional_call(model, params, (xb,)))(x)
    looped = torch.stack([functional_call(model, params, (x[t],)) for t in range(3)])
    assert batched.shape == (3, 10, 5)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    # Each task is normalised with its own batch statistics: it differs from one batch of all 30 images.
    joint = functional_call(model, params, (x.flatten(0, 1),)).reshape(3, 10, 5)
    assert not torch.allclose(joint, looped, atol=1e-4)


def test_conv4_vmap_over_params() -> None:
    torch.manual_seed(0)
    model = Conv4(1, 4, n_classes=2, strided=True)
    x = torch.rand(5, 1, 28, 28)
    stacked = {k: torch.stack([v.detach(), 2 * v.detach()]) for k, v in model.named_parameters()}
    out = vmap(lambda p: functional_call(model, p, (x,)))(stacked)
    single = functional_call(model, {k: v[1] for k, v in stacked.items()}, (x,))
    torch.testing.assert_close(out[1], single, rtol=1e-5, atol=1e-5)


def test_mlp_shapes_and_head() -> None:
    torch.manual_seed(0)
    model = MLP(3, (7, 5), 2)
    assert model(torch.rand(11, 3)).shape == (11, 2)
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == 5
    names = [n for n, _ in model.named_parameters()]
    assert names[-2:] == ["head.weight", "head.bias"]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [7, 5, 2]
    assert linears[-1] is model.head


def test_mlp_default_is_maml_sinusoid_net() -> None:
    model = MLP()
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(1, 40), (40, 40), (40, 1)]


def test_mlp_vmap_functional_call() -> None:
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.rand(4, 6, 1)
    out = vmap(lambda xb: functional_call(model, params, (xb,)))(x)
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("hidden", [(), (5,), (7, 3)])
def test_mlp_forward_equals_module_with_given_params(hidden: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = MLP(4, hidden, 2)
    other = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    x = torch.randn(6, 4)
    torch.testing.assert_close(mlp_forward(other, x), functional_call(model, other, (x,)))
    torch.testing.assert_close(mlp_forward(dict(model.named_parameters()), x), model(x))


@pytest.mark.parametrize("under_vmap", [False, True])
def test_batchnorm_equals_torch_batchnorm(under_vmap: bool) -> None:
    """metalab's BatchNorm2d computes torch's ``BatchNorm2d(track_running_stats=False)``, value and input and
    weight gradients, both as the fused kernel (outside vmap) and in elementary ops (under vmap)."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, 5, 5, dtype=torch.float64, requires_grad=True)  # 3 tasks of (6, 4, 5, 5)
    ours = BatchNorm2d(4).double()
    ref = torch.nn.BatchNorm2d(4, track_running_stats=False).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, 4))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    seen: list[bool] = []  # which form ran: the elementary one exactly under vmap

    def forward(m: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
        seen.append(conv4._under_vmap())
        return m(t)

    run = (
        (lambda m: torch.func.vmap(lambda t: forward(m, t))(x))
        if under_vmap
        else (lambda m: torch.stack([forward(m, t) for t in x]))
    )
    outs = [run(m) for m in (ours, ref)]
    torch.testing.assert_close(outs[0], outs[1])
    cotangent = torch.randn_like(outs[0])
    grads = [
        torch.autograd.grad(o, (x, m.weight, m.bias), cotangent)
        for o, m in zip(outs, (ours, ref), strict=True)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert seen and set(seen) == {under_vmap}
