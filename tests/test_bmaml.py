"""Ensembles of MAML and Bayesian MAML (metalab.meta.bmaml): the SVGD direction and its bandwidth against hand
computations, SVGD with one particle as a gradient step, the ensemble as M separate MAML inner loops, the
meta-gradient through SVGD steps against finite differences, the mixture scores and outer losses against
closed forms, reproducible and exactly resumable runs, a short run that learns, and named config errors."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from metalab.data.episodes import Episode
from metalab.errors import ConfigError
from metalab.experiment import algorithm, run_config_from_dict
from metalab.meta import bmaml
from metalab.meta.adapt import adapt
from metalab.models import MLP
from metalab.train.loop import fit


def config(steps: int = 6, **params: object) -> dict:
    return {
        "algo": "bmaml",
        "task": {"dataset": "sinusoid", "ways": 1, "shots": 5, "queries": 10},
        "train": {"steps": steps, "meta_batch": 8, "lr": 3e-3, "eval_every": steps, "eval_episodes": 32,
                  "log_every": 1, "checkpoint_every": steps, "device": "cpu"},
        "eval": {"episodes": 32, "batch": 16},
        "bmaml": {"particles": 3, "mlp_hidden": [16, 16], "interval_samples": 64, **params},
    }  # fmt: skip


def hand_svgd(theta: list[list[float]], score: list[list[float]]) -> list[list[float]]:
    """SVGD's direction written out with plain floats: median of the pairwise squared distances over log M."""
    m = len(theta)
    sq = [
        [sum((a - b) ** 2 for a, b in zip(theta[i], theta[j], strict=True)) for j in range(m)]
        for i in range(m)
    ]
    pairs = sorted(sq[i][j] for i in range(m) for j in range(i + 1, m))
    h = pairs[(len(pairs) - 1) // 2] / math.log(m)
    out = []
    for j in range(m):
        phi = [0.0] * len(theta[j])
        for i in range(m):
            k = math.exp(-sq[i][j] / h)
            for d in range(len(phi)):
                phi[d] += (k * score[i][d] + (2 / h) * k * (theta[j][d] - theta[i][d])) / m
        out.append(phi)
    return out


@pytest.mark.parametrize("m", [2, 3, 4])
def test_svgd_direction_matches_the_formula_for_a_gaussian_target(m: int) -> None:
    # Target N(mu, s^2) per coordinate: the score is -(theta - mu) / s^2; the particles are 3-d, split over two
    # tensors so the kernel must sum distances over both.
    g = torch.Generator().manual_seed(m)
    theta = torch.randn(m, 3, generator=g, dtype=torch.float64) * 2
    mu, s = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 1.5
    score = -(theta - mu) / s**2
    particles = {"a": theta[:, :1], "b": theta[:, 1:].reshape(m, 1, 2)}
    scores = {"a": score[:, :1], "b": score[:, 1:].reshape(m, 1, 2)}
    phi = bmaml.svgd_direction(particles, scores)
    got = torch.cat([phi["a"], phi["b"].reshape(m, 2)], 1)
    expected = torch.tensor(hand_svgd(theta.tolist(), score.tolist()), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Near the target the repulsion keeps the particles apart: they are not all pushed onto the mean.
    at_mean = {"a": mu[None, :1].expand(m, 1) + 1e-3 * torch.arange(m, dtype=torch.float64)[:, None]}
    push = bmaml.svgd_direction(at_mean, {"a": -(at_mean["a"] - mu[0]) / s**2})["a"][:, 0]
    assert push[0] < 0 < push[-1]  # the outer particles move outward


def test_median_bandwidth() -> None:
    def h(points: list[float]) -> float:
        x = torch.tensor(points)[:, None]
        return bmaml.median_bandwidth(bmaml.pairwise_sq_dists({"w": x})).item()

    assert h([0.0, 1.0, 3.0]) == pytest.approx(4 / math.log(3))  # squared distances 1, 9, 4
    assert h([0.0, 1.0, 2.0, 4.0]) == pytest.approx(4 / math.log(4))  # 1, 4, 16, 1, 9, 4: lower middle 4
    assert h([2.0, 5.0]) == pytest.approx(9 / math.log(2))
    assert h([7.0]) == 1.0
    assert h([1.0, 1.0, 1.0]) == pytest.approx(1e-12)  # coincident: floored, not 0/0
    # A pair at the median distance has kernel value 1/M.
    assert math.exp(-4 / h([0.0, 1.0, 3.0])) == pytest.approx(1 / 3)


def stacked_mlps(m: int, seed: int, dtype: torch.dtype = torch.float32) -> bmaml.Meta:
    torch.manual_seed(seed)
    model = bmaml.Particles(1, (4, 3), m, init_sigma=0.7).to(dtype)
    return bmaml.Meta(model.stacked.as_dict(), model.log_sigma)


def test_one_particle_svgd_is_a_gradient_step_on_the_log_posterior() -> None:
    meta = stacked_mlps(1, 0)
    x, y = torch.randn(6, 1), torch.randn(6, 1)
    for prior in (None, 2.0):
        rule = bmaml.Rule("svgd", lr=0.05, steps=1, prior_std=prior)
        got = bmaml.adapt_particles(rule, meta, x, y)
        net = MLP(1, (4, 3), 1)
        params = {k: v[0].detach().clone().requires_grad_() for k, v in meta.particles.items()}
        sigma = meta.log_sigma.exp().item()
        log_p = torch.distributions.Normal(functional_call(net, params, (x,)), sigma).log_prob(y).sum()
        if prior is not None:
            log_p = log_p + sum(
                torch.distributions.Normal(0.0, prior).log_prob(p).sum() for p in params.values()
            )
        grads = torch.autograd.grad(log_p, list(params.values()))
        for (name, p), g in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(got[name][0], p + 0.05 * g)


def test_one_noise_scaled_particle_takes_mamls_steps() -> None:
    """With ``step_scale: noise`` and no prior, SVGD with one particle is MAML's inner loop on the support MSE
    (same inner_lr, any learned sigma); the plain step is K / (2 sigma^2) times larger."""
    meta = stacked_mlps(1, 3)
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    net = MLP(1, (4, 3), 1)
    own = {k: v[0] for k, v in meta.particles.items()}
    mse = lambda p, x, y: ((functional_call(net, p, (x,)) - y) ** 2).mean()  # noqa: E731
    want = adapt(own, mse, (x, y), 3, 0.02)
    got = bmaml.adapt_particles(bmaml.Rule("svgd", lr=0.02, steps=3, noise_scaled=True), meta, x, y)
    for k in own:
        torch.testing.assert_close(got[k][0], want[k])
    plain = bmaml.adapt_particles(bmaml.Rule("svgd", lr=0.02, steps=1), meta, x, y)
    one = adapt(own, mse, (x, y), 1, 0.02 * 5 / (2 * meta.log_sigma.exp().item() ** 2))
    for k in own:
        torch.testing.assert_close(plain[k][0], one[k])


def test_ensemble_members_each_take_mamls_steps_alone() -> None:
    meta = stacked_mlps(3, 1)
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    got = bmaml.adapt_particles(bmaml.Rule("ensemble", lr=0.1, steps=2), meta, x, y)
    net = MLP(1, (4, 3), 1)
    for m in range(3):
        own = {k: v[m] for k, v in meta.particles.items()}
        loss = lambda p, x, y: ((functional_call(net, p, (x,)) - y) ** 2).mean()  # noqa: E731
        want = adapt(own, loss, (x, y), 2, 0.1)
        for k in own:
            torch.testing.assert_close(got[k][m], want[k])


def test_meta_gradient_through_svgd_steps_matches_finite_differences() -> None:
    meta = stacked_mlps(3, 2, torch.float64)
    g = torch.Generator().manual_seed(0)
    sx, sy, qx, qy = (torch.randn(5, 1, generator=g, dtype=torch.float64) for _ in range(4))
    rule = bmaml.Rule("svgd", lr=0.05, steps=2, prior_std=3.0)
    names = list(meta.particles)
    leaves = [meta.particles[n].detach().clone().requires_grad_() for n in names]
    log_sigma = meta.log_sigma.detach().clone().requires_grad_()

    def loss(ps: list[torch.Tensor], ls: torch.Tensor, r: bmaml.Rule = rule) -> torch.Tensor:
        return bmaml.query_loss(r, bmaml.Meta(dict(zip(names, ps, strict=True)), ls), sx, sy, qx, qy)[0]

    grads = torch.autograd.grad(loss(leaves, log_sigma), [*leaves, log_sigma])
    direction = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in [*leaves, log_sigma]]
    eps = 1e-6
    with torch.no_grad():
        plus = loss(
            [t + eps * d for t, d in zip(leaves, direction, strict=False)], log_sigma + eps * direction[-1]
        )
        minus = loss(
            [t - eps * d for t, d in zip(leaves, direction, strict=False)], log_sigma - eps * direction[-1]
        )
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction, strict=True))
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)
    # The first-order gradient leaves out the steps' derivatives: measurably different here.
    first = torch.autograd.grad(
        loss(leaves, log_sigma, replace(rule, first_order=True)), [*leaves, log_sigma]
    )
    assert abs(sum((gr * d).sum() for gr, d in zip(first, direction, strict=True)) - analytic) > 1e-3


