"""Infinite Mixture Prototypes (Allen et al., ICML 2019) and the alphabet-level Omniglot task: IMP is ProtoNet
with one cluster per class, clusters open on separated sub-clusters, gradients, the threshold's closed form,
the alphabet sampler's guarantees, and config errors naming their key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metalab.data import omniglot, omniglot_install, tasks
from metalab.data.alphabet import AlphabetSampler, alphabet_classes
from metalab.data.episodes import Episode, EpisodeSampler
from metalab.data.omniglot import ClassSplit
from metalab.data.tasks import TaskConfig
from metalab.errors import ConfigError
from metalab.experiment import algorithm, run_config_from_dict
from metalab.meta import episodic, imp, protonet
from metalab.meta.episodic import cross_entropy
from metalab.train.evaluate import PARTS
from metalab.train.loop import fit
from metalab.utils import seed_everything

SIZE = 16  # the smallest image side Conv-4 takes: a 1x1 final map, so the embedding is `hidden`-d
HIDDEN = 8


def labels(n: int, k: int) -> torch.Tensor:
    return torch.arange(n).repeat_interleave(k)


# ------------------------------------------------------------------------------------------ IMP on embeddings


@pytest.mark.parametrize("readout", ["nearest", "mixture"])
def test_one_cluster_per_class_gives_protonet_logits(readout: str) -> None:
    """With a threshold no point exceeds, every class keeps its prototype alone: the logits are ProtoNet's,
    bit for bit, whatever the readout."""
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(4 * 3, 5, generator=g), torch.randn(7, 5, generator=g)
    y = labels(4, 3)
    sigma = torch.tensor(0.7)
    clusters = imp.infer_clusters(support, y, 4, sigma, math.inf, iterations=3)
    assert clusters.counts(4).tolist() == [1, 1, 1, 1]
    expected = protonet.prototype_logits(support, y, query, 4)
    assert torch.equal(imp.class_scores(query, clusters, 4, readout), expected)  # type: ignore[arg-type]


def test_one_shot_is_protonet_at_any_threshold() -> None:
    """One shot: a class's point is its prototype (distance 0), so no cluster opens even at lambda = 0."""
    g = torch.Generator().manual_seed(1)
    support, query = torch.randn(5, 6, generator=g), torch.randn(10, 6, generator=g)
    y = labels(5, 1)
    assert imp.infer_clusters(support, y, 5, torch.tensor(1.0), 0.0, 3).counts(5).tolist() == [1] * 5
    got = imp.imp_logits(support, y, query, 5, sigma=torch.tensor(1.0), alpha=1e6, iterations=3)  # lambda < 0
    assert torch.equal(got, protonet.prototype_logits(support, y, query, 5))


def test_threshold_closed_form() -> None:
    """lambda = -2 sigma log(alpha) + D sigma log(1 + rho / sigma); rho = mean over dimensions of the
    prototypes' population variance: dims (0, 2) and (0, 4) have variances 1 and 4, rho = 2.5."""
    prototypes = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    lam = imp.threshold(prototypes, sigma=0.5, alpha=0.1)
    assert lam == pytest.approx(-2 * 0.5 * math.log(0.1) + 2 * 0.5 * math.log(1 + 2.5 / 0.5))
    assert lam == pytest.approx(math.log(60.0))
    # more concentration opens clusters more readily: a lower threshold
    assert imp.threshold(prototypes, 0.5, 1.0) < lam


def modes_toy(
    modes: int, per_mode: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class 0: ``modes`` tight sub-clusters at (-4, 0), (4, 0), (0, 8), none at their mean; class 1: one tight
    cluster at (6.5, 3).
    Support points interleave the modes (support order matters to the sequential opening). Returns
    (support, support labels, mode centres of class 0)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 8.0]])[:modes]
    class0 = centres.repeat(per_mode, 1) + 0.05 * torch.randn(modes * per_mode, 2, generator=g)
    class1 = torch.tensor([6.5, 3.0]) + 0.05 * torch.randn(4, 2, generator=g)
    support = torch.cat([class0, class1])
    return support, torch.cat([torch.zeros(len(class0)), torch.ones(4)]).long(), centres


