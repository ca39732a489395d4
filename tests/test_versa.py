"""VERSA (Gordon et al., ICLR 2019): local reparameterisation against explicit weight samples, the amortization's
symmetries, the zero-variance limit, the objective by hand, the evaluation's averaged predictive (accuracy, nll,
ECE), reproducible evaluation, a tiny training run and config errors."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from metalab.calibration import binned_calibration, top_label
from metalab.data.episodes import Episode, EpisodeSampler, generator_for
from metalab.data.tasks import TaskConfig
from metalab.errors import ConfigError
from metalab.experiment import algorithm, load_run_config, run_config_from_dict
from metalab.meta import episodic, versa
from metalab.models import set_batchnorm_mode
from metalab.train.evaluate import PARTS
from metalab.train.loop import fit
from metalab.utils import seed_everything

SIZE = 16  # the smallest image side Conv-4 takes: a 1x1 final map, so the features are `hidden`-d
HIDDEN = 8


def random_posterior(n: int, d: int, seed: int = 0, log_var_shift: float = -1.0) -> versa.Posterior:
    g = torch.Generator().manual_seed(seed)
    return versa.Posterior(
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(n, d, generator=g, dtype=torch.float64) + log_var_shift,
        torch.randn(n, generator=g, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64) + log_var_shift,
    )


def test_local_reparameterisation_matches_explicit_weight_samples() -> None:
    """The logits of explicit draws of (W, b) ~ q have the mean and variance logit_distribution gives, and so
    do sample_logits' direct draws of the logits."""
    n, d, m, draws = 3, 4, 5, 200_000
    q = random_posterior(n, d)
    x = torch.randn(m, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean, variance = versa.logit_distribution(q, x)  # (M, N) each
    torch.testing.assert_close(mean, x @ q.weight_mean.T + q.bias_mean)  # the closed form itself
    torch.testing.assert_close(
        variance, x.square() @ q.weight_log_variance.exp().T + q.bias_log_variance.exp()
    )

    g = torch.Generator().manual_seed(2)
    w = q.weight_mean + q.weight_log_variance.mul(0.5).exp() * torch.randn(
        draws, n, d, generator=g, dtype=torch.float64
    )
    b = q.bias_mean + q.bias_log_variance.mul(0.5).exp() * torch.randn(
        draws, n, generator=g, dtype=torch.float64
    )
    explicit = torch.einsum("md,lnd->lmn", x, w) + b[:, None, :]  # (L, M, N)
    direct = versa.sample_logits(mean, variance, draws, torch.Generator().manual_seed(3))
    for logits in (explicit, direct):
        # mean within ~6 standard errors, variance within 2% (its relative standard error is sqrt(2 / L) = 0.3%)
        assert ((logits.mean(0) - mean).abs() <= 6 * (variance / draws).sqrt()).all()
        torch.testing.assert_close(logits.var(0), variance, rtol=0.02, atol=0.0)
    # the Gaussians differ from class to class and query to query: a shared scalar would not pass the above
    assert variance.std() > 0.1 * variance.mean()


def test_zero_variance_is_the_linear_head_of_the_mean_weights() -> None:
    q = random_posterior(4, 6)
    q = q._replace(
        weight_log_variance=torch.full_like(q.weight_log_variance, -math.inf),
        bias_log_variance=torch.full_like(q.bias_log_variance, -math.inf),
    )
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, variance = versa.logit_distribution(q, x)
    assert torch.equal(variance, torch.zeros_like(variance))
    logits = versa.sample_logits(mean, variance, 13, torch.Generator().manual_seed(0))
    head = F.linear(x, q.weight_mean, q.bias_mean)  # a deterministic linear classifier with the mean weights
    torch.testing.assert_close(versa.predictive_log_probs(logits), F.log_softmax(head, -1))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    torch.testing.assert_close(
        versa.objective(logits, labels), -F.cross_entropy(head, labels, reduction="none")
    )


def test_objective_by_hand() -> None:
    """Two samples of the logits of two queries over three classes: log of the mean probability of the label."""
    logits = torch.tensor(
        [
            [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]],  # sample 1
            [[-1.0, 1.0, 0.0], [3.0, 0.0, 0.0]],  # sample 2
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 1])

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    p00, p01 = softmax([2.0, 0.0, -1.0])[0], softmax([-1.0, 1.0, 0.0])[0]  # query 0, label 0
    p10, p11 = softmax([0.0, 1.0, 0.0])[1], softmax([3.0, 0.0, 0.0])[1]  # query 1, label 1
    expected = torch.tensor([math.log((p00 + p01) / 2), math.log((p10 + p11) / 2)], dtype=torch.float64)
    torch.testing.assert_close(versa.objective(logits, labels), expected)
    # strictly above the mean of the samples' log-likelihoods (Jensen; an ELBO-style average would give that)
    mean_log = torch.tensor([math.log(p00 * p01) / 2, math.log(p10 * p11) / 2], dtype=torch.float64)
    assert (versa.objective(logits, labels) > mean_log + 0.1).all()
    # the averaged predictive's log-probabilities give the same at the label: its cross-entropy is the objective
    scores = versa.predictive_log_probs(logits)
    torch.testing.assert_close(scores.gather(-1, labels[:, None]).squeeze(-1), expected)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(scores.softmax(-1), logits.softmax(-1).mean(0))


