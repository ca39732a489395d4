"""Calibration of classifiers' predictive probabilities: expected calibration error, predictive log-likelihood,
and the reliability diagram.

- Expected calibration error (ECE; Naeini, Cooper & Hauskrecht, "Obtaining Well Calibrated Probabilities Using
  Bayesian Binning", AAAI 2015; in the form of Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural
  Networks", ICML 2017, Sec. 2): each of ``M`` predictions has a confidence, its top class's probability, and is
  correct or not. The predictions fall into ``B`` equal-width confidence bins ``((b-1)/B, b/B]``, and
  ``ECE = sum_b |B_b| / M * |acc(B_b) - conf(B_b)|``, with ``acc`` the fraction correct in the bin and ``conf``
  its mean confidence. 0 for a calibrated classifier (given the binning); at most 1.
- Predictive log-likelihood: the mean ``log p(y | x)`` of the true labels under the softmax of the logits, in
  nats (the negative of the cross-entropy); a proper scoring rule, unlike ECE (Gneiting & Raftery, JASA 2007).
- Reliability diagram (DeGroot & Fienberg, "The Comparison and Evaluation of Forecasters", 1983; drawn as in
  Niculescu-Mizil & Caruana, ICML 2005, and Guo et al., Fig. 1): each bin's accuracy as a bar at its
  confidence interval, against the diagonal of perfect calibration, with the bin counts beneath.

Pure functions of tensors, and :class:`PooledQueries`, through which the classification evaluations (the
episodic loop, :mod:`metalab.meta.episodic`, and the gradient-based learners, :mod:`metalab.meta.gbml`) report
``<part>/nll`` and ``<part>/ece`` beside ``<part>/acc``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

ECE_BINS = 15
"""Bins of the ECE by default: Guo et al.'s choice."""


class Calibration(NamedTuple):
    """The ECE and its bins: mean confidence, accuracy (NaN for an empty bin) and count, each ``(B,)``."""

    ece: float
    confidence: torch.Tensor
    accuracy: torch.Tensor
    counts: torch.Tensor


def top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(..., C), (...) -> (M,), (M,)``: each prediction's confidence (its largest probability) and whether
    that class (the first, in a tie) is the label, flattened over the leading dimensions."""
    confidence, predicted = probs.reshape(-1, probs.shape[-1]).max(-1)
    return confidence, predicted == labels.reshape(-1)


def binned_calibration(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> Calibration:
    """ECE and reliability bins of ``M`` predictions given their ``confidence`` in [0, 1] and ``correct``
    (bools), in ``bins`` equal-width bins ``((b-1)/B, b/B]`` (a confidence of 0 goes to the first bin).
    Computed in float64."""
    if bins < 1:
        raise ValueError(f"need at least one bin, got {bins}")
    if confidence.numel() == 0 or confidence.shape != correct.shape:
        raise ValueError(
            f"need as many confidences as correctness flags, at least one: {confidence.shape}, {correct.shape}"
        )
    conf = confidence.detach().double().flatten().cpu()
    hit = correct.detach().double().flatten().cpu()
    index = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()  # right-closed bins
    counts = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hit)
    # |B_b| / M * |acc_b - conf_b| = |hits_b - conf_sum_b| / M: no division by an empty bin's count.
    ece = ((hit_sum - conf_sum).abs().sum() / conf.numel()).item()
    filled = counts.where(counts > 0, torch.full_like(counts, float("nan")))
    return Calibration(ece, conf_sum / filled, hit_sum / filled, counts.long())


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> Calibration:
    """ECE (Naeini et al. 2015; Guo et al. 2017) of class probabilities ``probs`` ``(M, C)`` (or ``(..., C)``)
    for the true ``labels`` ``(M,)`` (or ``(...)``), with the per-bin confidence, accuracy and count."""
    return binned_calibration(*top_label(probs, labels), bins)


def log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(y | x)`` of each true label under ``softmax(logits)``: ``(..., C), (...) -> (...)`` (nats)."""
    return F.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)


def predictive_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ``log p(y | x)`` over all predictions (nats): minus the mean cross-entropy of ``logits``
    ``(..., C)`` against ``labels`` ``(...)``."""
    return log_likelihoods(logits, labels).double().mean().item()


ECE_RESAMPLES = 2000
"""Bootstrap resamples of the episodes behind the ECE's interval."""