def test_chaser_distance_of_one_particle_is_the_leaders_gradient_step_squared() -> None:
    """One particle: SVGD is a gradient step on the log posterior, so the leader is one more step of it on
    support plus query from the chaser, and the distance is ``lr^2 ||grad log p(chaser | S u Q)||^2``."""
    meta = stacked_mlps(1, 4, torch.float64)
    g = torch.Generator().manual_seed(1)
    sx, sy, qx, qy = (torch.randn(4, 1, generator=g, dtype=torch.float64) for _ in range(4))
    rule = bmaml.Rule("svgd", lr=0.03, steps=2, outer="chaser", leader_steps=1)
    distance, chaser = bmaml.chaser_distance(rule, meta, sx, sy, qx, qy)
    for k, v in bmaml.adapt_particles(rule, meta, sx, sy).items():
        torch.testing.assert_close(chaser[k], v)
    params = {k: v[0].detach().clone().requires_grad_() for k, v in chaser.items()}
    x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
    grads = torch.autograd.grad(
        bmaml.log_posterior(params, meta.log_sigma, x, y, None), list(params.values())
    )
    want = 0.03**2 * sum((gr**2).sum() for gr in grads)
    assert distance.item() == pytest.approx(want.item(), rel=1e-9)


def test_chaser_meta_gradient_holds_the_leader_and_sigma_constant() -> None:
    """The chaser loss's gradient is that of ``||chaser(theta) - L||^2`` with the leader ``L`` fixed at its
    value (finite differences through the SVGD steps); ``sigma`` gets none from it, and in ``query_loss`` only
    the gradient of the query NLL with the chaser's particles held constant."""
    meta = stacked_mlps(3, 2, torch.float64)
    g = torch.Generator().manual_seed(0)
    sx, sy, qx, qy = (torch.randn(5, 1, generator=g, dtype=torch.float64) for _ in range(4))
    rule = bmaml.Rule("svgd", lr=0.05, steps=2, prior_std=3.0, outer="chaser", noise_scaled=True)
    names = list(meta.particles)
    leaves = [meta.particles[n].detach().clone().requires_grad_() for n in names]
    log_sigma = meta.log_sigma.detach().clone().requires_grad_()
    distance, chaser = bmaml.chaser_distance(rule, bmaml.Meta(dict(zip(names, leaves, strict=True)), log_sigma),
                                             sx, sy, qx, qy)  # fmt: skip
    grads = torch.autograd.grad(distance, [*leaves, log_sigma], retain_graph=True, allow_unused=True)
    assert grads[-1] is None  # the noise is a constant of the chaser loss
    grads = grads[:-1]
    start = bmaml.Meta({k: v.detach() for k, v in chaser.items()}, log_sigma.detach())
    lead = replace(rule, steps=1, first_order=True)
    leader = bmaml.adapt_particles(lead, start, torch.cat([sx, qx]), torch.cat([sy, qy]))

    def fixed_leader(ps: list[torch.Tensor]) -> torch.Tensor:
        moved = bmaml.adapt_particles(
            rule, bmaml.Meta(dict(zip(names, ps, strict=True)), log_sigma.detach()), sx, sy
        )
        return sum(((moved[k] - leader[k]) ** 2).sum() for k in moved)

    direction = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in leaves]
    eps = 1e-6
    with torch.no_grad():
        plus = fixed_leader([t + eps * d for t, d in zip(leaves, direction, strict=True)])
        minus = fixed_leader([t - eps * d for t, d in zip(leaves, direction, strict=True)])
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction, strict=True))
    assert analytic.item() == pytest.approx(((plus - minus) / (2 * eps)).item(), rel=1e-6, abs=1e-9)
    # sigma: only the query NLL of the held chaser mixture
    loss, _ = bmaml.query_loss(
        rule, bmaml.Meta(dict(zip(names, leaves, strict=True)), log_sigma), sx, sy, qx, qy
    )
    (sigma_grad,) = torch.autograd.grad(loss, [log_sigma])
    held = {k: v.detach() for k, v in chaser.items()}

    def nll(ls: torch.Tensor) -> torch.Tensor:  # lr 0: the particles stay where the chaser left them
        return bmaml.query_loss(replace(rule, lr=0.0, outer="bfa"), bmaml.Meta(held, ls), sx, sy, qx, qy)[0]

    (want,) = torch.autograd.grad(nll(log_sigma), [log_sigma])
    torch.testing.assert_close(sigma_grad, want)