def tiny_config(**changes: object) -> versa.Config:
    return versa.Config(
        **{"hidden": HIDDEN, "amortizer": (12, 12), "samples": 4, "eval_samples": 50, **changes}
    )


def tiny_model(seed: int = 0, batchnorm: str = "inductive") -> versa.Versa:
    torch.manual_seed(seed)
    model = versa.Versa(tiny_config(batchnorm=batchnorm), image_size=SIZE)
    set_batchnorm_mode(model, batchnorm)
    return model


def toy_episode(n: int = 3, k: int = 2, q: int = 2, tasks: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, n * k, 1, SIZE, SIZE, generator=g)
    qx = torch.rand(tasks, n * q, 1, SIZE, SIZE, generator=g)
    sy = torch.arange(n).repeat_interleave(k).expand(tasks, -1)
    qy = torch.arange(n).repeat_interleave(q).expand(tasks, -1)
    return Episode(sx, sy, qx, qy, n, k, q)


def warm_up(model: versa.Versa, ep: Episode) -> versa.Versa:
    """A few training-mode forwards, so the running statistics are no longer the initial (0, 1), then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            versa.episode_logit_distribution(model, ep)
    return model.eval()


def test_amortization_is_permutation_invariant_within_classes_and_equivariant_across_them() -> None:
    torch.manual_seed(0)
    amortizer = versa.Amortizer(5, (7, 7))
    support = torch.randn(2, 9, 5)  # 2 tasks, 3 classes x 3 shots
    labels = torch.tensor([0, 1, 2, 2, 0, 1, 1, 2, 0]).expand(2, -1)
    q = versa.infer_head(amortizer, support, labels, 3)
    assert q.weight_mean.shape == (2, 3, 5) and q.bias_log_variance.shape == (2, 3)

    order = torch.tensor([4, 8, 0, 6, 2, 5, 1, 3, 7])  # the support shuffled, labels moving with the images
    shuffled = versa.infer_head(amortizer, support[:, order], labels[:, order], 3)
    for a, b in zip(q, shuffled, strict=True):
        torch.testing.assert_close(a, b)

    perm = torch.tensor([2, 0, 1])  # class c renamed perm[c]: row perm[c] of the head is the old row c
    relabelled = versa.infer_head(amortizer, support, perm[labels], 3)
    for a, b in zip(q, relabelled, strict=True):
        torch.testing.assert_close(b[:, perm], a)

    # any ways: a class's row depends on its own shots alone, so the 2-way sub-task gives the same rows
    keep = labels[0] < 2
    two_way = versa.infer_head(amortizer, support[:, keep], labels[:, keep], 2)
    for a, b in zip(q, two_way, strict=True):
        torch.testing.assert_close(b, a[:, :2])
    # and the rows do depend on the shots (the network is not constant)
    assert not torch.allclose(q.weight_mean[:, 0], q.weight_mean[:, 1])


def test_episode_logits_ignore_support_order_and_follow_relabelling() -> None:
    """The whole model (Conv-4 in inductive evaluation mode, then the amortizer) on images."""
    ep = toy_episode(n=3, k=2, q=2)
    model = warm_up(tiny_model(), ep)
    mean, variance = versa.episode_logit_distribution(model, ep)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = ep._replace(support_x=ep.support_x[:, order], support_y=ep.support_y[:, order])
    for a, b in zip((mean, variance), versa.episode_logit_distribution(model, shuffled), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    perm = torch.tensor([1, 2, 0])
    relabelled = ep._replace(support_y=perm[ep.support_y], query_y=perm[ep.query_y])
    for a, b in zip((mean, variance), versa.episode_logit_distribution(model, relabelled), strict=True):
        torch.testing.assert_close(b[..., perm], a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", [-6.0, 0.0])
def test_log_variances_start_near_their_configured_value(init: float) -> None:
    torch.manual_seed(0)
    amortizer = versa.Amortizer(8, (12, 12), init_log_variance=init)
    q = amortizer(torch.rand(2, 3, 8))
    for log_variance in (q.weight_log_variance, q.bias_log_variance):
        assert (log_variance - init).abs().max() < 1.0


def test_gradients_reach_every_parameter() -> None:
    model = tiny_model()
    model.train()
    ep = toy_episode()
    loss, scores = versa.training_loss(model, 4, ep)
    assert scores.shape == (2, 6, 3)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # the log-variance networks too: the objective sees the noise


def run_spec(**section: object) -> dict:
    return {
        "algo": "versa",
        "seed": 3,
        "task": {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 3, "image_size": SIZE},
        "train": {
            "steps": 4,
            "meta_batch": 2,
            "lr": 0.003,
            "log_every": 1,
            "eval_every": 2,
            "eval_episodes": 4,
            "checkpoint_every": 2,
            "device": "cpu",
        },
        "eval": {"episodes": 6, "batch": 4},
        "versa": {"hidden": HIDDEN, "amortizer": [12, 12], "samples": 4, "eval_samples": 50, **section},
    }


@pytest.fixture
def synthetic_omniglot(monkeypatch: pytest.MonkeyPatch) -> dict[str, EpisodeSampler]:
    """``build`` draws its episodes from random 16x16 "characters" instead of Omniglot; returns the evaluation
    samplers (the same episodes as the learner's)."""
    pool = torch.randint(0, 256, (10, 6, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    pool = pool.to(torch.uint8)

    def sampler(cfg: TaskConfig, part: str, seed: int, root: Path) -> EpisodeSampler:
        return EpisodeSampler(
            pool, cfg.train_ways or cfg.ways, cfg.shots, cfg.train_queries or cfg.queries, seed
        )

    def eval_samplers(cfg: TaskConfig, seed: int, root: Path) -> dict[str, EpisodeSampler]:
        return {
            part: EpisodeSampler(pool, cfg.ways, cfg.shots, cfg.queries, seed + i)
            for i, part in enumerate(PARTS)
        }

    monkeypatch.setattr(episodic, "make_sampler", sampler)
    monkeypatch.setattr(episodic, "EvalSamplers", eval_samplers)
    return eval_samplers(TaskConfig(ways=3, shots=1, queries=3, image_size=SIZE), 1_000_003, Path())


def noisy(model: versa.Versa) -> versa.Versa:
    """Large posterior variances, so one sample and the average of many differ clearly."""
    with torch.no_grad():
        model.amortizer.weight_log_variance[-1].bias.fill_(1.0)
        model.amortizer.bias_log_variance[-1].bias.fill_(1.0)
    return model


def calibration_by_hand(
    model: versa.Versa, samplers: dict[str, EpisodeSampler], samples: int, generator: torch.Generator
) -> tuple[float, float, float]:
    """ECE, accuracy and nll of the test episodes (6, in batches of 4, as run_spec) computed here, with the
    noise of ``generator`` in the evaluation's order."""
    probs, labels = [], []
    with torch.no_grad():
        for index, tasks in ((0, 4), (1, 2)):
            ep = samplers["test"].sample(index, tasks)
            mean, variance = versa.episode_logit_distribution(model, ep)
            logits = versa.sample_logits(mean, variance, samples, generator)
            probs.append(logits.softmax(-1).mean(0))  # the MC average of the softmax, directly
            labels.append(ep.query_y)
    p, y = torch.cat(probs), torch.cat(labels)
    ece = binned_calibration(*top_label(p, y)).ece
    acc = (p.argmax(-1) == y).double().mean().item()
    nll = -p.gather(-1, y[..., None]).log().double().mean().item()
    return ece, acc, nll


def test_evaluation_scores_the_averaged_predictive(
    tmp_path: Path, synthetic_omniglot: dict[str, EpisodeSampler]
) -> None:
    """The evaluation's accuracy, nll and pooled ECE are those of the MC-averaged probabilities (recomputed here
    from the same noise), not those of one sample, which differ."""
    run = run_config_from_dict(run_spec())
    learner = versa.build(run, tmp_path, torch.device("cpu"))
    ep = synthetic_omniglot["val"].sample(0, 2)
    noisy(warm_up(learner.model, ep))
    test = learner.evaluate("test", 6)

    def fresh() -> torch.Generator:  # the evaluation's generator for the test part
        return generator_for(run.eval.seed, zlib.crc32(b"test"))

    ece, acc, nll = calibration_by_hand(learner.model, synthetic_omniglot, 50, fresh())
    # float32 evaluation: the two routes to the average differ in rounding only
    assert test["test/ece"] == pytest.approx(ece, abs=1e-6)
    assert test["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert test["test/nll"] == pytest.approx(nll, rel=1e-5)
    one_ece, _, one_nll = calibration_by_hand(learner.model, synthetic_omniglot, 1, fresh())
    assert abs(one_ece - ece) > 0.02 and abs(one_nll - nll) > 0.05


@pytest.mark.usefixtures("synthetic_omniglot")
def test_evaluation_is_reproducible_and_leaves_the_global_generator_alone(tmp_path: Path) -> None:
    run = run_config_from_dict(run_spec())
    learner = versa.build(run, tmp_path, torch.device("cpu"))
    noisy(learner.model).eval()
    torch.manual_seed(7)
    first = learner.evaluate("val", 6)
    state = torch.get_rng_state()
    assert learner.evaluate("test", 6) != first
    assert learner.evaluate("val", 6) == first
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.usefixtures("synthetic_omniglot")
def test_tiny_training_run_is_seeded(tmp_path: Path) -> None:
    def train(seed: int, where: str) -> dict[str, torch.Tensor]:
        run = run_config_from_dict({**run_spec(), "seed": seed})
        seed_everything(run.seed)
        learner = versa.build(run, tmp_path, torch.device("cpu"))
        result = fit(learner, run.train, tmp_path / where)
        assert result.step == 4 and math.isfinite(result.metrics["val/ece"])
        return learner.model.state_dict()

    first, second, other = train(3, "a"), train(3, "b"), train(4, "c")
    assert all(torch.equal(v, second[k]) for k, v in first.items())
    assert not all(torch.equal(v, other[k]) for k, v in first.items())


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"samples": 0}, "versa.samples"),
        ({"eval_samples": 0}, "versa.eval_samples"),
        ({"eval_samples": 10**6}, "versa.eval_samples"),
        ({"amortizer": []}, "versa.amortizer"),
        ({"amortizer": [12, 0]}, "versa.amortizer[1]"),
        ({"hidden": 0}, "versa.hidden"),
        ({"init_log_variance": 50.0}, "versa.init_log_variance"),
        ({"batchnorm": "episode"}, "versa.batchnorm"),
        ({"sample": 10}, "versa.sample"),
    ],
)
def test_config_errors_name_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        run_config_from_dict(run_spec(**section))
    assert err.value.key == key and f"'{key}'" in str(err.value)


def test_registered_as_versa_and_configs_load() -> None:
    assert algorithm("versa") is versa
    for cell, ways in (("5w1s", 5), ("20w1s", 20)):
        run = load_run_config(REPO / "configs" / f"versa_omniglot_{cell}.yaml")
        assert (run.algo, run.task.ways, run.task.train_ways, run.task.shots) == ("versa", ways, ways, 1)
