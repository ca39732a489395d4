"""The ambiguity demonstration of benchmarks/bayesian.py: the whole-function coverage rule on closed-form bands,
the central band against a Gaussian's own interval, and the measurement on untrained (tiny) learners."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import REPO

from metalab.meta.neural_process import Z90, Gaussian


@pytest.fixture
def bayesian(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(
        str(REPO)
    )  # benchmarks/ is a top-level package beside metalab/, not installed
    return importlib.import_module("benchmarks.bayesian")


@pytest.mark.parametrize(("grid", "outside", "covered"), [(10, 1, 1.0), (10, 2, 0.0), (200, 20, 1.0),
                                                          (200, 21, 0.0), (200, 0, 1.0)])  # fmt: skip
def test_a_function_is_covered_when_inside_the_band_at_90_percent_of_the_grid(
    bayesian: ModuleType, grid: int, outside: int, covered: float
) -> None:
    # truth = sin on the grid; the band [truth - 1, truth] holds it (the upper edge is inside) except at
    # ``outside`` points where the band sits above it: inside at exactly (grid - outside) / grid of the grid.
    x = torch.linspace(-5, 5, grid)
    truth = torch.sin(x)[None]  # (1, G)
    low, high = truth - 1, truth.clone()
    low[0, :outside] = truth[0, :outside] + 0.5
    high[0, :outside] = truth[0, :outside] + 1
    assert bayesian.function_coverage(low, high, truth).tolist() == [covered]


def test_function_coverage_is_per_function(bayesian: ModuleType) -> None:
    truth = torch.zeros(3, 10)
    low, high = torch.full((3, 10), -1.0), torch.full((3, 10), 1.0)
    high[1] = -0.5  # never inside
    low[2, :5] = 0.5  # inside at half the grid
    assert bayesian.function_coverage(low, high, truth).tolist() == [1.0, 0.0, 0.0]
    assert bayesian.function_coverage(low, high, truth, fraction=0.5).tolist() == [1.0, 0.0, 1.0]


def test_central_band_is_the_gaussian_interval_or_mixture_quantiles(bayesian: ModuleType) -> None:
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(1, 2, 5, 1, generator=g), torch.rand(1, 2, 5, 1, generator=g) + 0.5
    low, high = bayesian.central_band(Gaussian(mean, std), 256, g)
    assert torch.allclose(low, mean[0] - Z90 * std[0]) and torch.allclose(high, mean[0] + Z90 * std[0])
    # Three identical N(0, 1) components: the quantiles of many draws approach +-1.645.
    same = Gaussian(torch.zeros(3, 2, 50, 1), torch.ones(3, 2, 50, 1))
    low, high = bayesian.central_band(same, 4096, g)
    assert low.shape == (2, 50, 1)
    assert low.mean().item() == pytest.approx(-Z90, abs=0.05) and high.mean().item() == pytest.approx(
        Z90, abs=0.05
    )


@pytest.mark.parametrize("stem", ["cnp_sinusoid", "np_sinusoid", "bmaml_sinusoid", "ensemble_maml_sinusoid"])
def test_measured_coverage_and_figure_on_untrained_learners(
    bayesian: ModuleType, stem: str, tmp_path: Path
) -> None:
    from benchmarks.fewshot import Trained, build, config_path

    overrides = ["eval.episodes=5", "eval.batch=3", "train.device=cpu"]
    if stem == "np_sinusoid":
        overrides += [
            "neural_process.hidden=16",
            "neural_process.latent_dim=8",
            "neural_process.eval_samples=4",
        ]
    learner, run, device = build(config_path(stem), overrides)
    learner.model.eval()
    trained = Trained(learner, None, run, device, tmp_path)
    panels = []
    for k in bayesian.AMBIGUOUS:
        est, panel = bayesian.measure_function_coverage(trained, k, stem)
        assert est.n == 5 and 0.0 <= est.mean <= 1.0
        assert panel.truth.shape == panel.low.shape == (3, bayesian.GRID) and panel.context_x.shape == (3, k)
        assert bool((panel.low <= panel.high).all())
        assert (panel.samples is None) == (stem == "cnp_sinusoid")
        panels.append(panel)
    path = bayesian.ambiguity_figure(panels, tmp_path / "bayesian_ambiguity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
