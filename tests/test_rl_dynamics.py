"""Dynamics ensembles: the batched forward against member-by-member layers, the log-variance bounds, the Gaussian
NLL against its density and finite differences, bootstrap fits, and trajectory sampling's member assignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metalab.rl import dynamics as dyn


def ensemble(members: int = 3, probabilistic: bool = True, hidden: tuple[int, ...] = (8, 8)) -> dyn.Ensemble:
    torch.manual_seed(0)
    return dyn.Ensemble(obs_dim=2, act_dim=1, hidden=hidden, members=members, probabilistic=probabilistic)


def test_batched_forward_is_each_member_on_its_own_rows() -> None:
    model = ensemble(members=3)
    params = model.params()
    x = torch.randn(3, 5, 3)  # (E, R, in)
    out = dyn.ensemble_forward(params, x)
    assert out.shape == (3, 5, 4)  # probabilistic: mean and log-variance of 2 state dimensions
    for e in range(3):
        h = x[e]
        for i in range(3):
            h = F.linear(h, params[f"weight{i}"][e].T, params[f"bias{i}"][e, 0])
            h = F.silu(h) if i < 2 else h
        assert torch.allclose(out[e], h, atol=1e-6)
    assert not torch.allclose(out[0], out[1])  # members are initialised independently


def test_logvar_bounds_hold_and_are_soft() -> None:
    low, high = torch.tensor([-10.0, -4.0]), torch.tensor([0.5, 1.0])
    raw = torch.linspace(-1e4, 1e4, 20001)[:, None].expand(-1, 2)
    logvar = dyn.bounded_logvar(raw, low, high)
    top = low + F.softplus(high - low)  # the upper limit: high plus log(1 + exp(low - high))
    assert torch.allclose(top - high, torch.log1p(torch.exp(low - high)), atol=1e-6)
    assert torch.all(logvar >= low) and torch.all(logvar <= top)
    assert torch.all(logvar[1:] >= logvar[:-1])  # monotonic in the raw output
    middle = dyn.bounded_logvar(torch.tensor([[-3.0, -1.5]]), low, high)
    assert torch.allclose(middle, torch.tensor([[-3.0, -1.5]]), atol=0.1)  # inside: close to the identity
    assert torch.allclose(dyn.bounded_logvar(torch.full((1, 2), 1e4), low, high), top, atol=1e-4)
    assert torch.allclose(dyn.bounded_logvar(torch.full((1, 2), -1e4), low, high), low, atol=1e-4)
    assert top[0] - high[0] < 1e-4  # PETS's initial bounds: the margin is negligible


def test_gaussian_nll_is_the_density_and_its_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    mean, logvar, target = torch.randn(3, 4, 2), torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    nll = dyn.gaussian_nll(mean, logvar, target)
    density = torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(target)
    assert nll.shape == (3,) and torch.allclose(nll, -density.flatten(1).mean(1), atol=1e-5)
    args = tuple(t.double().requires_grad_(True) for t in (mean, logvar, target))
    assert torch.autograd.gradcheck(lambda m, v, y: dyn.gaussian_nll(m, v, y), args)


def test_model_loss_gradient_matches_finite_differences() -> None:
    """The whole loss (normalisation, batched layers, soft bounds, bound penalty) in double precision."""
    model = ensemble(members=2, hidden=(4,)).double()
    torch.manual_seed(1)
    data = dyn.Data(torch.randn(10, 2).double(), torch.randn(10, 1).double(), torch.randn(10, 2).double())
    norm = dyn.fit_normalizer(data)
    batch = dyn.Batch(data.obs.view(2, 5, 2), data.action.view(2, 5, 1), data.next_obs.view(2, 5, 2))
    names = list(model.params())
    # Raise the lower bound so that the log-variance lives where both softplus bounds bend.
    start = {k: (v + 6.0 if k == "min_logvar" else v).detach() for k, v in model.params().items()}

    def loss(*values: torch.Tensor) -> torch.Tensor:
        return dyn.model_loss(dict(zip(names, values, strict=True)), norm, batch, bound_reg=0.3)[0]

    assert torch.autograd.gradcheck(loss, tuple(v.clone().requires_grad_(True) for v in start.values()))


def test_deterministic_loss_is_summed_member_mse() -> None:
    model = ensemble(members=2, probabilistic=False)
    torch.manual_seed(2)
    batch = dyn.Batch(torch.randn(2, 6, 2), torch.randn(2, 6, 1), torch.randn(2, 6, 2))
    norm = dyn.Normalizer(torch.zeros(3), torch.ones(3), torch.zeros(2), torch.ones(2))
    loss, metrics = dyn.model_loss(model.params(), norm, batch)
    x = torch.cat([batch.obs, batch.action], -1)
    per_member = ((dyn.ensemble_forward(model.params(), x) - (batch.next_obs - batch.obs)) ** 2).mean((1, 2))
    assert torch.allclose(loss, per_member.sum())
    assert metrics["train/model_mse"] == pytest.approx(per_member.mean().item(), rel=1e-5)
    assert "train/model_nll" not in metrics


def test_normalizer_standardises_inputs_and_changes() -> None:
    torch.manual_seed(3)
    obs = torch.randn(500, 2) * torch.tensor([3.0, 0.1]) + 5
    obs[:, 1] = 7.0  # a constant feature: centred, not scaled
    action = torch.rand(500, 1)
    data = dyn.Data(obs, action, obs + 0.5 + 0.2 * torch.randn(500, 2))
    norm = dyn.fit_normalizer(data)
    x = dyn.normalized_inputs(norm, obs, action)
    assert torch.allclose(x[:, [0, 2]].mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x[:, [0, 2]].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert norm.in_std[1] == 1.0 and torch.all(x[:, 1] == 0)
    assert torch.allclose(norm.out_mean, torch.tensor([0.5, 0.5]), atol=0.05)
    model = ensemble(members=1)
    model.set_normalizer(norm)
    assert all(torch.equal(a, b) for a, b in zip(model.normalizer(), norm, strict=True))
    assert "in_mean" in model.state_dict()  # checkpoints carry the normaliser


def test_each_member_fits_its_own_bootstrap_sample() -> None:
    """On targets that are pure noise, a member can only memorise: its error is lower on the rows of its own
    resample than on the rows it never saw. Fitted on the same data, the members would not differ so."""
    torch.manual_seed(4)
    n, members = 48, 4
    obs, action = torch.randn(n, 2), torch.randn(n, 1)
    data = dyn.Data(obs, action, obs + torch.randn(n, 2))
    model = ensemble(members=members, probabilistic=False, hidden=(64, 64))
    boot, losses = dyn.fit_ensemble(
        model, data, updates=400, batch_size=32, rng=np.random.default_rng(0), lr=3e-3
    )
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        x = dyn.normalized_inputs(model.normalizer(), obs, action).expand(members, -1, -1)
        mean, _ = dyn.mean_logvar(model.params(), x, 2)
        target = (data.next_obs - obs - model.normalizer().out_mean) / model.normalizer().out_std
        error = ((mean - target) ** 2).mean(-1)  # (E, N)
    for e in range(members):
        inside = np.zeros(n, bool)
        inside[boot[e]] = True
        assert 0 < (~inside).sum() < n
        assert error[e, inside].mean() < 0.5 * error[e, ~inside].mean(), e
    assert not np.array_equal(boot[0], boot[1])
    assert (mean[0] - mean[1]).abs().mean() > 0.1  # the members disagree


def test_ensemble_learns_linear_dynamics() -> None:
    torch.manual_seed(5)
    a_mat, b_mat = torch.tensor([[0.9, 0.2], [-0.1, 0.8]]), torch.tensor([[0.5], [-0.3]])

    def step(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return s @ a_mat.T + a @ b_mat.T

    obs, action = torch.randn(512, 2), torch.rand(512, 1) * 2 - 1
    model = ensemble(members=2, probabilistic=True, hidden=(32, 32))
    dyn.fit_ensemble(
        model, dyn.Data(obs, action, step(obs, action)), 600, 64, np.random.default_rng(0), lr=1e-2
    )
    test_obs, test_action = torch.randn(2, 100, 2), torch.rand(2, 100, 1) * 2 - 1
    with torch.no_grad():
        predicted = dyn.predict(model.params(), model.normalizer(), test_obs, test_action, sample=False)
    truth = step(test_obs, test_action)
    assert ((predicted - truth) ** 2).mean() < 0.01 * ((test_obs - truth) ** 2).mean()


@pytest.mark.parametrize("propagation", ["ts1", "tsinf"])
def test_member_assignment_is_balanced(propagation: dyn.Propagation) -> None:
    g = torch.Generator().manual_seed(0)
    members = dyn.member_assignment(4, 12, 6, propagation, g)
    assert members.shape == (6, 12)
    for t in range(6):
        assert torch.bincount(members[t], minlength=4).tolist() == [3, 3, 3, 3]
    constant = bool((members == members[0]).all())
    assert constant == (propagation == "tsinf")  # a fixed member per particle, or a fresh draw each step
    with pytest.raises(ValueError, match="evenly"):
        dyn.member_assignment(4, 10, 6, propagation, g)


@pytest.mark.parametrize("propagation", ["ts1", "tsinf"])
def test_trajectory_sampling_moves_each_particle_with_its_member(propagation: dyn.Propagation) -> None:
    model = ensemble(members=3, probabilistic=True)
    params, norm = model.params(), model.normalizer()
    state, actions = torch.randn(2, 2), torch.rand(2, 4, 5, 1)  # (S, D), (S, N, H, A)
    with torch.no_grad():
        out = dyn.trajectory_sampling(params, norm, state, actions, 6, propagation, generator=torch.Generator().manual_seed(1),
                                      sample=False)  # fmt: skip
    assert out.states.shape == (2, 4, 6, 6, 2) and out.members.shape == (5, 6)
    assert torch.equal(out.states[:, :, :, 0], state[:, None, None].expand(2, 4, 6, 2))
    with torch.no_grad():  # by hand: one particle at a time through the member assigned to it at each step
        for p in range(6):
            x = state[:, None].expand(2, 4, 2).reshape(1, 8, 2)
            for t in range(5):
                e = int(out.members[t, p])
                member = {
                    k: v[e : e + 1] if k.startswith(("weight", "bias")) else v for k, v in params.items()
                }
                x = dyn.predict(member, norm, x, actions[:, :, t].reshape(1, 8, 1), sample=False)
                assert torch.allclose(out.states[:, :, p, t + 1], x.view(2, 4, 2), atol=1e-5), (p, t)


def test_tsinf_particles_of_one_member_differ_only_by_sampling_noise() -> None:
    model = ensemble(members=2, probabilistic=True)
    params, norm = model.params(), model.normalizer()
    state, actions = torch.randn(1, 2), torch.rand(1, 3, 4, 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        mean = dyn.trajectory_sampling(params, norm, state, actions, 4, "tsinf", generator=g, sample=False)
        noisy = dyn.trajectory_sampling(params, norm, state, actions, 4, "tsinf", generator=g, sample=True)
    for out in (mean, noisy):
        pairs = [(p, q) for p in range(4) for q in range(p + 1, 4) if out.members[0, p] == out.members[0, q]]
        assert len(pairs) == 2
        for p, q in pairs:
            same = torch.allclose(out.states[:, :, p], out.states[:, :, q])
            assert same == (out is mean)
    # The initial log-variance bound (0.5, in normalised units) makes samples spread: not a numerical accident.
    assert (noisy.states[..., 1:, :] - mean.states[..., 1:, :]).abs().mean() > 0.1


def test_trajectory_sampling_is_differentiable_in_the_actions() -> None:
    model = ensemble(members=2)
    actions = torch.rand(1, 3, 4, 1, requires_grad=True)
    out = dyn.trajectory_sampling(model.params(), model.normalizer(), torch.randn(1, 2), actions, 2, "ts1",
                                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    (grad,) = torch.autograd.grad(out.states[..., -1, :].sum(), actions)
    assert grad.shape == actions.shape and torch.all(grad[:, :, :-1].abs().sum(-1) > 0)
    assert math.isfinite(float(grad.sum()))


def test_bootstrap_minibatches_come_from_each_members_resample() -> None:
    rng = np.random.default_rng(0)
    boot = dyn.bootstrap_indices(20, 3, rng)
    assert boot.shape == (3, 20) and boot.min() >= 0 and boot.max() < 20
    data = dyn.Data(torch.arange(20.0)[:, None], torch.zeros(20, 1), torch.zeros(20, 1))
    batch = dyn.minibatch(data, boot, 50, rng)
    assert batch.obs.shape == (3, 50, 1)
    for e in range(3):
        assert set(batch.obs[e, :, 0].long().tolist()) <= set(boot[e].tolist())
