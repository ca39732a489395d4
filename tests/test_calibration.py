"""Calibration metrics (metalab.calibration): ECE against hand-computed and closed-form cases, its bounds and
order invariance, the log-likelihood against cross-entropy, the reliability diagram file, and the episodic
evaluation's ``ece`` / ``nll`` equal to these functions on the same logits."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch import nn

from metalab import calibration
from metalab.calibration import expected_calibration_error, predictive_log_likelihood
from metalab.data.episodes import Episode
from metalab.experiment import load_run_config
from metalab.meta import episodic, gbml


def probs_with_confidence(confidence: list[float], correct: list[bool], classes: int = 3) -> tuple:
    """Rows of ``classes`` probabilities whose largest is ``confidence`` (class 0; the rest share what is left
    equally), and labels 0 where ``correct`` else 1."""
    rows = [[c] + [(1 - c) / (classes - 1)] * (classes - 1) for c in confidence]
    return torch.tensor(rows, dtype=torch.float64), torch.tensor([0 if ok else 1 for ok in correct])


def test_ece_matches_a_hand_computed_example() -> None:
    # 3 bins (0, 1/3], (1/3, 2/3], (2/3, 1]. Bin 3: confidences 0.9, 0.8, 0.7, 2 of 3 right: |2/3 - 0.8| = 2/15.
    # Bin 2: 0.6 right, 0.5 wrong: |1/2 - 0.55| = 0.05. ECE = 3/5 * 2/15 + 2/5 * 0.05 = 0.08 + 0.02 = 0.1.
    probs, labels = probs_with_confidence([0.9, 0.8, 0.7, 0.6, 0.5], [True, False, True, True, False])
    cal = expected_calibration_error(probs, labels, bins=3)
    assert cal.ece == pytest.approx(0.1, abs=1e-12)
    assert cal.counts.tolist() == [0, 2, 3]
    assert math.isnan(cal.accuracy[0]) and math.isnan(cal.confidence[0])
    assert cal.accuracy[1:].tolist() == pytest.approx([0.5, 2 / 3])
    assert cal.confidence[1:].tolist() == pytest.approx([0.55, 0.8])


def test_ece_is_zero_when_each_bin_is_right_as_often_as_it_is_confident() -> None:
    # 10 predictions at 0.7 of which 7 right, 10 at 0.9 of which 9 right: calibrated bin by bin.
    confidence = [0.7] * 10 + [0.9] * 10
    correct = [True] * 7 + [False] * 3 + [True] * 9 + [False]
    probs, labels = probs_with_confidence(confidence, correct)
    cal = expected_calibration_error(probs, labels)  # 15 bins
    assert cal.ece == pytest.approx(0.0, abs=1e-12)
    assert int(cal.counts.sum()) == 20 and int((cal.counts > 0).sum()) == 2


def test_ece_of_one_bin_is_the_gap_between_accuracy_and_mean_confidence() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 5, generator=g), -1)
    labels = torch.randint(5, (200,), generator=g)
    accuracy = (probs.argmax(-1) == labels).double().mean().item()
    confidence = probs.max(-1).values.double().mean().item()
    assert expected_calibration_error(probs, labels, bins=1).ece == pytest.approx(abs(accuracy - confidence))


@pytest.mark.parametrize("seed", range(5))
def test_ece_is_in_unit_interval_and_invariant_to_sample_order(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(4 * torch.randn(300, 4, generator=g), -1)
    labels = torch.randint(4, (300,), generator=g)
    cal = expected_calibration_error(probs, labels)
    assert 0.0 <= cal.ece <= 1.0
    order = torch.randperm(300, generator=g)
    shuffled = expected_calibration_error(probs[order], labels[order])
    assert shuffled.ece == pytest.approx(cal.ece, abs=1e-12)
    assert torch.equal(shuffled.counts, cal.counts)


def test_ece_reaches_one_when_certain_and_always_wrong() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([1, 0])).ece == pytest.approx(1.0)


def random_episodes(episodes: int, queries: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidences ``(T, Q)`` and correctness of an overconfident classifier: right with probability 0.8
    times its confidence."""
    g = torch.Generator().manual_seed(seed)
    confidence = 0.3 + 0.7 * torch.rand(episodes, queries, generator=g, dtype=torch.float64)
    correct = torch.rand(episodes, queries, generator=g, dtype=torch.float64) < 0.8 * confidence
    return confidence, correct


