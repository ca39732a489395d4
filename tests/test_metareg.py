"""Meta-regularization: Gaussian KLs in closed form (against the formula and Monte Carlo), gradients against
finite differences, the activation bottleneck, MR-MAML against MAML, MR-ProtoNet, config errors, a CLI run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch.func import functional_call

from metalab.cli import main
from metalab.data.episodes import Episode, EpisodeSampler
from metalab.data.tasks import make_sampler
from metalab.errors import ConfigError
from metalab.experiment import load_run_config, run_config_from_dict
from metalab.meta import maml, mr_maml, protonet
from metalab.meta.adapt import adapt
from metalab.meta.gbml import task_loss
from metalab.meta.metareg import Gaussian, GaussianBottleneck, gaussian_kl, softplus_inverse
from metalab.models import Conv4
from metalab.train.logger import read_metrics

D = torch.float64
CONFIG = REPO / "configs" / "mr_maml_sinusoid.yaml"
TINY = {
    "train.steps": 3,
    "train.meta_batch": 4,
    "train.log_every": 1,
    "train.eval_every": 3,
    "train.eval_episodes": 4,
    "train.checkpoint_every": 3,
    "eval.episodes": 4,
    "eval.batch": 4,
    "mr_maml.eval_inner_steps": 2,
    "mr_maml.mlp_hidden": [8, 3, 8],
    "train.device": "cpu",
}


def tiny_run(**changes: object):
    """The shipped NME sinusoid config, shrunk; ``changes`` are more ``key=value`` overrides."""
    items = {**TINY, **changes}
    return load_run_config(CONFIG, [f"{k}={v}" for k, v in items.items()])


def closed_form_kl(mq: float, sq: float, mp: float, sp: float) -> float:
    return math.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


# ---------------------------------------------------------------------------------------------- Gaussians


def test_gaussian_kl_matches_the_closed_form() -> None:
    cases = [(0.3, 0.5, -1.0, 2.0), (0.0, 1.0, 0.0, 1.0), (2.0, 1e-3, 0.5, 0.7), (-1.5, 3.0, 0.0, 0.1)]
    for mq, sq, mp, sp in cases:
        got = gaussian_kl(torch.tensor([mq], dtype=D), torch.tensor([sq], dtype=D), mp, sp)
        assert got.item() == pytest.approx(closed_form_kl(mq, sq, mp, sp), rel=1e-12, abs=1e-12)
    # Summed over coordinates, and agreeing with torch.distributions' own KL of Normals.
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(3, 4, generator=g, dtype=D), torch.randn(3, 4, generator=g, dtype=D)
    sq, sp = torch.rand(3, 4, generator=g, dtype=D) + 0.1, torch.rand(3, 4, generator=g, dtype=D) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp)
    )
    torch.testing.assert_close(gaussian_kl(mq, sq, mp, sp), expected.sum())
    assert gaussian_kl(mq, sq, mq, sq).item() == pytest.approx(0.0, abs=1e-12)
    # A float32 std whose square underflows still has a finite KL (MR-MAML's posteriors may start there).
    tiny = gaussian_kl(torch.tensor([0.1]), torch.tensor([1e-30]), 0.0, 1.0)
    assert tiny.item() == pytest.approx(closed_form_kl(0.1, 1e-30, 0.0, 1.0), rel=1e-6)


def test_gaussian_kl_matches_monte_carlo() -> None:
    """E_q[log q(x) - log p(x)] by sampling, fixed seed: within 4 standard errors of the closed form."""
    g = torch.Generator().manual_seed(1)
    mq, sq, mp, sp = torch.tensor([0.4, -1.0], dtype=D), torch.tensor([0.3, 1.5], dtype=D), 0.2, 1.2
    x = mq + sq * torch.randn(200_000, 2, generator=g, dtype=D)  # (S, 2)
    q, p = torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp)
    per_sample = (q.log_prob(x) - p.log_prob(x)).sum(-1)  # (S,)
    estimate, stderr = per_sample.mean().item(), per_sample.std().item() / math.sqrt(len(per_sample))
    assert abs(estimate - gaussian_kl(mq, sq, mp, sp).item()) < 4 * stderr
    assert stderr < 0.01  # the check is tight


def test_softplus_inverse_round_trips() -> None:
    std = torch.tensor([1e-30, 1e-8, 1e-3, 0.5, 3.0, 200.0], dtype=D)
    torch.testing.assert_close(F.softplus(softplus_inverse(std).to(D)), std, rtol=1e-6, atol=0)


def posterior64(seed: int = 0) -> Gaussian:
    g = torch.Generator().manual_seed(seed)
    mean = {"a.weight": torch.randn(3, 2, generator=g, dtype=D), "b": torch.randn(4, generator=g, dtype=D)}
    rho = {k: torch.randn(v.shape, generator=g, dtype=D) - 1.0 for k, v in mean.items()}
    return Gaussian(mean, rho)


def test_posterior_kl_sums_its_coordinates_and_takes_a_gaussian_prior() -> None:
    q = posterior64(0)
    std = q.std()
    expected = sum(
        closed_form_kl(m, s, 0.0, 0.7)
        for k in q.mean
        for m, s in zip(q.mean[k].flatten().tolist(), std[k].flatten().tolist(), strict=True)
    )
    assert q.kl(0.7).item() == pytest.approx(expected, rel=1e-12)
    other = posterior64(1)
    expected = sum(gaussian_kl(q.mean[k], std[k], other.mean[k], other.std()[k]) for k in q.mean)
    torch.testing.assert_close(q.kl(other), expected)
    assert q.kl(q).item() == pytest.approx(0.0, abs=1e-12)
    around = Gaussian.around({"w": torch.zeros(5)}, 0.25)
    torch.testing.assert_close(around.std()["w"], torch.full((5,), 0.25))
    assert Gaussian({}, {}).kl(1.0).item() == 0.0


def test_posterior_samples_are_reparameterised_and_reproducible() -> None:
    q = Gaussian.around({"w": torch.full((20_000,), 0.5)}, 0.2)
    a, b = q.sample(torch.Generator().manual_seed(3)), q.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a["w"], b["w"])
    assert a["w"].mean().item() == pytest.approx(0.5, abs=0.01) and a["w"].std().item() == pytest.approx(
        0.2, rel=0.03
    )
    assert not torch.equal(a["w"], q.sample(torch.Generator().manual_seed(4))["w"])


def test_regularizer_gradients_match_finite_differences() -> None:
    """float64 gradcheck (central finite differences) of the KL to a prior, the KL between two posteriors, and a
    loss of a reparameterised sample, in the means and the softplus-scales."""
    q, other = posterior64(0), posterior64(1)
    keys = list(q.mean)

    def rebuild(*tensors: torch.Tensor) -> Gaussian:
        n = len(keys)
        return Gaussian(dict(zip(keys, tensors[:n], strict=True)), dict(zip(keys, tensors[n:], strict=True)))

    inputs = tuple(t.clone().requires_grad_() for t in (*q.mean.values(), *q.rho.values()))
    assert torch.autograd.gradcheck(lambda *t: rebuild(*t).kl(0.8), inputs)
    assert torch.autograd.gradcheck(lambda *t: rebuild(*t).kl(other), inputs)

    def sampled_loss(*t: torch.Tensor) -> torch.Tensor:  # the same noise at every evaluation
        sample = rebuild(*t).sample(torch.Generator().manual_seed(5))
        return sum((torch.sin(v) * v).sum() for v in sample.values())

    assert torch.autograd.gradcheck(sampled_loss, inputs)


# -------------------------------------------------------------------------------------------- bottleneck


def test_bottleneck_kl_and_modes() -> None:
    torch.manual_seed(0)
    layer = GaussianBottleneck(6, 3).double()
    h = torch.randn(5, 6, dtype=D)
    code = layer(h, generator=torch.Generator().manual_seed(0))  # a module starts in training mode
    assert code.z.shape == code.mean.shape == code.std.shape == (5, 3)
    assert not torch.equal(code.z, code.mean) and (code.std > 0).all()
    expected = sum(gaussian_kl(code.mean[i], code.std[i], 0.0, 1.0) for i in range(5)) / 5
    torch.testing.assert_close(code.kl(), expected)
    again = layer(h, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.z, code.z)
    layer.eval()
    assert torch.equal(layer(h).z, code.mean)  # evaluation: the mean, deterministic
    assert not torch.equal(layer(h, sample=True).z, code.mean)
    inputs = (h.clone().requires_grad_(),)
    layer.train()
    assert torch.autograd.gradcheck(
        lambda x: layer(x, generator=torch.Generator().manual_seed(1)).kl(), inputs
    )
    assert torch.autograd.gradcheck(
        lambda x: layer(x, generator=torch.Generator().manual_seed(1)).z.sum(), inputs
    )


# ---------------------------------------------------------------------------------------------- MR-MAML


def learner_loss(algo_module, run, step: int = 0) -> tuple[torch.Tensor, dict[str, float], object]:
    torch.manual_seed(0)  # the same initial network for either algorithm
    learner = algo_module.build(run, Path("."), torch.device("cpu"))
    loss, metrics = learner.loss(step)
    return loss, metrics, learner


def test_without_stochastic_weights_it_is_maml_exactly() -> None:
    """``stochastic: []`` (no posterior): the same loss and gradient as MAML on the same batch."""
    run = tiny_run(**{"mr_maml.stochastic": "[]", "mr_maml.beta": 0.1, "task.label_assignment": "shuffled"})
    mr_loss, metrics, mr_learner = learner_loss(mr_maml, run, step=2)
    data = run.to_yaml_dict()
    data["algo"], data["maml"] = (
        "maml",
        {k: v for k, v in data.pop("mr_maml").items() if k in maml.Config.__dataclass_fields__},
    )
    maml_loss, _, maml_learner = learner_loss(maml, run_config_from_dict(data), step=2)
    assert mr_loss.item() == pytest.approx(maml_loss.item(), rel=1e-6) and metrics["train/kl"] == 0.0
    mr_loss.backward()
    maml_loss.backward()
    for (name, p), (other, q) in zip(
        mr_learner.model.net.named_parameters(), maml_learner.model.named_parameters(), strict=True
    ):
        assert name == other
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_zero_beta_and_zero_std_is_maml_with_the_stochastic_layers_held() -> None:
    """beta = 0 and a posterior std of 1e-30: the loss of MAML whose inner loop leaves those layers alone."""
    run = tiny_run(**{"mr_maml.beta": 0.0, "mr_maml.init_std": 1e-30})
    loss, metrics, learner = learner_loss(mr_maml, run, step=1)
    params = {k: v.detach() for k, v in learner.model.net.named_parameters()}
    held = {k: v for k, v in params.items() if k in ("body.0.weight", "body.2.weight")}
    theta = {k: v for k, v in params.items() if k not in held}
    ep = make_sampler(run.task, "train", run.seed, Path(".")).sample(1, run.train.meta_batch)
    net, cfg = learner.model.net, run.params

    def inner(p, x, y):
        return task_loss(net, True, {**held, **p}, x, y)

    losses = []
    for t in range(ep.tasks):
        sx, sy, qx, qy = ep.task(t)[:4]
        adapted = adapt(theta, inner, (sx, sy), cfg.inner_steps, cfg.inner_lr)
        losses.append(F.mse_loss(functional_call(net, {**held, **adapted}, (qx,)), qy))
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)
    assert metrics["train/std_mean"] == pytest.approx(1e-30, rel=1e-3)


def test_beta_adds_the_kl_and_the_noise_is_per_step() -> None:
    base = {"mr_maml.init_std": 0.05}
    loss0, m0, learner = learner_loss(mr_maml, tiny_run(**base, **{"mr_maml.beta": 0.0}), step=4)
    loss1, _, _ = learner_loss(mr_maml, tiny_run(**base, **{"mr_maml.beta": 0.5}), step=4)
    kl = learner.model.posterior().kl(1.0).item()
    assert m0["train/kl"] == pytest.approx(kl, rel=1e-6)
    assert loss1.item() == pytest.approx(loss0.item() + 0.5 * kl, rel=1e-6)
    # The same step draws the same weights; another step, other weights; evaluation uses the means.
    assert learner.loss(4)[0].item() == pytest.approx(loss0.item(), rel=1e-7)
    assert learner.loss(5)[0].item() != pytest.approx(learner.loss(4)[0].item(), rel=1e-4)
    means = learner.model.meta()["fixed"]
    assert set(means) == {"body.0.weight", "body.2.weight"}
    assert all(v is dict(learner.model.net.named_parameters())[k] for k, v in means.items())


def test_the_posterior_scales_learn() -> None:
    loss, _, learner = learner_loss(mr_maml, tiny_run(**{"mr_maml.init_std": 0.05}))
    loss.backward()
    rho = learner.model.rho.as_dict()
    assert set(rho) == {"body.0.weight", "body.2.weight"}
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in rho.values())
    assert any(p is r for p in learner.parameters for r in rho.values())  # the optimizer trains them


def test_grad_loop_batching_gives_the_same_gradient() -> None:
    loss_v, _, vm = learner_loss(
        mr_maml, tiny_run(**{"mr_maml.batching": "vmap", "mr_maml.init_std": 0.05, "mr_maml.beta": 0.1})
    )
    loss_g, _, gl = learner_loss(
        mr_maml, tiny_run(**{"mr_maml.batching": "grad_loop", "mr_maml.init_std": 0.05, "mr_maml.beta": 0.1})
    )
    assert loss_v.item() == pytest.approx(loss_g.item(), rel=1e-5)
    loss_v.backward()
    loss_g.backward()
    for p, q in zip(vm.model.parameters(), gl.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("beta", -1.0, "must be >= 0"),
        ("prior_std", 0.0, "must be > 0"),
        ("init_std", 0.0, "must be > 0"),
        ("init_std", 1e9, "must be <="),
        ("stochastic", ["body.0.weight", "body.0.weight"], "more than once"),
        ("stochastic", [""], "must name"),
        ("stochastic", "body.0", "expected a list"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_config_from_dict({"algo": "mr_maml", "mr_maml": {key: value}})
    assert info.value.key.startswith(f"mr_maml.{key}") and message in str(info.value)


@pytest.mark.parametrize(
    ("stochastic", "message"),
    [
        ("[body.9]", "names no parameter"),
        ("[body, head]", "nothing to adapt"),
        ("[bod]", "names no parameter"),
    ],
)
def test_stochastic_names_are_checked_against_the_network(stochastic: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        mr_maml.build(tiny_run(**{"mr_maml.stochastic": stochastic}), Path("."), torch.device("cpu"))
    assert info.value.key == "mr_maml.stochastic" and message in str(info.value)


def test_module_prefixes_pick_weights_and_biases() -> None:
    params = dict(mr_maml.network(tiny_run(), tiny_run().params).named_parameters())
    assert next(iter(params)) == "body.0.weight" and params["body.0.weight"].shape[1] == 21  # x and the code
    assert mr_maml.stochastic_names(params, ("body.0",), "k") == ["body.0.weight", "body.0.bias"]


# ------------------------------------------------------------------------------------------- MR-ProtoNet


def tiny_episode(tasks: int = 2) -> Episode:
    pool = torch.randint(
        0, 256, (6, 4, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    return EpisodeSampler(pool, 3, 1, 2, seed=0).sample(0, tasks)


def test_protonet_bottleneck_is_off_by_default_and_regularizes_when_on() -> None:
    assert protonet.Config().bottleneck == 0
    torch.manual_seed(0)
    encoder = protonet.BottleneckEncoder(Conv4(1, 4, image_size=16), 3)
    ep = tiny_episode()
    torch.manual_seed(1)
    loss, logits = protonet.regularized_loss(encoder, 0.25, ep)
    torch.manual_seed(1)  # the same noise, by hand
    codes = [encoder.encode(x) for x in torch.cat([ep.support_x, ep.query_x], 1)]
    z = torch.stack([c.z for c in codes])
    kl = torch.stack([c.kl() for c in codes]).mean()
    expected_logits = protonet.embedding_logits(z, ep)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(
        loss, F.cross_entropy(expected_logits.flatten(0, 1), ep.query_y.flatten()) + 0.25 * kl
    )
    encoder.eval()
    assert torch.equal(
        protonet.episode_logits(encoder, ep), protonet.episode_logits(encoder, ep)
    )  # the means
    with pytest.raises(ConfigError) as info:
        run_config_from_dict({"algo": "protonet", "protonet": {"bottleneck": -1}})
    assert info.value.key == "protonet.bottleneck"


# ---------------------------------------------------------------------------------------------- CLI runs


def test_cli_trains_and_evaluates_mr_maml_on_nme_sinusoid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    assert main(["train", str(CONFIG), *sets, "--runs-dir", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("mr_maml-sinusoid-nme-10s-s0-")
    for name in ("result.json", "checkpoint.pt", "sinusoid_fits.png"):
        assert (run_dir / name).is_file()
    keys = {k for _, k, _ in read_metrics(run_dir / "metrics.csv")}
    assert {"train/mse", "train/kl", "train/std_mean", "val/mse"} <= keys
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--episodes", "4"]) == 0
    assert "test/mse" in capsys.readouterr().out


def test_cli_names_a_bad_stochastic_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "train",
            str(CONFIG),
            "--set",
            "mr_maml.stochastic=[nope]",
            "--set",
            "train.device=cpu",
            "--runs-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "mr_maml.stochastic" in err and "Traceback" not in err


def test_shipped_omniglot_config_names_conv4_parameters() -> None:
    run = load_run_config(REPO / "configs" / "mr_maml_omniglot_20w1s_nme.yaml")
    assert run.task.label_assignment == "fixed" and run.task.ways == 20
    net = mr_maml.network(run, dataclasses.replace(run.params, hidden=4))
    names = mr_maml.stochastic_names(dict(net.named_parameters()), run.params.stochastic, "k")
    assert names == ["features.0.0.weight", "features.1.0.weight"]