def constant_particles(c: torch.Tensor) -> bmaml.Meta:
    """Particles whose network outputs the constant ``c[m]`` everywhere (zero weights, head bias ``c[m]``)."""
    meta = stacked_mlps(len(c), 0)
    particles = {k: torch.zeros_like(v) for k, v in meta.particles.items()}
    particles["head.bias"] = c[:, None].clone()
    return bmaml.Meta(particles, torch.tensor(math.log(0.5)))


def normal_density(v: float, mean: float, s: float) -> float:
    return math.exp(-0.5 * ((v - mean) / s) ** 2) / (s * math.sqrt(2 * math.pi))


def mixture_cdf(y: float, c: list[float], s: float) -> float:
    return sum(0.5 * (1 + math.erf((y - ci) / (s * math.sqrt(2)))) for ci in c) / len(c)


def quantile(q: float, c: list[float], s: float) -> float:
    low, high = -20.0, 20.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if mixture_cdf(mid, c, s) < q else (low, mid)
    return low


def test_mixture_scores_and_outer_losses_match_closed_forms() -> None:
    c, s = [-1.5, 0.0, 2.0], 0.5
    meta = constant_particles(torch.tensor(c))
    # A constant member's MSE step of 0.25 moves it halfway to the support mean, and nothing else moves (its
    # hidden units are 0): task t's components are N((c_m + support_mean_t) / 2, s^2).
    rule = bmaml.Rule("ensemble", lr=0.25, steps=1)
    y = torch.stack([torch.linspace(-4, 4, 801), torch.linspace(-3, 5, 801)])[..., None]  # (2 tasks, 801, 1)
    x = torch.zeros_like(y)
    support_y = torch.tensor([[[1.0], [1.0]], [[-3.0], [-1.0]]])  # support means 1 and -2
    ep = Episode(x[:, :2], support_y, x, y, n_way=1, k_shot=2, q_query=801)
    mse, nll, cover = bmaml.batch_scores(rule, meta, ep, 4096, torch.Generator().manual_seed(0)).T
    for t, support_mean in enumerate([1.0, -2.0]):
        ys, cs = y[t, :, 0].tolist(), [(ci + support_mean) / 2 for ci in c]
        density = [sum(normal_density(v, ci, s) for ci in cs) / 3 for v in ys]
        assert nll[t].item() == pytest.approx(-sum(math.log(d) for d in density) / len(ys), rel=1e-5)
        assert mse[t].item() == pytest.approx(sum((v - sum(cs) / 3) ** 2 for v in ys) / len(ys), rel=1e-5)
        low, high = quantile(0.05, cs, s), quantile(0.95, cs, s)
        assert cover[t].item() == pytest.approx(sum(low <= v <= high for v in ys) / len(ys), abs=0.02)
    rule = bmaml.Rule("svgd", lr=0.0, steps=1)  # no adaptation: the particles stay constant
    # Outer losses on 3 query points: BMAML's log of the mean joint likelihood, the ensemble's mean NLL.
    qy = torch.tensor([[0.3], [-1.0], [1.2]])
    log_n = [[math.log(normal_density(v, ci, s)) for v in qy[:, 0].tolist()] for ci in c]  # (M, N)
    bfa = -math.log(sum(math.exp(sum(row)) for row in log_n) / 3) / 3
    mean_nll = -sum(sum(row) for row in log_n) / 9
    svgd_loss, _ = bmaml.query_loss(rule, meta, x[0, :2], y[0, :2], torch.zeros(3, 1), qy)
    ensemble_loss, _ = bmaml.query_loss(
        replace(rule, outer="mean_nll"), meta, x[0, :2], y[0, :2], torch.zeros(3, 1), qy
    )
    assert svgd_loss.item() == pytest.approx(bfa, rel=1e-5)
    assert ensemble_loss.item() == pytest.approx(mean_nll, rel=1e-5)