def test_bin_gaps_pool_to_the_ece() -> None:
    confidence, correct = random_episodes(50)
    gaps = calibration.bin_gaps(confidence, correct)
    pooled = calibration.binned_calibration(confidence.flatten(), correct.flatten()).ece
    assert gaps.shape == (50, calibration.ECE_BINS)
    assert (gaps.sum(0).abs().sum() / confidence.numel()).item() == pytest.approx(pooled, abs=1e-12)


def test_bootstrap_interval_of_identical_episodes_is_the_ece_itself() -> None:
    confidence, correct = random_episodes(1)
    gaps = calibration.bin_gaps(confidence.expand(30, -1), correct.expand(30, -1))
    low, high = calibration.bootstrap_ece(gaps, torch.full((30,), 20.0))
    ece = calibration.binned_calibration(confidence.flatten(), correct.flatten()).ece
    assert low == pytest.approx(ece, abs=1e-12) and high == pytest.approx(ece, abs=1e-12)


def test_bootstrap_interval_covers_the_ece_narrows_with_episodes_and_is_deterministic() -> None:
    widths = []
    for episodes in (100, 1600):
        confidence, correct = random_episodes(episodes)
        gaps, queries = calibration.bin_gaps(confidence, correct), torch.full((episodes,), 20.0)
        low, high = calibration.bootstrap_ece(gaps, queries)
        ece = calibration.binned_calibration(confidence.flatten(), correct.flatten()).ece
        assert low < ece < high
        assert calibration.bootstrap_ece(gaps, queries) == (low, high)  # same seed, same interval
        assert calibration.bootstrap_ece(gaps, queries, seed=1) != (low, high)
        widths.append(high - low)
    assert 0.15 < widths[1] / widths[0] < 0.4, widths  # 16 times the episodes: about a quarter the width


def test_predictive_log_likelihood_is_minus_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(4, 30, 5, generator=g)  # (T, N*Q, N)
    labels = torch.randint(5, (4, 30), generator=g)
    expected = -F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert predictive_log_likelihood(logits, labels) == pytest.approx(expected, rel=1e-6)
    assert calibration.log_likelihoods(logits, labels).shape == (4, 30)


