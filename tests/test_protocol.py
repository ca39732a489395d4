"""The evaluation protocol's rules: selection never reads test data, training evaluates val only, the test
episodes are drawn from a seed no periodic evaluation uses, inductive BatchNorm classifies each query on its own,
and seed aggregates use Student's t."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import metalab.meta.gbml as gbml
from metalab.cli import main
from metalab.config import from_dict
from metalab.errors import ConfigError
from metalab.experiment import load_run_config
from metalab.models import Conv4, set_batchnorm_mode
from metalab.stats import mean_ci95, seed_interval, t_cdf, t_quantile
from metalab.train.evaluate import part_seed
from metalab.train.loop import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("metric", ["test/acc", "test/return", "eval/test_acc", "acc"])
def test_keep_best_refuses_anything_but_val_or_training_metrics(metric: str) -> None:
    with pytest.raises(ConfigError, match="validation or training metric") as info:
        from_dict(TrainConfig, {"keep_best": metric})
    assert info.value.key == "keep_best"
    for allowed in ("val/acc", "train/problems_return"):
        assert from_dict(TrainConfig, {"keep_best": allowed}).keep_best == allowed


def test_keep_best_on_test_is_one_line_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["train", str(REPO / "configs" / "maml_sinusoid.yaml"), "--runs-dir", str(tmp_path)]
    assert main([*args, "--set", "train.keep_best=test/mse"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("metalab: error: config key 'train.keep_best'") and "\n" not in err
    assert not any(tmp_path.iterdir())  # refused before a run directory exists


def test_selecting_on_val_classes_that_are_trained_on_is_refused() -> None:
    config = REPO / "configs" / "protonet_omniglot_5w1s.yaml"
    with pytest.raises(ConfigError, match="trainval trains on") as info:
        load_run_config(config, ["task.train_part=trainval", "train.keep_best=val/acc"])
    assert info.value.key == "train.keep_best"
    assert load_run_config(config, ["train.keep_best=val/acc"]).task.train_part == "train"


def test_part_seeds_differ() -> None:
    for seed in (0, 1, 1_000_003):
        derived = {part_seed(seed, p) for p in ("val", "train")}
        assert part_seed(seed, "test") == seed and seed not in derived and len(derived) == 2
    with pytest.raises(ValueError, match="unknown evaluation part"):
        part_seed(0, "trainval")


def test_training_evaluates_val_only_and_tests_once_on_unseen_episodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole `metalab train` run: every periodic evaluation draws from the val seed, then exactly one test
    evaluation draws from the test seed, which no periodic evaluation used."""
    seen: list[int] = []
    real = gbml.evaluate_episodes

    def spy(per_task, sampler, *args, **kwargs):
        seen.append(sampler.seed)
        return real(per_task, sampler, *args, **kwargs)

    monkeypatch.setattr(gbml, "evaluate_episodes", spy)
    sets = [
        "train.steps=6",
        "train.eval_every=2",
        "train.eval_episodes=4",
        "eval.episodes=4",
        "train.device=cpu",
    ]
    config = str(REPO / "configs" / "maml_sinusoid.yaml")
    assert main(["train", config, "--runs-dir", str(tmp_path), *(f"--set={s}" for s in sets)]) == 0
    run = load_run_config(config)
    val, test = part_seed(run.eval.seed, "val"), part_seed(run.eval.seed, "test")
    assert seen == [val, val, val, test]
    metrics = (next(tmp_path.iterdir()) / "metrics.csv").read_text()
    assert "val/mse" in metrics and "test/" not in metrics  # nothing of the test part is logged in training


def _embedding_of_first_query(
    net: torch.nn.Module, others: torch.Tensor, first: torch.Tensor
) -> torch.Tensor:
    return net(torch.cat([first, others]))[0]


def test_inductive_batchnorm_classifies_each_query_on_its_own() -> None:
    torch.manual_seed(0)
    net = set_batchnorm_mode(Conv4(1, 8), "inductive")
    net.train()
    for _ in range(5):  # gather running statistics
        net(torch.rand(16, 1, 28, 28))
    net.eval()
    query = torch.rand(1, 1, 28, 28)
    a = _embedding_of_first_query(net, torch.rand(9, 1, 28, 28), query)
    b = _embedding_of_first_query(net, 5 * torch.rand(3, 1, 28, 28), query)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    set_batchnorm_mode(
        net, "transductive"
    )  # the same weights and statistics, evaluated with batch statistics
    c = _embedding_of_first_query(net, torch.rand(9, 1, 28, 28), query)
    d = _embedding_of_first_query(net, 5 * torch.rand(3, 1, 28, 28), query)
    assert not torch.allclose(c, d, atol=1e-3)


def test_running_statistics_are_those_of_the_training_batches() -> None:
    torch.manual_seed(0)
    net = set_batchnorm_mode(Conv4(1, 4), "inductive")
    bn = net.features[0][1]
    x = torch.rand(32, 1, 28, 28)
    net.train()
    net(x)
    pre = net.features[0][0](x)  # the first convolution's output, what the first BatchNorm sees
    expected_mean = 0.9 * torch.zeros(4) + 0.1 * pre.mean((0, 2, 3))
    expected_var = 0.9 * torch.ones(4) + 0.1 * pre.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_mean, expected_mean.detach())
    torch.testing.assert_close(bn.running_var, expected_var.detach())
    assert "features.0.1.running_mean" in net.state_dict()
    assert "features.0.1.running_mean" not in Conv4(1, 4).state_dict()  # the MAML family keeps no buffers


def test_t_quantiles_match_closed_forms() -> None:
    p = 0.975
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)  # Cauchy
    # df = 2: F(t) = 1/2 + t / (2 sqrt(t^2 + 2)), so t = (2p - 1) / sqrt(2 p (1 - p)) = 4.3027...
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    # df = 4: F(t) = 1/2 + (3/4) u (1 - u^2/3), u = t / sqrt(t^2 + 4)
    t4 = t_quantile(p, 4)
    u = t4 / math.sqrt(t4 * t4 + 4)
    assert 0.5 + 0.75 * u * (1 - u * u / 3) == pytest.approx(p, abs=1e-10)
    assert t_quantile(p, 1000) == pytest.approx(1.962339, abs=1e-5)  # tables: 1.962339
    assert t_cdf(0.0, 3) == 0.5 and t_cdf(-2.0, 5) == pytest.approx(1 - t_cdf(2.0, 5), abs=1e-12)


def test_seed_interval_at_three_seeds_is_the_t_interval() -> None:
    values = [0.430, 0.433, 0.447]  # RL2 9x9 over 3 seeds
    agg = seed_interval(values)
    s = math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # closed form at df = 2
    assert agg.n == 3 and agg.per_seed == values
    assert agg.mean == pytest.approx(sum(values) / 3)
    assert agg.ci95 == pytest.approx(t2 * s / math.sqrt(3), rel=1e-9)
    assert agg.ci95 == pytest.approx(0.0225, abs=5e-5)  # not the 0.010 a normal interval gives
    assert agg.ci95 > 2 * mean_ci95(values).ci95
    assert math.isnan(seed_interval([0.5]).ci95)