def bin_gaps(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """``(T, Q), (T, Q) -> (T, B)``: per episode (row) and confidence bin, the number of correct predictions
    minus the sum of their confidences, in float64. Summed over episodes and divided by the number of
    predictions, its absolute value summed over bins is the pooled ECE (as in :func:`binned_calibration`)."""
    conf = confidence.detach().double().cpu()
    index = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    gaps = correct.detach().double().cpu() - conf
    return torch.zeros(conf.shape[0], bins, dtype=torch.float64).scatter_add_(1, index, gaps)


def bootstrap_ece(
    gaps: torch.Tensor, queries: torch.Tensor, resamples: int = ECE_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval ``(low, high)`` of the pooled ECE over episodes: ``gaps`` ``(T, B)``
    from :func:`bin_gaps` and the episodes' numbers of queries ``queries`` ``(T,)``. Each resample draws ``T``
    episodes with replacement (the episode, not the query, is the independent unit: queries of one episode
    share its classes and support set) and pools their queries. Deterministic for a ``seed``; the global random
    state is untouched. The interval is not symmetric about the ECE, which is biased upwards in small samples;
    its endpoints are reported as they are."""
    episodes = gaps.shape[0]
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(episodes, (resamples, episodes), generator=g)
    weights = torch.zeros(resamples, episodes, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, episodes, dtype=torch.float64)
    )
    ece = (weights @ gaps).abs().sum(-1) / (weights @ queries.double())
    low, high = torch.quantile(ece, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


class PooledQueries:
    """One classification evaluation over many episodes: :meth:`columns` gives each task's accuracy and mean NLL
    (the columns of :func:`~metalab.train.evaluate.evaluate_episode_columns`) and keeps every query's confidence
    and correctness by episode, so that :meth:`metrics` reports the ECE over all the queries pooled (ECE is a
    property of a set of predictions: one episode's few dozen queries in 15 bins would bias it upwards) with a
    bootstrap interval over the episodes (:func:`bootstrap_ece`)."""

    def __init__(self) -> None:
        self.confidence: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.gaps: list[torch.Tensor] = []
        self.queries: list[torch.Tensor] = []

    def columns(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(T, Q, C), (T, Q) -> (T, 2)``: each task's query accuracy and mean NLL (nats), reading the logits'
        softmax as the predictive."""
        confidence, correct = top_label(logits.softmax(-1), labels)
        self.confidence.append(confidence.cpu())
        self.correct.append(correct.cpu())
        tasks = labels.shape[0]
        self.gaps.append(bin_gaps(confidence.reshape(tasks, -1), correct.reshape(tasks, -1)))
        self.queries.append(torch.full((tasks,), confidence.numel() // tasks, dtype=torch.float64))
        accuracy = (logits.argmax(-1) == labels).float().mean(-1)
        return torch.stack([accuracy, -log_likelihoods(logits, labels).mean(-1)], -1)

    def metrics(self, part: str, accuracy: Any, nll: Any) -> dict[str, float]:
        """``<part>/acc`` and ``<part>/nll`` (means and 95% CIs of the estimates ``accuracy`` and ``nll``, made
        from :meth:`columns`), ``<part>/ece`` of every query seen, and ``<part>/ece_low`` and ``<part>/ece_high``,
        its 95% bootstrap interval over the episodes."""
        low, high = bootstrap_ece(torch.cat(self.gaps), torch.cat(self.queries))
        return {
            f"{part}/acc": accuracy.mean,
            f"{part}/acc_ci95": accuracy.ci95,
            f"{part}/nll": nll.mean,
            f"{part}/nll_ci95": nll.ci95,
            f"{part}/ece": binned_calibration(torch.cat(self.confidence), torch.cat(self.correct)).ece,
            f"{part}/ece_low": low,
            f"{part}/ece_high": high,
        }


def reliability_diagram(calibration: Calibration, path: Path, title: str) -> Path:
    """Draw a reliability diagram to ``path`` (PNG): accuracy per confidence bin as bars against the diagonal
    (gaps to it shaded), the ECE in the legend, and the number of predictions per bin in a panel beneath."""
    bins = calibration.counts.numel()
    edges = torch.linspace(0, 1, bins + 1)
    left, width = edges[:-1].numpy(), 1 / bins
    filled = (calibration.counts > 0).numpy()
    acc, conf = calibration.accuracy.numpy(), calibration.confidence.numpy()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(left[filled], acc[filled], width=width, align="edge", edgecolor="black", label="accuracy")
    gap_low = [min(a, c) for a, c in zip(acc[filled], conf[filled], strict=True)]
    gap = abs(acc[filled] - conf[filled])
    top.bar(left[filled], gap, bottom=gap_low, width=width, align="edge", color="tab:red", alpha=0.3,
            label="gap to mean confidence")  # fmt: skip
    top.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.legend(fontsize=7, loc="upper left", title=f"ECE = {calibration.ece:.4f}", title_fontsize=8)
    counts = calibration.counts.numpy()
    bottom.bar(left, counts, width=width, align="edge", color="tab:gray", edgecolor="black")
    for x, n in zip(left[filled], counts[filled], strict=True):
        bottom.text(x + width / 2, n, str(int(n)), ha="center", va="bottom", fontsize=6)
    bottom.set(xlabel="confidence (top-class probability)", ylabel="count")
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
