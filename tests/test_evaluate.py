"""The evaluation protocol: mean and 95% CI by hand, a fixed set of episodes, and evaluation of a MAML learner."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metalab.data.episodes import Episode
from metalab.experiment import run_config_from_dict
from metalab.meta import maml
from metalab.stats import Estimate, mean_ci95
from metalab.train.evaluate import evaluate_episodes


def test_mean_ci95_by_hand() -> None:
    values = [0.2, 0.4, 0.9, 0.5, 0.75, 0.1]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))  # sample std, ddof = 1
    est = mean_ci95(values)
    assert est.n == n
    assert est.mean == pytest.approx(mean, rel=1e-12)
    assert est.ci95 == pytest.approx(1.96 * std / math.sqrt(n), rel=1e-12)


def test_mean_ci95_tensor_input_and_edge_cases() -> None:
    torch.manual_seed(0)
    values = torch.rand(600)
    est = mean_ci95(values)
    assert est.ci95 == pytest.approx(1.96 * float(values.double().std()) / math.sqrt(600), rel=1e-9)
    assert mean_ci95([3.0, 3.0, 3.0]).ci95 == 0.0
    single = mean_ci95([0.7])
    assert single.mean == pytest.approx(0.7) and math.isnan(single.ci95) and single.n == 1
    with pytest.raises(ValueError):
        mean_ci95([])
    assert str(Estimate(0.5, 0.01, 10)) == "0.5000 ± 0.0100 (n=10)"


class RecordingSampler:
    """Episodes whose single support value is the episode number (index * batch + position)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def sample(self, index: int, tasks: int) -> Episode:
        self.calls.append((index, tasks))
        ids = (index * 4 + torch.arange(tasks, dtype=torch.float32)).reshape(tasks, 1, 1)
        return Episode(ids, ids, ids, ids, 1, 1, 1)


def test_evaluate_episodes_uses_exactly_n_fixed_episodes() -> None:
    sampler = RecordingSampler()
    est = evaluate_episodes(lambda ep: ep.support_x.flatten(), sampler, episodes=10, batch=4)
    assert sampler.calls == [(0, 4), (1, 4), (2, 2)]
    assert est.n == 10
    assert est.mean == pytest.approx(4.5)  # episodes 0..9
    assert est.ci95 == pytest.approx(mean_ci95(list(range(10))).ci95)


def test_maml_evaluation_is_fixed_and_leaves_parameters_alone(sinusoid_config, tmp_path: Path) -> None:
    run = run_config_from_dict(sinusoid_config())
    torch.manual_seed(0)
    learner = maml.build(run, tmp_path, torch.device("cpu"))
    before = {k: v.detach().clone() for k, v in learner.model.named_parameters()}
    first = learner.evaluate("test", 12)
    assert set(first) == {"test/mse", "test/mse_ci95"}
    assert first == learner.evaluate("test", 12)  # the same fixed episodes every time
    val = learner.evaluate("val", 12)
    assert set(val) == {"val/mse", "val/mse_ci95"}
    assert val["val/mse"] != first["test/mse"]  # validation tasks are not the test tasks
    for k, v in learner.model.named_parameters():
        assert torch.equal(v, before[k]) and v.grad is None
