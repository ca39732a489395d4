"""CACTUs (metalab.data.cactus) and its batched k-means (metalab.data.kmeans): the k-means against a loop
written here, the random-scaling partitions, the cluster task sampler (distinct clusters, disjoint support and
query, a function of seed and index, no label read), the on-disk caches, the embedding's training, and the
``task.construction: cactus`` config keys."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch

from metalab.data import cactus, omniglot
from metalab.data import tasks as tasks_module
from metalab.data.cactus import (
    CactusConfig,
    CactusTasks,
    cached_embedding,
    cached_partitions,
    contrastive_loss,
    distinct_draws,
    make_partitions,
    tasks_from_pool,
    train_embedding,
)
from metalab.data.episodes import EpisodeSampler, SupportSwapped
from metalab.data.kmeans import kmeans, kmeans_plus_plus
from metalab.data.tasks import TaskConfig, eval_sampler, make_sampler
from metalab.errors import ConfigError
from metalab.experiment import run_config_from_dict

SIDE = 28


def blobs(
    centres: int, per: int, dim: int, spread: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centres * per, dim)`` float64 points around random centres (far apart when ``spread`` is small) and
    the index of each point's centre."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=g, dtype=torch.float64) * 10
    which = torch.arange(centres).repeat_interleave(per)
    return means[which] + spread * torch.randn(len(which), dim, generator=g, dtype=torch.float64), which


def reference_kmeans(
    x: torch.Tensor, init: torch.Tensor, iterations: int
) -> tuple[list[int], float, torch.Tensor, int]:
    """Plain Lloyd with Python loops over points and clusters, on points already scaled: assignments, inertia,
    centroids and iterations run. Empty clusters take, in order of index, the points farthest from their own
    centroid (farthest first), as :func:`metalab.data.kmeans.update_centroids` is documented to do."""
    points, centres = x.tolist(), init.tolist()

    def sq(a: list[float], b: list[float]) -> float:
        return sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True))

    def assign() -> tuple[list[int], list[float]]:
        labels, dists = [], []
        for p in points:
            d = [sq(p, c) for c in centres]
            best = min(range(len(centres)), key=d.__getitem__)
            labels.append(best)
            dists.append(d[best])
        return labels, dists

    labels, dists = assign()
    done = 0
    for done in range(1, iterations + 1):  # noqa: B007
        members = [[i for i, lab in enumerate(labels) if lab == j] for j in range(len(centres))]
        far = sorted(range(len(points)), key=lambda i: -dists[i])
        empties = 0
        for j, idx in enumerate(members):
            if idx:
                centres[j] = [sum(points[i][d] for i in idx) / len(idx) for d in range(len(points[0]))]
            else:
                centres[j] = list(points[far[empties]])
                empties += 1
        new, dists = assign()
        changed = new != labels
        labels = new
        if not changed:
            break
    return labels, sum(dists), torch.tensor(centres, dtype=torch.float64), done


# ------------------------------------------------------------------------------------------------ k-means


def test_kmeans_matches_a_loop_on_scaled_points_from_the_same_init() -> None:
    x, _ = blobs(4, 10, 3, spread=3.0)  # overlapping blobs: several iterations before it settles
    g = torch.Generator().manual_seed(1)
    scales = torch.rand(3, 3, generator=g, dtype=torch.float64) + 0.1  # (B, D) > 0
    scales[0] = 1.0
    k = 5
    init = x[torch.randperm(len(x), generator=g)[:k]].expand(3, k, 3).clone()  # same start points per run
    result = kmeans(x, k, weights=scales**2, init=init, iterations=30)
    for b in range(3):
        labels, inertia, centres, done = reference_kmeans(x * scales[b], init[b] * scales[b], 30)
        assert result.assignments[b].tolist() == labels
        assert result.inertia[b].item() == pytest.approx(inertia, rel=1e-9)
        assert torch.allclose(result.centroids[b] * scales[b], centres, atol=1e-9)
        assert done <= result.iterations
    assert result.iterations > 1


def test_an_empty_cluster_takes_the_farthest_point_as_the_loop_does() -> None:
    x, _ = blobs(3, 8, 2, spread=1.0, seed=2)
    init = torch.stack([x[0], x[9], x[17], torch.full((2,), 1e3, dtype=torch.float64)])[None]  # one far away
    result = kmeans(x, 4, init=init, iterations=1)  # one update: the empty cluster is refilled once
    labels, inertia, centres, _ = reference_kmeans(x, init[0], 1)
    assert result.assignments[0].tolist() == labels
    assert torch.allclose(result.centroids[0], centres)
    assert result.inertia[0].item() == pytest.approx(inertia)
    assert not torch.equal(result.centroids[0, 3], init[0, 3])  # moved onto a data point
    assert (result.centroids[0, 3] == x).all(1).any()
    assert torch.bincount(result.assignments[0], minlength=4).min() > 0


def test_kmeans_recovers_well_separated_blobs_from_every_restart() -> None:
    x, truth = blobs(6, 30, 8, spread=0.3)
    result = kmeans(x, 6, weights=torch.ones(4, 8), generator=torch.Generator().manual_seed(0))
    within = sum(((x[truth == c] - x[truth == c].mean(0)) ** 2).sum().item() for c in range(6))
    for b in range(4):  # four k-means++ restarts at once
        pairs = set(zip(result.assignments[b].tolist(), truth.tolist(), strict=True))
        assert len(pairs) == 6, "each cluster is exactly one blob"
        assert result.inertia[b].item() == pytest.approx(within, rel=1e-9)


def test_random_seeding_starts_from_distinct_points() -> None:
    x, _ = blobs(3, 10, 2, spread=1.0)
    start = kmeans(x, 8, weights=torch.ones(5, 2), init="random", iterations=0)
    assert start.iterations == 0
    for run in start.centroids:  # (k, D): k distinct rows of x
        rows = [int((x == c).all(1).nonzero()[0]) for c in run]
        assert len(set(rows)) == 8
    assert len({tuple(c.flatten().tolist()) for c in start.centroids}) > 1, "each run its own draw"


def test_kmeans_plus_plus_seeds_land_in_distinct_blobs() -> None:
    x, truth = blobs(5, 40, 4, spread=0.1)
    for seed in range(5):
        seeds = kmeans_plus_plus(
            x, 5, torch.ones(3, 4, dtype=torch.float64), torch.Generator().manual_seed(seed)
        )
        for run in seeds:  # (k, D): which blob each seed point belongs to
            found = {int(truth[(x == s).all(1)][0]) for s in run}
            assert found == set(range(5))


def test_kmeans_refuses_bad_input() -> None:
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="k=11"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match="non-negative"):
        kmeans(x, 2, weights=-torch.ones(1, 2))
    with pytest.raises(ValueError, match="initial centroids"):
        kmeans(x, 2, init=torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="float"):
        kmeans(torch.ones(10, 2, dtype=torch.long), 2)


def test_partitions_differ_and_grow_without_changing_the_first_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cactus, "PARTITIONS_PER_GROUP", 2)
    x, _ = blobs(8, 10, 6, spread=4.0)
    few = make_partitions(x, 2, 5, iterations=10, seed=3)
    more = make_partitions(x, 5, 5, iterations=10, seed=3)
    assert few.labels.shape == (2, 80) and more.labels.shape == (5, 80)
    assert torch.equal(more.labels[:2], few.labels)
    assert int(more.labels.min()) >= 0 and int(more.labels.max()) < 5
    assert len({tuple(p.tolist()) for p in more.labels}) == 5, "random scalings give different partitions"
    assert not torch.equal(make_partitions(x, 2, 5, iterations=10, seed=4).labels, few.labels)


# ------------------------------------------------------------------------------------------------ sampler


def test_distinct_draws_are_distinct_in_range_and_uniform() -> None:
    sizes = torch.tensor([[5, 9], [200, 7]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        d = distinct_draws(sizes, 5, g)
        assert d.shape == (2, 2, 5)
        assert (d >= 0).all() and (d < sizes[..., None]).all()
        assert all(len(set(row.tolist())) == 5 for row in d.view(-1, 5))
    many = distinct_draws(torch.full((4000,), 6), 3, g)  # each value in 3/6 of the draws, each position 1/6
    assert torch.allclose(
        torch.bincount(many.flatten(), minlength=6) / 4000, torch.full((6,), 0.5), atol=0.04
    )
    assert torch.allclose(torch.bincount(many[:, 0], minlength=6) / 4000, torch.full((6,), 1 / 6), atol=0.03)


def numbered_images(m: int) -> torch.Tensor:
    """``(m, 1, 28, 28)`` uint8 images, image ``i`` carrying ``i`` in its first two pixels (to trace it)."""
    images = torch.zeros(m, 1, SIDE, SIDE, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(m) % 256
    images[:, 0, 0, 1] = torch.arange(m) // 256
    return images


def image_ids(x: torch.Tensor) -> torch.Tensor:
    """The numbers of :func:`numbered_images` back from float episode images ``(..., 1, 28, 28)``."""
    pixels = (x[..., 0, 0, :2] * 255).round().long()
    return pixels[..., 0] + 256 * pixels[..., 1]


def toy_partitions() -> torch.Tensor:
    """``(3, 60)`` cluster ids: partition 0 has 6 clusters of 10; partition 1 has clusters of sizes 20, 20, 4,
    4, 4, 4, 4 (ids 0..6, only two of at least 5); partition 2 has 12 clusters of 5 in scrambled order."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.arange(60) // 10
    p1 = torch.cat([torch.zeros(20), torch.ones(20), 2 + torch.arange(20) // 4]).long()
    p2 = (torch.arange(60) // 5)[torch.randperm(60, generator=g)]
    return torch.stack([p0, p1, p2])


def test_tasks_are_distinct_clusters_of_one_partition_with_disjoint_support_and_query() -> None:
    parts = toy_partitions()
    sampler = CactusTasks(numbered_images(60), parts, n_way=3, k_shot=2, q_query=3, seed=0)
    ep = sampler.sample(0, 64)
    assert ep.support_x.shape == (64, 6, 1, SIDE, SIDE) and ep.query_x.shape == (64, 9, 1, SIDE, SIDE)
    assert ep.support_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 64
    assert ep.query_y.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 64
    support, query = image_ids(ep.support_x), image_ids(ep.query_x)  # (T, N*K), (T, N*Q)
    used = set()
    for s, q in zip(support, query, strict=True):
        assert len(set(s.tolist()) | set(q.tolist())) == 15, "every image of a task is a different image"
        per_class = torch.cat([s.view(3, 2), q.view(3, 3)], 1)  # (N, K+Q) image ids of each class
        fits = [p for p in range(3) if all(len(set(parts[p, c].tolist())) == 1 for c in per_class)]
        assert fits, "each class is the images of one cluster"
        p = fits[0]
        assert len({int(parts[p, c[0]]) for c in per_class}) == 3, "the N classes are N distinct clusters"
        used.add(p)
    assert used == {0, 2}, "partition 1 has only 2 clusters of >= 5 images: never drawn for 3 ways"
    assert len(sampler.usable) == 2


def test_small_clusters_are_never_drawn() -> None:
    parts = toy_partitions()[1:2]  # sizes 20, 20 and five of 4
    ep = CactusTasks(numbered_images(60), parts, n_way=2, k_shot=1, q_query=4, seed=1).sample(0, 50)
    ids = torch.cat([image_ids(ep.support_x), image_ids(ep.query_x)], 1)
    assert bool((ids < 40).all()), "only the clusters of 20 images hold K + Q = 5"


def test_an_episode_is_a_function_of_seed_and_index() -> None:
    parts, images = toy_partitions(), numbered_images(60)
    a = CactusTasks(images, parts, 3, 1, 2, seed=4).sample(6, 5)
    again = CactusTasks(images, parts, 3, 1, 2, seed=4).sample(6, 5)
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, field), getattr(again, field))
    assert not torch.equal(a.support_x, CactusTasks(images, parts, 3, 1, 2, seed=4).sample(7, 5).support_x)
    assert not torch.equal(a.support_x, CactusTasks(images, parts, 3, 1, 2, seed=5).sample(6, 5).support_x)


def test_the_sampler_refuses_impossible_tasks() -> None:
    parts, images = toy_partitions(), numbered_images(60)
    with pytest.raises(ValueError, match="no partition has 13 clusters"):
        CactusTasks(images, parts, 13, 1, 1)
    with pytest.raises(ValueError, match="of at least 21 images"):
        CactusTasks(images, parts, 2, 1, 20)
    with pytest.raises(ValueError, match="partitions must be integer"):
        CactusTasks(images, parts[:, :50], 2, 1, 1)
    with pytest.raises(ValueError, match="uint8"):
        CactusTasks(images.float(), parts, 2, 1, 1)


# ----------------------------------------------------------------------------- from a pool: no label read


def shapes_pool(classes: int = 12, per_class: int = 5, seed: int = 0) -> torch.Tensor:
    """``(classes, per_class, 1, 28, 28)`` uint8 images of two random filled rectangles each."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    grid = torch.arange(SIDE)
    images = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    for _ in range(2):
        top, left = torch.randint(5, 16, (2, n), generator=g).unbind()
        height, width = torch.randint(3, 9, (2, n), generator=g).unbind()
        rows = (grid >= top[:, None]) & (grid < (top + height)[:, None])
        cols = (grid >= left[:, None]) & (grid < (left + width)[:, None])
        images |= rows[:, :, None] & cols[:, None, :]
    return (images.to(torch.uint8) * 255).view(classes, per_class, 1, SIDE, SIDE)


TINY = CactusConfig(partitions=3, clusters=6, iterations=10, embedding_steps=1, embedding_dim=8)
"""Settings small enough for a test: one step of embedding training (one batch of 256 random images)."""


def test_the_class_structure_of_the_pool_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = shapes_pool(12, 5)
    seen = []
    real = cactus.train_embedding

    def spy(images: torch.Tensor, *args: object) -> cactus.Embedded:
        seen.append(tuple(images.shape))
        return real(images, *args)

    monkeypatch.setattr(cactus, "train_embedding", spy)
    sampler = tasks_from_pool(pool, TINY, 3, 1, 2, seed=9)
    regrouped = tasks_from_pool(pool.reshape(6, 10, 1, SIDE, SIDE), TINY, 3, 1, 2, seed=9)
    assert seen == [(60, 1, SIDE, SIDE)], "trained once, on images without a class axis; then cached"
    for index in range(3):
        a, b = sampler.sample(index, 2), regrouped.sample(index, 2)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert list(inspect.signature(CactusTasks).parameters) == [
        "images",
        "partitions",
        "n_way",
        "k_shot",
        "q_query",
        "seed",
        "timings",
    ]
    assert sampler.images.shape == (60, 1, SIDE, SIDE) and sampler.images._base is None, "a copy, not a view"
    assert set(sampler.timings) == {"embedding_seconds", "clustering_seconds"}
    assert all(v > 0 for v in sampler.timings.values())


def test_too_many_clusters_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        tasks_from_pool(shapes_pool(2, 5), dataclasses.replace(TINY, clusters=11), 2, 1, 1)
    assert info.value.key == "task.cactus.clusters" and "11 clusters of only 10 images" in str(info.value)
    with pytest.raises(ConfigError) as info:  # 6 clusters of 60 images: none holds 40
        tasks_from_pool(shapes_pool(), TINY, 2, 20, 20)
    assert info.value.key == "task.cactus.clusters"


# ------------------------------------------------------------------------------------------------ caches


def test_the_second_call_reads_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path))
    images = shapes_pool().flatten(0, 1)
    first = cached_embedding(images, TINY)
    parts = cached_partitions(first.vectors, TINY)
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "cactus").iterdir()) == [
        "embedding",
        "partitions",
    ]

    def fail(*args: object) -> None:
        raise AssertionError("computed again")

    monkeypatch.setattr(cactus, "train_embedding", fail)
    monkeypatch.setattr(cactus, "make_partitions", fail)
    again = cached_embedding(images, TINY)
    assert torch.equal(again.vectors, first.vectors) and again.seconds == first.seconds
    loaded = cached_partitions(again.vectors, TINY)
    assert torch.equal(loaded.labels, parts.labels) and loaded.seconds == parts.seconds
    assert loaded.labels.shape == (3, 60) and loaded.labels.dtype == torch.int64


def test_other_settings_or_images_have_other_keys() -> None:
    images = shapes_pool().flatten(0, 1)
    key = cactus.embedding_key(images, TINY)
    assert cactus.embedding_key(images.clone(), TINY) == key
    assert cactus.embedding_key(images, dataclasses.replace(TINY, embedding_steps=2)) != key
    assert (
        cactus.embedding_key(images, dataclasses.replace(TINY, partitions=9)) == key
    )  # not an embedding key
    other = images.clone()
    other[0, 0, 0, 0] += 1
    assert cactus.embedding_key(other, TINY) != key
    vectors = torch.randn(60, 8)
    pkey = cactus.partitions_key(vectors, TINY)
    assert cactus.partitions_key(vectors, dataclasses.replace(TINY, clusters=7)) != pkey
    assert cactus.partitions_key(vectors + 1e-3, TINY) != pkey


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_key", "wrong_shape", "out_of_range"])
def test_a_corrupt_or_mismatched_cache_is_computed_again(
    damage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path))
    images = shapes_pool().flatten(0, 1)
    first = cached_embedding(images, TINY)
    parts = cached_partitions(first.vectors, TINY)
    epath = cactus.cache_file("embedding_contrastive", cactus.embedding_key(images, TINY))
    ppath = cactus.cache_file("partitions", cactus.partitions_key(first.vectors, TINY))
    for path in (epath, ppath):
        blob = torch.load(path, weights_only=True)
        if damage == "garbage":
            path.write_bytes(b"not a torch file")
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[:100])
        else:
            if damage == "other_key":
                blob["key"] = "0" * 64
            elif damage == "wrong_shape":
                name = "vectors" if "vectors" in blob else "labels"
                blob[name] = blob[name][:-1]
            else:
                name = "vectors" if "vectors" in blob else "labels"
                blob[name] = blob[name] * 0 + (float("nan") if name == "vectors" else 99)
            torch.save(blob, path)
    calls = []
    real_train, real_partitions = cactus.train_embedding, cactus.make_partitions
    monkeypatch.setattr(cactus, "train_embedding", lambda *a: calls.append("embedding") or real_train(*a))
    monkeypatch.setattr(
        cactus, "make_partitions", lambda *a: calls.append("partitions") or real_partitions(*a)
    )
    again = cached_embedding(images, TINY)
    assert torch.equal(again.vectors, first.vectors), "the same seed trains the same embedding"
    assert torch.equal(cached_partitions(again.vectors, TINY).labels, parts.labels)
    assert calls == ["embedding", "partitions"]
    cached_embedding(images, TINY)  # rewritten: read back now
    assert calls == ["embedding", "partitions"]


# ------------------------------------------------------------------------------------------------ embedding


def test_contrastive_loss_has_its_closed_form() -> None:
    tau = 0.5
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([e0, e1, e0, e1])  # views i and i + 2 are twins, the two images orthogonal
    # each row: its twin at cosine 1, the other image's two views at 0
    expected = math.log(1 + 2 * math.exp(-1 / tau))
    assert contrastive_loss(z, tau).item() == pytest.approx(expected, rel=1e-6)
    swapped = torch.stack([e0, e1, e1, e0])  # each view's "twin" is now the other image
    assert contrastive_loss(swapped, tau).item() > contrastive_loss(z, tau).item() + 1


@pytest.mark.parametrize("kind", ["contrastive", "autoencoder"])
def test_train_embedding_is_seeded_and_shaped(kind: str) -> None:
    images = shapes_pool(4, 5).flatten(0, 1)
    state = torch.random.get_rng_state()
    a = train_embedding(images, kind, steps=1, dim=8, seed=0)  # type: ignore[arg-type]
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is left alone"
    b = train_embedding(images, kind, steps=1, dim=8, seed=0)  # type: ignore[arg-type]
    c = train_embedding(images, kind, steps=1, dim=8, seed=1)  # type: ignore[arg-type]
    assert a.vectors.shape == (20, 8) and a.vectors.dtype == torch.float32 and a.seconds > 0
    assert torch.equal(a.vectors, b.vectors) and not torch.equal(a.vectors, c.vectors)
    if kind == "contrastive":
        assert torch.allclose(a.vectors.norm(dim=1), torch.ones(20), atol=1e-5)
    else:
        assert torch.allclose(a.vectors.mean(0), torch.zeros(8), atol=1e-5)
        assert torch.allclose(a.vectors.std(0), torch.ones(8), atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        train_embedding(images.float(), kind, steps=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("task", "key", "message"),
    [
        ({"construction": "cactus", "cactus": {"partitions": 0}}, "task.cactus.partitions", ">= 1"),
        ({"construction": "cactus", "cactus": {"clusters": 1}}, "task.cactus.clusters", ">= 2"),
        ({"construction": "cactus", "cactus": {"iterations": 0}}, "task.cactus.iterations", ">= 1"),
        (
            {"construction": "cactus", "cactus": {"embedding": "vae"}},
            "task.cactus.embedding",
            "must be one of",
        ),
        (
            {"construction": "cactus", "cactus": {"embedding_steps": -1}},
            "task.cactus.embedding_steps",
            ">= 0",
        ),
        ({"construction": "cactus", "cactus": {"embedding_dim": 0}}, "task.cactus.embedding_dim", ">= 1"),
        ({"construction": "cactus", "cactus": {"seed": -2}}, "task.cactus.seed", ">= 0"),
        ({"construction": "cactus", "cactus": {"clusterz": 5}}, "task.cactus.clusterz", "did you mean"),
        ({"cactus": {"partitions": 5}}, "task.cactus", "construction: cactus only"),
        ({"construction": "augmented", "cactus": {}}, "task.cactus", "construction: cactus only"),
        (
            {"dataset": "sinusoid", "ways": 1, "construction": "cactus"},
            "task.construction",
            "built from Omniglot",
        ),
        ({"construction": "cactus", "label_assignment": "fixed"}, "task.construction", "must be 'shuffled'"),
    ],
)
def test_bad_cactus_settings_name_the_key(task: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_config_from_dict({"algo": "protonet", "task": task})
    assert info.value.key == key
    assert message in str(info.value)


def test_cactus_settings_are_read_and_run_names_mark_them() -> None:
    run = run_config_from_dict(
        {
            "algo": "protonet",
            "task": {"construction": "cactus", "cactus": {"partitions": 7, "embedding": "autoencoder"}},
        }
    )
    assert run.task.cactus == CactusConfig(partitions=7, embedding="autoencoder")
    assert run.task.name == "omniglot-5w1s-cactus"
    assert TaskConfig(construction="cactus").cactus is None  # null: the defaults
    again = run_config_from_dict({"algo": "protonet", "task": dataclasses.asdict(run.task)})
    assert again.task == run.task


@pytest.fixture
def fake_omniglot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make_sampler`` on Omniglot without the data: each part a shapes pool of its own size."""
    sizes = {"train": 12, "trainval": 14, "val": 11, "test": 13}
    monkeypatch.setattr(omniglot, "load", lambda root, size=28: None)
    monkeypatch.setattr(
        tasks_module.omniglot,
        "split_classes",
        lambda data, root, split, part: omniglot.ClassSplit(shapes_pool(sizes[part], 20), []),
    )


@pytest.mark.usefixtures("fake_omniglot")
def test_make_sampler_clusters_training_tasks_only() -> None:
    settings = dataclasses.replace(TINY, clusters=4)
    cfg = TaskConfig(ways=5, queries=4, train_ways=3, train_queries=2, construction="cactus", cactus=settings)
    train = make_sampler(cfg, "train", 0, Path("."))
    assert isinstance(train, CactusTasks)
    assert (train.n_way, train.k_shot, train.q_query, train.images.shape[0]) == (3, 1, 2, 12 * 20)
    assert train.sample(0, 2).query_x.shape == (2, 6, 1, SIDE, SIDE)
    for part in ("val", "test"):  # evaluation: the real labelled classes
        sampler = make_sampler(cfg, part, 0, Path("."))
        assert isinstance(sampler, EpisodeSampler) and sampler.n_way == 5 and sampler.q_query == 4
    probe = eval_sampler(cfg, "probe", 0, Path("."))  # the memorisation probe wraps the cluster tasks
    assert isinstance(probe, SupportSwapped) and isinstance(probe.base, CactusTasks)
    with pytest.raises(ConfigError) as info:  # 4 clusters cannot make 5-way training tasks
        make_sampler(dataclasses.replace(cfg, train_ways=5), "train", 0, Path("."))
    assert info.value.key == "task.cactus.clusters"