@pytest.mark.parametrize("modes", [1, 2, 3])
def test_clusters_open_on_separated_sub_clusters(modes: int) -> None:
    """Each well-separated mode of class 0 opens exactly one cluster (the mode's later points are within lambda
    of its first), beside the class's initial prototype; a single mode and the compact class open none."""
    support, y, centres = modes_toy(modes)
    for iterations in (1, 3):  # a second pass opens nothing more
        clusters = imp.infer_clusters(support, y, 2, torch.tensor(1.0), lam=1.0, iterations=iterations)
        assert clusters.counts(2).tolist() == [1 if modes == 1 else modes + 1, 1]
    for centre in centres:  # each mode has a cluster of class 0 at it
        near = (clusters.means[clusters.labels == 0] - centre).norm(dim=1).min()
        assert near < 0.1
    huge = imp.infer_clusters(support, y, 2, torch.tensor(1.0), lam=1e6, iterations=3)
    assert huge.counts(2).tolist() == [1, 1]


def test_nearest_cluster_classifies_what_one_prototype_cannot() -> None:
    """Queries at class 0's mode x = 4 lie nearer class 1's prototype (6.5, 3) than class 0's mean (0, 0): ProtoNet
    gets them wrong, IMP's nearest cluster of class 0 gets every query right."""
    support, y, centres = modes_toy(2)
    g = torch.Generator().manual_seed(5)
    query = torch.cat([centres, torch.tensor([[6.5, 3.0]])]).repeat_interleave(5, 0)
    query = query + 0.05 * torch.randn(len(query), 2, generator=g)
    query_y = torch.tensor([0, 0, 1]).repeat_interleave(5)
    ours = imp.imp_logits(support, y, query, 2, sigma=torch.tensor(1.0), alpha=0.1, iterations=3)
    theirs = protonet.prototype_logits(support, y, query, 2)
    assert (ours.argmax(1) == query_y).all()
    assert (theirs.argmax(1) == query_y).float().mean() == pytest.approx(10 / 15)  # the x = 4 mode is lost


def test_open_clusters_follows_support_order() -> None:
    """The first point of a far mode (in support order) opens its cluster; the later ones join it."""
    support = torch.tensor([[0.0], [0.1], [10.0], [10.1], [9.9]])
    y = torch.zeros(5, dtype=torch.long)
    start = imp.Clusters(support.mean(0, keepdim=True), torch.zeros(1, dtype=torch.long))
    assert imp.open_clusters(support, y, start, lam=4.0).tolist() == [0, 2]
    reordered = support[[4, 3, 2, 1, 0]]
    assert imp.open_clusters(reordered, y, start, lam=4.0).tolist() == [0, 3]


def test_gradients_reach_embeddings_and_sigma() -> None:
    support, y, centres = modes_toy(2)
    support = support.clone().requires_grad_(True)
    query = centres.repeat_interleave(2, 0).clone().requires_grad_(True)
    log_sigma = torch.tensor(math.log(1.5), requires_grad=True)
    logits = imp.imp_logits(support, y, query, 2, sigma=log_sigma.exp(), alpha=0.1, iterations=2)
    lam = imp.threshold(protonet.class_means(support, y, 2), 1.5, 0.1)
    assert lam < 16  # the modes at x = -4 and 4 are 16 from class 0's mean: each opens a cluster
    assert imp.infer_clusters(support, y, 2, log_sigma.exp(), lam, 2).counts(2).tolist() == [3, 1]
    # labelled class 1, so the loss is far from saturated (class 0's clusters sit on these queries)
    F.cross_entropy(logits, torch.ones(4, dtype=torch.long)).backward()
    for name, grad in (("support", support.grad), ("query", query.grad), ("log_sigma", log_sigma.grad)):
        assert grad is not None and torch.isfinite(grad).all(), name
    assert (support.grad.norm(dim=1) > 0).all()  # every support point, through its class's cluster means
    assert (query.grad.norm(dim=1) > 0).all()
    assert log_sigma.grad != 0  # through the soft assignments