def test_reliability_diagram_writes_a_png(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(2 * torch.randn(500, 5, generator=g), -1)
    cal = expected_calibration_error(probs, torch.randint(5, (500,), generator=g))
    path = calibration.reliability_diagram(cal, tmp_path / "figs" / "reliability.png", "random logits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


class ToySampler:
    """Fixed episodes of random 4x4 "images": batch ``index`` is always the same tasks."""

    def __init__(self, n: int = 3, k: int = 1, q: int = 4):
        self.n, self.k, self.q = n, k, q

    def sample(self, index: int, tasks: int) -> Episode:
        g = torch.Generator().manual_seed(index)
        sx = torch.rand(tasks, self.n * self.k, 1, 4, 4, generator=g)
        qx = torch.rand(tasks, self.n * self.q, 1, 4, 4, generator=g)
        sy = torch.arange(self.n).repeat_interleave(self.k).expand(tasks, -1)
        qy = torch.arange(self.n).repeat_interleave(self.q).expand(tasks, -1)
        return Episode(sx, sy, qx, qy, self.n, self.k, self.q)


def test_episodic_evaluation_reports_ece_and_nll_of_its_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = ToySampler()
    monkeypatch.setattr(episodic, "make_sampler", lambda *args: sampler)
    monkeypatch.setattr(episodic, "EvalSamplers", lambda *args: {"val": sampler, "test": sampler})
    run = load_run_config(
        REPO / "configs" / "protonet_omniglot_5w1s.yaml",
        ["eval.batch=3", "train.device=cpu", "train.autocast=none"],
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def scores(ep: Episode) -> torch.Tensor:
        return 4 * model(ep.query_x.flatten(0, 1)).unflatten(0, ep.query_x.shape[:2])  # (T, N*Q, N)

    learner = episodic.build_episodic(run, REPO, torch.device("cpu"), model, scores)
    metrics = learner.evaluate("test", 7)
    assert set(metrics) == {
        "test/acc",
        "test/acc_ci95",
        "test/nll",
        "test/nll_ci95",
        "test/ece",
        "test/ece_low",
        "test/ece_high",
    }

    with torch.no_grad():  # the same 7 episodes, in the evaluation's batches of 3
        logits = torch.cat([scores(sampler.sample(i, t)) for i, t in enumerate([3, 3, 1])])
    labels = torch.cat([sampler.sample(i, t).query_y for i, t in enumerate([3, 3, 1])])
    assert metrics["test/nll"] == pytest.approx(-predictive_log_likelihood(logits, labels), rel=1e-6)
    assert metrics["test/ece"] == pytest.approx(expected_calibration_error(logits.softmax(-1), labels).ece)
    assert metrics["test/acc"] == pytest.approx((logits.argmax(-1) == labels).double().mean().item())
    assert 0 < metrics["test/ece"] < 1 and metrics["test/nll_ci95"] > 0
    assert metrics["test/ece_low"] < metrics["test/ece"] < metrics["test/ece_high"]


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_gradient_based_evaluation_reports_ece_and_nll_of_its_adapted_logits(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """MAML-family evaluation (gbml.build_learner): accuracy, NLL and pooled ECE of the logits after adaptation,
    equal to those computed by hand from the same adapted logits, however the tasks are batched."""
    sampler = ToySampler()
    monkeypatch.setattr(gbml, "make_sampler", lambda *args: sampler)
    monkeypatch.setattr(gbml, "EvalSamplers", lambda *args: {"val": sampler, "test": sampler})
    run = load_run_config(REPO / "configs" / "maml_omniglot_5w1s.yaml", ["eval.batch=3", "train.device=cpu"])
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    w = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))

    def predict(inner: gbml.Inner, meta: dict, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor):
        # one "adaptation": the support mean shifts the logits, so the output depends on the support set
        return 4 * (qx.flatten(-3) - sx.flatten(-3).mean(0)) @ meta["w"]

    inner = gbml.Inner(model, False, 0.1, 1, True)
    learner = gbml.build_learner(
        run,
        REPO,
        torch.device("cpu"),
        model=model,
        meta=lambda: {"w": w},
        train_loss=lambda step, ep: (torch.zeros(()), {}),
        predict=predict,
        inner=inner,
        batching=gbml.TaskBatching(mode),
    )
    metrics = learner.evaluate("test", 7)
    assert set(metrics) == {
        "test/acc",
        "test/acc_ci95",
        "test/nll",
        "test/nll_ci95",
        "test/ece",
        "test/ece_low",
        "test/ece_high",
    }

    episodes = [sampler.sample(i, t) for i, t in enumerate([3, 3, 1])]  # the evaluation's batches of 3
    logits = torch.cat(
        [torch.stack([predict(inner, {"w": w}, *ep.task(j)[:3]) for j in range(ep.tasks)]) for ep in episodes]
    )
    labels = torch.cat([ep.query_y for ep in episodes])
    assert metrics["test/nll"] == pytest.approx(-predictive_log_likelihood(logits, labels), rel=1e-5)
    assert metrics["test/ece"] == pytest.approx(expected_calibration_error(logits.softmax(-1), labels).ece)
    assert metrics["test/acc"] == pytest.approx((logits.argmax(-1) == labels).double().mean().item())
    assert 0 < metrics["test/ece"] < 1 and metrics["test/nll_ci95"] > 0
    assert metrics["test/ece_low"] < metrics["test/ece"] < metrics["test/ece_high"]