def trained(spec: dict, run_dir: Path, resume: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    run = run_config_from_dict(spec)
    torch.manual_seed(seed)
    learner = algorithm("bmaml").build(run, run_dir, torch.device("cpu"))
    fit(learner, run.train, run_dir, resume=resume)
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


@pytest.mark.parametrize("inner", ["svgd", "ensemble"])
def test_seeded_runs_are_identical_and_resume_is_exact(inner: str, tmp_path: Path) -> None:
    whole = trained(config(6, inner=inner), tmp_path / "a")
    again = trained(config(6, inner=inner), tmp_path / "b")
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    trained(config(3, inner=inner), tmp_path / "c")  # 3 steps, then resumed to 6 from another seed's init
    resumed = trained(config(6, inner=inner), tmp_path / "c", resume=True, seed=1)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    torch.manual_seed(0)
    initial = algorithm("bmaml").build(run_config_from_dict(config(6)), tmp_path, torch.device("cpu"))
    assert all(
        not torch.equal(whole[k], v) for k, v in initial.model.state_dict().items()
    )  # training moved all


@pytest.mark.parametrize("inner", ["svgd", "ensemble"])
def test_a_short_run_learns(inner: str, tmp_path: Path) -> None:
    run = run_config_from_dict(config(300, inner=inner, particles=3, inner_lr=0.01))
    torch.manual_seed(0)
    learner = algorithm("bmaml").build(run, tmp_path, torch.device("cpu"))
    before = learner.evaluate("val", 32)
    fit(learner, run.train, tmp_path / "run")
    after = learner.evaluate("val", 32)
    assert after["val/nll"] < before["val/nll"] - 0.2 and after["val/mse"] < before["val/mse"]
    assert set(after) == {f"val/{m}{s}" for m in ("mse", "nll", "coverage90") for s in ("", "_ci95")}
    assert (learner.figures(tmp_path) or [None])[0].is_file()


@pytest.mark.parametrize(
    ("params", "task", "key"),
    [({"inner": "chaser"}, {}, "bmaml.inner"), ({"particles": 0}, {}, "bmaml.particles"),
     ({"inner_lr": 0.0}, {}, "bmaml.inner_lr"), ({"prior_std": -1.0}, {}, "bmaml.prior_std"),
     ({"outer_loss": "leader"}, {}, "bmaml.outer_loss"), ({"step_scale": "sigma"}, {}, "bmaml.step_scale"),
     ({"outer_loss": "chaser", "inner": "ensemble"}, {}, "bmaml.outer_loss"),
     ({"outer_loss": "chaser", "leader_steps": 0}, {}, "bmaml.leader_steps"),
     ({}, {"dataset": "omniglot", "ways": 5, "shots": 1}, "task.dataset")],
)  # fmt: skip
def test_bad_values_name_the_key(params: dict, task: dict, key: str, tmp_path: Path) -> None:
    spec = config(**params)
    spec["task"] = {**spec["task"], **task}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run = run_config_from_dict(spec)
        algorithm(run.algo).build(run, tmp_path, torch.device("cpu"))
