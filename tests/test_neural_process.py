"""Neural processes (metalab.meta.neural_process): likelihood and KL terms against closed forms, calibration
scores against known distributions, invariances, a short run that learns, and named config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metalab.errors import ConfigError
from metalab.experiment import algorithm, run_config_from_dict
from metalab.meta import neural_process as npm


def config(**params: object) -> dict:
    return {
        "algo": "neural_process",
        "task": {"dataset": "sinusoid", "ways": 1, "shots": 5, "queries": 5},
        "train": {"steps": 300, "meta_batch": 16, "lr": 1e-3, "eval_every": 300, "eval_episodes": 64,
                  "log_every": 50, "device": "cpu"},
        "eval": {"episodes": 64, "batch": 32},
        "neural_process": {"hidden": 32, "layers": 2, "latent_dim": 8, "eval_samples": 8, **params},
    }  # fmt: skip


def test_gaussian_log_prob_is_the_normal_density() -> None:
    mean, std, y = torch.randn(7, 1), torch.rand(7, 1) + 0.1, torch.randn(7, 1)
    expected = torch.distributions.Normal(mean, std).log_prob(y)
    torch.testing.assert_close(npm.gaussian_log_prob(npm.Gaussian(mean, std), y), expected)


def test_scores_of_one_gaussian_match_the_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    mean, std = torch.zeros(2, 20_000, 1), torch.full((2, 20_000, 1), 2.0)
    y = mean + std * torch.randn(mean.shape, generator=g)
    mse, nll, cover = npm.mixture_scores(npm.Gaussian(mean[None], std[None]), y, 10, g).mean(0)
    assert abs(mse.item() - 4.0) < 0.15  # the variance
    assert abs(nll.item() - (0.5 * math.log(2 * math.pi * 4.0) + 0.5)) < 0.02  # the entropy
    assert abs(cover.item() - 0.9) < 0.01


def test_a_mixture_of_equal_components_is_that_component_and_covers_its_own_draws() -> None:
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(1, 500, 1), torch.rand(1, 500, 1) + 0.5
    y = mean + std * torch.randn(mean.shape, generator=g)
    one = npm.mixture_scores(npm.Gaussian(mean[None], std[None]), y, 10, g)
    four = npm.mixture_scores(
        npm.Gaussian(mean[None].expand(4, -1, -1, -1), std[None].expand(4, -1, -1, -1)), y, 2000, g
    )
    torch.testing.assert_close(four[:, :2], one[:, :2])  # same mean, same density
    assert abs(four[0, 2].item() - 0.9) < 0.04  # the sampled interval of the mixture is the Gaussian's
    # Two well-separated components: the mixture's interval covers draws from the mixture, not from one mode.
    means = torch.stack([torch.full((1, 4000, 1), -3.0), torch.full((1, 4000, 1), 3.0)])
    stds = torch.full_like(means, 0.5)
    pick = torch.randint(2, (1, 4000, 1), generator=g)
    draws = torch.where(pick == 0, -3.0, 3.0) + 0.5 * torch.randn((1, 4000, 1), generator=g)
    assert abs(npm.mixture_scores(npm.Gaussian(means, stds), draws, 4000, g)[0, 2].item() - 0.9) < 0.03


def test_np_kl_vanishes_when_the_targets_are_the_context_and_the_cnp_ignores_context_order() -> None:
    torch.manual_seed(0)
    model = npm.NeuralProcess(1, 16, 2, 4, 0.1)
    x, y = torch.randn(3, 6, 1), torch.randn(3, 6, 1)
    _, metrics = npm.training_loss(model, x, y, x, y, torch.Generator().manual_seed(0))
    assert metrics["train/kl"] == 0.0
    _, metrics = npm.training_loss(model, x[:, :2], y[:, :2], x, y, torch.Generator().manual_seed(0))
    assert metrics["train/kl"] > 0
    cnp = npm.NeuralProcess(1, 16, 2, 0, 0.1)
    order = torch.randperm(6)
    a = cnp.decode(x, cnp.represent(x, y), None)
    b = cnp.decode(x, cnp.represent(x[:, order], y[:, order]), None)
    torch.testing.assert_close(a.mean, b.mean)


@pytest.mark.parametrize("model", ["cnp", "np"])
def test_a_short_run_learns(model: str, tmp_path: Path) -> None:
    from metalab.train.loop import fit

    run = run_config_from_dict(config(model=model))
    torch.manual_seed(0)
    learner = algorithm(run.algo).build(run, tmp_path, torch.device("cpu"))
    before = learner.evaluate("val", 64)
    fit(learner, run.train, tmp_path / "run")
    after = learner.evaluate("val", 64)
    assert after["val/nll"] < before["val/nll"] - 0.2 and after["val/mse"] < before["val/mse"]
    assert 0.5 < after["val/coverage90"] <= 1.0
    assert set(learner.evaluate("test", 8)) == {
        f"test/{m}{s}" for m in ("mse", "nll", "coverage90") for s in ("", "_ci95")
    }
    assert (learner.figures(tmp_path) or [None])[0].is_file()


@pytest.mark.parametrize(
    ("params", "key"),
    [({"model": "gp"}, "neural_process.model"), ({"min_std": 0.0}, "neural_process.min_std"),
     ({"min_context": 9}, "neural_process.min_context"),
     ({"bottleneck_beta": -1.0}, "neural_process.bottleneck_beta")],
)  # fmt: skip
def test_bad_values_name_the_key(params: dict, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run = run_config_from_dict(config(**params))
        algorithm(run.algo).build(run, tmp_path, torch.device("cpu"))


def test_the_input_bottleneck_adds_beta_times_its_kl_and_is_its_mean_at_evaluation() -> None:
    torch.manual_seed(0)
    model = npm.NeuralProcess(3, 16, 2, 0, 0.1, bottleneck=4)
    x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 1)
    plain, metrics = npm.training_loss(model, x, y, x, y, torch.Generator().manual_seed(0), beta=0.0)
    weighted, _ = npm.training_loss(model, x, y, x, y, torch.Generator().manual_seed(0), beta=2.0)
    assert metrics["train/bottleneck_kl"] > 0
    torch.testing.assert_close(weighted - plain, torch.tensor(2.0 * metrics["train/bottleneck_kl"]))
    model.eval()
    codes, _ = model.inputs(x)
    torch.testing.assert_close(codes, model.bottleneck(x).mean)