def test_gradients_match_finite_differences() -> None:
    """The whole clustering is differentiable where the hard decisions do not flip: gradcheck in float64."""
    support, y, centres = modes_toy(2)
    query = centres + 0.3

    def logits(s: torch.Tensor, q: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        return imp.imp_logits(s, y, q, 2, sigma=log_sigma.exp(), alpha=0.1, iterations=2)

    log_sigma = torch.tensor(math.log(2.0), dtype=torch.float64, requires_grad=True)
    lam = imp.threshold(protonet.class_means(support, y, 2), 2.0, 0.1)
    assert imp.infer_clusters(support, y, 2, log_sigma.exp(), lam, 2).counts(2).tolist() == [3, 1]
    inputs = (support.double().requires_grad_(True), query.double().requires_grad_(True), log_sigma)
    assert torch.autograd.gradcheck(logits, inputs, eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------- the model


def toy_episode(n: int = 3, k: int = 3, q: int = 2, tasks: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, n * k, 1, SIZE, SIZE, generator=g)
    qx = torch.rand(tasks, n * q, 1, SIZE, SIZE, generator=g)
    return Episode(sx, labels(n, k).expand(tasks, -1), qx, labels(n, q).expand(tasks, -1), n, k, q)


def tiny_model(**changes: object) -> imp.IMP:
    torch.manual_seed(0)
    return imp.IMP(imp.Config(**{"hidden": HIDDEN, **changes}), image_size=SIZE)  # type: ignore[arg-type]


def test_one_shot_model_equals_protonet_on_the_same_encoder() -> None:
    model = tiny_model().eval()
    ep = toy_episode(k=1)
    got = imp.episode_logits(model, ep)
    assert got.shape == (2, 6, 3)
    assert torch.equal(got, protonet.episode_logits(model.encoder, ep))


def test_model_gradients_reach_the_encoder() -> None:
    model = tiny_model(alpha=50.0)  # a low threshold, so that clusters open on random images
    model.train()
    ep = toy_episode(k=4)
    cross_entropy(imp.episode_logits(model, ep), ep).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("encoder"):
            assert p.grad.abs().sum() > 0, name


def test_fixed_sigma_is_a_buffer() -> None:
    assert "log_sigma" in dict(tiny_model().named_parameters())
    fixed = tiny_model(learn_sigma=False, sigma=2.0)
    assert "log_sigma" not in dict(fixed.named_parameters())
    assert fixed.state_dict()["log_sigma"].exp().item() == pytest.approx(2.0)


def run_spec(**imp_section: object) -> dict:
    return {
        "algo": "imp",
        "seed": 3,
        "task": {"dataset": "omniglot", "ways": 3, "shots": 2, "queries": 2, "image_size": SIZE},
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
        "eval": {"episodes": 4, "batch": 2},
        "imp": {"hidden": HIDDEN, **imp_section},
    }


@pytest.fixture
def synthetic_omniglot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``build`` draws its episodes from random 16x16 "characters" instead of Omniglot."""
    pool = torch.randint(0, 256, (10, 6, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    pool = pool.to(torch.uint8)

    def sampler(cfg: TaskConfig, part: str, seed: int, root: Path) -> EpisodeSampler:
        return EpisodeSampler(pool, cfg.ways, cfg.shots, cfg.queries, seed)

    def eval_samplers(cfg: TaskConfig, seed: int, root: Path) -> dict[str, EpisodeSampler]:
        return {
            part: EpisodeSampler(pool, cfg.ways, cfg.shots, cfg.queries, seed + i)
            for i, part in enumerate(PARTS)
        }

    monkeypatch.setattr(episodic, "make_sampler", sampler)
    monkeypatch.setattr(episodic, "EvalSamplers", eval_samplers)


@pytest.mark.usefixtures("synthetic_omniglot")
def test_build_trains_sigma_and_evaluates(tmp_path: Path) -> None:
    run = run_config_from_dict(run_spec(alpha=50.0))
    seed_everything(run.seed)
    learner = imp.build(run, tmp_path, torch.device("cpu"))
    before = learner.model.log_sigma.item()
    result = fit(learner, run.train, tmp_path / "run")
    assert result.step == 4
    assert learner.model.log_sigma.item() != before  # the clusters' variance is learned
    metrics = learner.evaluate("test", 4)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and math.isfinite(metrics["test/nll"])


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"alpha": 0.0}, "imp.alpha"),
        ({"sigma": 0.0}, "imp.sigma"),
        ({"iterations": 0}, "imp.iterations"),
        ({"readout": "sum"}, "imp.readout"),
        ({"batchnorm": "episode"}, "imp.batchnorm"),
        ({"hidden": 0}, "imp.hidden"),
        ({"lamda": 1.0}, "imp.lamda"),
    ],
)
def test_config_errors_name_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        run_config_from_dict(run_spec(**section))
    assert err.value.key == key and f"'{key}'" in str(err.value)


def test_registered_as_imp() -> None:
    assert algorithm("imp") is imp


# ------------------------------------------------------------------------------------ alphabet-level episodes

# Alphabet a has 6 + 2a characters in rotation rot000, and 4 in rot090 (too few for K + Q = 5 below).
ALPHABETS = {(a, "rot000"): 6 + 2 * a for a in range(4)} | {(0, "rot090"): 4}


def synthetic_split() -> ClassSplit:
    """Characters ``A<a>/characterNN/rotDDD`` whose every image stores its character index at pixel (0, 0) and
    its drawing at pixel (0, 1), so an episode tells which drawing of which character each example is."""
    names = [f"A{a}/character{c:02d}/{rot}" for (a, rot), n in ALPHABETS.items() for c in range(n)]
    images = torch.zeros(len(names), 20, 1, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(len(names), dtype=torch.uint8)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(20, dtype=torch.uint8)
    return ClassSplit(images, names)


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(character, drawing) of each image of ``(..., 1, 4, 4)`` floats in [0, 1]."""
    pixels = (x[..., 0, 0, :2] * 255).round().long()
    return pixels[..., 0], pixels[..., 1]


def test_alphabet_classes_group_by_alphabet_and_rotation() -> None:
    split = synthetic_split()
    grouped = alphabet_classes(split)
    assert grouped.alphabets == ["A0/rot000", "A0/rot090", "A1/rot000", "A2/rot000", "A3/rot000"]
    assert grouped.counts.tolist() == [6, 4, 8, 10, 12]
    for row, name in enumerate(grouped.alphabets):
        chars = grouped.members[row, : grouped.counts[row]]
        assert all(split.classes[i].split("/")[0::2] == name.split("/") for i in chars.tolist())
        assert (grouped.members[row, grouped.counts[row] :] == -1).all()
    assert alphabet_classes(split, min_characters=5).alphabets == [f"A{a}/rot000" for a in range(4)]


def test_alphabet_episodes_draw_distinct_characters_of_one_alphabet() -> None:
    split = synthetic_split()
    grouped = alphabet_classes(split, min_characters=5)
    n, k, q, t = 3, 2, 3, 16
    sampler = AlphabetSampler(grouped, n, k, q, seed=7)
    ep = sampler.sample(11, t)
    assert ep.support_x.shape == (t, n * k, 1, 4, 4) and ep.query_x.shape == (t, n * q, 1, 4, 4)
    assert torch.equal(ep.support_y[0], labels(n, k)) and torch.equal(ep.query_y[0], labels(n, q))
    s_char, s_draw = decode(ep.support_x)
    q_char, q_draw = decode(ep.query_x)
    chars, drawings = sampler.draw(11, t)  # (T, N, K+Q): what the images say
    assert torch.equal(torch.cat([s_char.view(t, n, k), q_char.view(t, n, q)], -1), chars)
    assert torch.equal(torch.cat([s_draw.view(t, n, k), q_draw.view(t, n, q)], -1), drawings)
    alphabet_of = {i: "/".join(name.split("/")[0::2]) for i, name in enumerate(split.classes)}
    for task in range(t):
        support = set(s_char[task].tolist())
        assert not support & set(q_char[task].tolist())  # no character in both the support and the query set
        seen = set()
        for c in range(n):
            members = chars[task, c].tolist()
            assert len(set(members)) == k + q  # distinct characters
            assert len({alphabet_of[i] for i in members}) == 1  # of one alphabet
            seen.add(alphabet_of[members[0]])
        assert len(seen) == n  # n different alphabets
        assert "A0/rot090" not in seen  # too few characters: left out
    # a pure function of (seed, index)
    again = AlphabetSampler(grouped, n, k, q, seed=7).sample(11, t)
    assert torch.equal(again.support_x, ep.support_x) and torch.equal(again.query_x, ep.query_x)
    assert not torch.equal(AlphabetSampler(grouped, n, k, q, seed=8).sample(11, t).support_x, ep.support_x)
    assert not torch.equal(sampler.sample(12, t).support_x, ep.support_x)


def test_alphabet_sampler_rejects_classes_too_small() -> None:
    grouped = alphabet_classes(synthetic_split())  # smallest class: 4 characters
    with pytest.raises(ValueError, match="4 characters"):
        AlphabetSampler(grouped, 2, 3, 2)
    with pytest.raises(ValueError, match="5 alphabet classes"):
        AlphabetSampler(grouped, 6, 1, 1)


def test_vinyals_alphabet_classes(omniglot_root: Path) -> None:
    """The real split lists, images stubbed: classes per part, and the parts' characters disjoint while only
    Gurmukhi's alphabet is in both train and test."""
    parts = {}
    for part in ("train", "val", "test"):
        names = omniglot.read_split_list(omniglot_root, part)
        parts[part] = alphabet_classes(
            ClassSplit(torch.zeros(len(names), 1, 1, 1, 1, dtype=torch.uint8), names)
        )
        parts[part + "_names"] = set(names)
    assert [len(parts[p].alphabets) for p in ("train", "val", "test")] == [132, 20, 52]
    assert not parts["train_names"] & parts["test_names"] and not parts["train_names"] & parts["val_names"]
    train = {a.split("/")[0] for a in parts["train"].alphabets}
    test = {a.split("/")[0] for a in parts["test"].alphabets}
    assert train & test == {"Gurmukhi"}
    gurmukhi = parts["test"].counts[parts["test"].alphabets.index("Gurmukhi/rot000")]
    assert gurmukhi == 4


@pytest.fixture
def stub_omniglot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make_sampler`` reads :func:`synthetic_split` as every part of Omniglot."""
    monkeypatch.setattr(omniglot, "load", lambda root, size: None)
    monkeypatch.setattr(omniglot, "split_classes", lambda data, root, split, part: synthetic_split())


@pytest.mark.usefixtures("stub_omniglot")
def test_make_sampler_dispatches_on_label_level(tmp_path: Path) -> None:
    cfg = TaskConfig(ways=3, shots=2, queries=3, label_level="alphabet")
    assert cfg.name == "omniglot-3w2s-alphabet"
    sampler = tasks.make_sampler(cfg, "test", 0, tmp_path)
    assert isinstance(sampler, AlphabetSampler) and sampler.classes.alphabets[0] == "A0/rot000"
    assert len(sampler.classes.alphabets) == 4  # A0/rot090 has fewer than shots + queries characters
    plain = tasks.make_sampler(TaskConfig(ways=3, shots=2, queries=3), "test", 0, tmp_path)
    assert isinstance(plain, EpisodeSampler)
    with pytest.raises(ConfigError) as err:
        tasks.make_sampler(
            TaskConfig(ways=5, shots=2, queries=3, label_level="alphabet"), "test", 0, tmp_path
        )
    assert err.value.key == "task.ways" and "4 alphabet classes" in str(err.value)


@pytest.mark.parametrize(
    ("task", "key"),
    [
        ({"label_level": "word"}, "task.label_level"),
        ({"label_level": "alphabet", "dataset": "sinusoid", "ways": 1}, "task.label_level"),
        ({"label_level": "alphabet", "label_assignment": "fixed"}, "task.label_level"),
        ({"label_level": "alphabet", "construction": "augmented"}, "task.label_level"),
        ({"label_level": "alphabet", "shots": 50, "queries": 6}, "task.queries"),
        ({"shots": 10, "queries": 11}, "task.queries"),  # 20 drawings per character at the character level
    ],
)
def test_task_config_errors_name_the_key(task: dict, key: str) -> None:
    spec = run_spec()
    spec["task"] = {**spec["task"], **task}
    with pytest.raises(ConfigError) as err:
        run_config_from_dict(spec)
    assert err.value.key == key and f"'{key}'" in str(err.value)


def test_alphabet_level_allows_more_examples_than_drawings() -> None:
    cfg = TaskConfig(ways=5, shots=10, queries=15, label_level="alphabet")  # 25 characters > 20 drawings
    assert cfg.shots + cfg.queries > omniglot_install.DRAWINGS


def test_alphabet_episodes_with_support_character_queries() -> None:
    """``support_characters`` (the official IMP code's episodes): every query is another drawing of one of its
    class's support characters, never the support drawing itself, the (character, drawing) pairs distinct."""
    split = synthetic_split()
    grouped = alphabet_classes(split, min_characters=4)
    n, k, q, t = 3, 2, 7, 16  # more queries than characters: they redraw the support characters
    sampler = AlphabetSampler(grouped, n, k, q, seed=7, queries="support_characters")
    ep = sampler.sample(3, t)
    assert ep.support_x.shape == (t, n * k, 1, 4, 4) and ep.query_x.shape == (t, n * q, 1, 4, 4)
    s_char, s_draw = decode(ep.support_x)
    q_char, q_draw = decode(ep.query_x)
    s_char, s_draw = s_char.view(t, n, k), s_draw.view(t, n, k)
    q_char, q_draw = q_char.view(t, n, q), q_draw.view(t, n, q)
    for task in range(t):
        for c in range(n):
            support = dict(zip(s_char[task, c].tolist(), s_draw[task, c].tolist(), strict=True))
            assert len(support) == k  # distinct support characters
            pairs = list(zip(q_char[task, c].tolist(), q_draw[task, c].tolist(), strict=True))
            assert len(set(pairs)) == q
            assert all(ch in support and d != support[ch] for ch, d in pairs)
    with pytest.raises(ValueError, match="other drawings"):
        AlphabetSampler(grouped, n, k, k * 19 + 1, queries="support_characters")
    with pytest.raises(ConfigError, match="alphabet_queries"):
        TaskConfig(alphabet_queries="support_characters")
    cfg = TaskConfig(label_level="alphabet", shots=10, queries=30, alphabet_queries="support_characters")
    assert cfg.name.endswith("-alphabet-seenchars")
