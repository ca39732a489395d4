"""Metric few-shot learners: each scoring rule on hand-made episodes with known answers, and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalab.data.episodes import Episode
from metalab.meta import matching, protonet, relation, siamese
from metalab.meta.episodic import accuracy, cross_entropy


def toy_episode(n: int = 3, k: int = 2, q: int = 2, tasks: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, n * k, 1, 28, 28, generator=g)
    qx = torch.rand(tasks, n * q, 1, 28, 28, generator=g)
    sy = torch.arange(n).repeat_interleave(k).expand(tasks, -1)
    qy = torch.arange(n).repeat_interleave(q).expand(tasks, -1)
    return Episode(sx, sy, qx, qy, n, k, q)


def test_prototype_logits_equal_nearest_class_mean() -> None:
    support = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])  # class means (0,1), (10,1)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 1.0], [9.0, 1.0], [4.0, 1.0], [6.0, 1.0]])
    logits = protonet.prototype_logits(support, labels, query, 2)
    expected = -torch.tensor([[1.0, 81.0], [81.0, 1.0], [16.0, 36.0], [36.0, 16.0]])
    torch.testing.assert_close(logits, expected)
    assert logits.argmax(-1).tolist() == [0, 1, 0, 1]


def test_protonet_with_identity_embedding_is_nearest_mean_classifier() -> None:
    ep = toy_episode(n=4, k=3, q=5)
    logits = protonet.episode_logits(nn.Flatten(), ep)  # (T, N*Q, N)
    for t in range(ep.tasks):
        s, q = ep.support_x[t].flatten(1), ep.query_x[t].flatten(1)
        means = torch.stack([s[ep.support_y[t] == c].mean(0) for c in range(ep.n_way)])
        nearest = torch.stack([((x - means) ** 2).sum(-1).argmin() for x in q])
        assert torch.equal(logits[t].argmax(-1), nearest)


def test_matching_attention_with_one_hot_embeddings_picks_matching_support_label() -> None:
    # support embeddings are orthogonal one-hot vectors; each query equals one support vector exactly
    support = torch.eye(4)
    labels = torch.tensor([2, 0, 1, 2])
    query = torch.eye(4)[[3, 1, 2, 0]]
    log_probs = matching.attention_log_probs(query, support, labels, 3)
    assert log_probs.argmax(-1).tolist() == [2, 0, 1, 2]
    # closed form: cosine 1 to its twin and 0 elsewhere, softmax over 4 supports
    p_twin = torch.e / (torch.e + 3)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4))
    torch.testing.assert_close(
        log_probs[1].exp(), torch.tensor([p_twin, (1 - p_twin) / 3, 2 * (1 - p_twin) / 3])
    )
    # a scale s sharpens the same attention: e^s / (e^s + 3) on the twin
    scaled = matching.attention_log_probs(query, support, labels, 3, scale=5.0)
    torch.testing.assert_close(scaled[1, 0].exp(), torch.tensor(math.exp(5) / (math.exp(5) + 3)))


@pytest.mark.parametrize("learn", [False, True])
def test_matching_scale_is_learned_only_when_asked(learn: bool) -> None:
    model = matching.MatchingNet(hidden=8, fce=False, fce_steps=1, scale=10.0, learn_scale=learn)
    torch.testing.assert_close(model.log_scale.exp(), torch.tensor(10.0))
    assert ("log_scale" in dict(model.named_parameters())) == learn
    loss = cross_entropy(matching.episode_log_probs(model, toy_episode()), toy_episode())
    loss.backward()
    assert not learn or model.log_scale.grad.abs() > 0


def test_cross_entropy_of_matching_log_probs_is_their_nll() -> None:
    log_probs = torch.log_softmax(torch.randn(2, 6, 3), -1)
    ep = toy_episode(n=3, k=1, q=2)
    nll = -log_probs.gather(-1, ep.query_y[..., None]).mean()
    torch.testing.assert_close(cross_entropy(log_probs, ep), nll)


def test_relation_scores_shape_and_one_hot_mse() -> None:
    torch.manual_seed(0)
    model = relation.RelationNet(hidden=8, relation_dim=4)
    ep = toy_episode(n=3, k=2, q=2)
    scores = relation.relation_scores(model, ep)
    assert scores.shape == (2, 6, 3)
    loss, same_scores = relation.mse_to_onehot(model, ep)
    expected = ((torch.sigmoid(scores) - F.one_hot(ep.query_y, 3)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(same_scores, scores)


def test_relation_class_feature_is_sum_over_shots() -> None:
    """Duplicating each support image K times (K-shot of one image) scales the class map by K, not by order."""
    torch.manual_seed(0)
    model = relation.RelationNet(hidden=8)
    ep = toy_episode(n=2, k=2, q=1, tasks=1)
    swapped = ep._replace(support_x=ep.support_x[:, [1, 0, 3, 2]])  # reorder shots within each class
    torch.testing.assert_close(relation.relation_scores(model, ep), relation.relation_scores(model, swapped))


def test_siamese_class_score_is_mean_of_pair_logits() -> None:
    torch.manual_seed(0)
    model = siamese.SiameseNet(hidden=8)
    ep = toy_episode(n=3, k=2, q=2)
    pairs = siamese.pair_logits(model, ep)  # (T, Q, S)
    assert pairs.shape == (2, 6, 6)
    scores = siamese.class_scores(pairs, ep)
    torch.testing.assert_close(scores[..., 1], pairs[..., 2:4].mean(-1))
    loss, _ = siamese.verification_loss(model, ep)
    same = (ep.query_y[:, :, None] == ep.support_y[:, None, :]).float()
    by_hand = -(2 * same * F.logsigmoid(pairs) + (1 - same) * F.logsigmoid(-pairs)).mean()
    torch.testing.assert_close(loss, by_hand)


def test_siamese_pairs_are_symmetric_in_embedding_distance() -> None:
    torch.manual_seed(0)
    model = siamese.SiameseNet(hidden=8)
    ep = toy_episode(n=2, k=1, q=1, tasks=1)
    swapped = ep._replace(support_x=ep.query_x, query_x=ep.support_x)
    torch.testing.assert_close(
        siamese.pair_logits(model, ep), siamese.pair_logits(model, swapped).transpose(1, 2)
    )


@pytest.mark.parametrize("fce", [False, True])
def test_matching_fce_changes_output_and_keeps_probabilities(fce: bool) -> None:
    torch.manual_seed(0)
    model = matching.MatchingNet(hidden=8, fce=fce, fce_steps=2)
    ep = toy_episode()
    log_probs = matching.episode_log_probs(model, ep)
    assert log_probs.shape == (2, 6, 3)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 6), atol=1e-5, rtol=0)


SCORERS = {
    "protonet": lambda m, ep: (
        cross_entropy(protonet.episode_logits(m, ep), ep),
        protonet.episode_logits(m, ep),
    ),
    "matching": lambda m, ep: (cross_entropy(matching.episode_log_probs(m, ep), ep), None),
    "relation": relation.mse_to_onehot,
    "siamese": siamese.verification_loss,
}
MODELS = {
    "protonet": lambda: protonet.Conv4(1, 8),
    "matching": lambda: matching.MatchingNet(8, True, 2),
    "relation": lambda: relation.RelationNet(8, 4),
    "siamese": lambda: siamese.SiameseNet(8),
}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_parameter_gets_a_finite_nonzero_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    loss, _ = SCORERS[name](model, toy_episode())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_a_few_adam_steps_fit_a_fixed_episode(name: str) -> None:
    """Training on one episode drives its query accuracy to 1: the loss points the right way."""
    torch.manual_seed(0)
    model = MODELS[name]()
    ep = toy_episode(n=3, k=2, q=2, tasks=1, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, _ = SCORERS[name](model, ep)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first
    if name == "protonet":
        assert accuracy(protonet.episode_logits(model, ep), ep).item() == 1.0
