"""The episode sampler: shapes, labels, class/sample bookkeeping, and determinism in (seed, index)."""

from __future__ import annotations

import pytest
import torch

from metalab.data.episodes import Episode, EpisodeSampler, generator_for

CLASSES, PER_CLASS = 12, 20


@pytest.fixture
def pool() -> torch.Tensor:
    """``(12, 20, 1, 2, 2)`` uint8 images whose pixels record their class and sample number."""
    pool = torch.zeros(CLASSES, PER_CLASS, 1, 2, 2, dtype=torch.uint8)
    pool[:, :, 0, 0, 0] = torch.arange(CLASSES, dtype=torch.uint8)[:, None]  # class id
    pool[:, :, 0, 0, 1] = torch.arange(PER_CLASS, dtype=torch.uint8)[None, :]  # sample id
    pool[:, :, 0, 1, :] = 255
    return pool


def decode_ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class id, sample id) of each image of ``x`` (..., 1, 2, 2) as float in [0, 1]."""
    ids = (x * 255).round().long()
    return ids[..., 0, 0, 0], ids[..., 0, 0, 1]


@pytest.mark.parametrize(
    ("n", "k", "q", "tasks"), [(5, 1, 15, 3), (3, 5, 2, 1), (12, 2, 0, 2), (1, 1, 19, 4)]
)
def test_shapes_labels_and_dtypes(pool: torch.Tensor, n: int, k: int, q: int, tasks: int) -> None:
    ep = EpisodeSampler(pool, n, k, q, seed=0).sample(0, tasks)
    assert isinstance(ep, Episode)
    assert ep.support_x.shape == (tasks, n * k, 1, 2, 2)
    assert ep.query_x.shape == (tasks, n * q, 1, 2, 2)
    assert ep.support_y.shape == (tasks, n * k) and ep.query_y.shape == (tasks, n * q)
    assert ep.support_x.dtype == torch.float32 and ep.support_y.dtype == torch.int64
    assert (ep.n_way, ep.k_shot, ep.q_query, ep.tasks) == (n, k, q, tasks)
    # Labels 0..N-1, grouped by class: [0]*K + [1]*K + ...
    expected = torch.arange(n).repeat_interleave(k)
    assert torch.equal(ep.support_y, expected.expand(tasks, -1))
    assert torch.equal(ep.query_y, torch.arange(n).repeat_interleave(q).expand(tasks, -1))
    assert float(ep.support_x.min()) >= 0.0 and float(ep.support_x.max()) == 1.0


def test_images_match_their_labels(pool: torch.Tensor) -> None:
    n, k, q, tasks = 5, 2, 3, 8
    ep = EpisodeSampler(pool, n, k, q, seed=3).sample(7, tasks)
    s_cls, s_idx = decode_ids(ep.support_x)  # (T, N*K)
    q_cls, q_idx = decode_ids(ep.query_x)  # (T, N*Q)
    for t in range(tasks):
        classes = s_cls[t].reshape(n, k)
        assert (classes == classes[:, :1]).all()  # one class per label
        assert len(set(classes[:, 0].tolist())) == n  # N distinct classes
        assert torch.equal(q_cls[t].reshape(n, q), classes[:, :1].expand(n, q))  # same class per label
        for c in range(n):
            drawn = s_idx[t].reshape(n, k)[c].tolist() + q_idx[t].reshape(n, q)[c].tolist()
            assert len(set(drawn)) == k + q  # support and query never share an example


def test_same_seed_and_index_is_bit_identical(pool: torch.Tensor) -> None:
    a = EpisodeSampler(pool, 5, 1, 5, seed=11).sample(42, 4)
    _ = EpisodeSampler(pool, 5, 1, 5, seed=11).sample(
        0, 4
    )  # drawing other batches in between changes nothing
    torch.manual_seed(1234)  # neither does the global generator
    b = EpisodeSampler(pool, 5, 1, 5, seed=11).sample(42, 4)
    for x, y in zip(a[:4], b[:4], strict=True):
        assert torch.equal(x, y)


def test_different_index_or_seed_differs(pool: torch.Tensor) -> None:
    sampler = EpisodeSampler(pool, 5, 1, 5, seed=11)
    a = sampler.sample(42, 4)
    assert not torch.equal(a.support_x, sampler.sample(43, 4).support_x)
    assert not torch.equal(a.support_x, EpisodeSampler(pool, 5, 1, 5, seed=12).sample(42, 4).support_x)


def test_seed_and_index_do_not_overlap() -> None:
    draw = [torch.rand(8, generator=generator_for(s, i)) for s, i in ((0, 1), (1, 0), (0, 0), (1, 1))]
    for i in range(len(draw)):
        for j in range(i + 1, len(draw)):
            assert not torch.equal(draw[i], draw[j])
    assert torch.equal(torch.rand(8, generator=generator_for(0, 1)), draw[0])


def test_all_classes_and_examples_get_used(pool: torch.Tensor) -> None:
    ep = EpisodeSampler(pool, 5, 1, 1, seed=0).sample(0, 200)
    cls, idx = decode_ids(ep.support_x)
    assert set(cls.flatten().tolist()) == set(range(CLASSES))
    assert set(idx.flatten().tolist()) == set(range(PER_CLASS))


def test_task_and_to(pool: torch.Tensor) -> None:
    ep = EpisodeSampler(pool, 3, 2, 4, seed=0).sample(0, 5)
    one = ep.task(2)
    assert one.support_x.shape == (6, 1, 2, 2) and one.query_y.shape == (12,)
    assert torch.equal(one.support_x, ep.support_x[2]) and torch.equal(one.query_x, ep.query_x[2])
    assert (one.n_way, one.k_shot, one.q_query) == (3, 2, 4)
    moved = ep.to("cpu")
    assert torch.equal(moved.query_x, ep.query_x)


@pytest.mark.parametrize(
    ("n", "k", "q", "match"),
    [(0, 1, 1, "n_way"), (13, 1, 1, "n_way"), (5, 0, 1, "k_shot"), (5, 10, 11, "fit"), (5, 1, -1, "k_shot")],
)
def test_rejects_impossible_shapes(pool: torch.Tensor, n: int, k: int, q: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(pool, n, k, q)


def test_rejects_non_uint8_pool(pool: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        EpisodeSampler(pool.float(), 5, 1, 1)
    with pytest.raises(ValueError, match="uint8"):
        EpisodeSampler(pool[:, :, 0], 5, 1, 1)


def test_omniglot_episodes(omniglot_data, omniglot_root) -> None:
    from metalab.data import omniglot

    split = omniglot.split_classes(omniglot_data, omniglot_root, "vinyals", "test")
    sampler = EpisodeSampler(split.images, 5, 1, 15, seed=0)
    ep = sampler.sample(0, 4)
    assert ep.support_x.shape == (4, 5, 1, 28, 28)
    assert ep.query_x.shape == (4, 75, 1, 28, 28)
    assert set(ep.query_y.unique().tolist()) == set(range(5))
    assert 0.0 <= float(ep.support_x.min()) and float(ep.support_x.max()) <= 1.0
    assert float(ep.support_x.max()) == 1.0  # real ink
    again = EpisodeSampler(split.images, 5, 1, 15, seed=0).sample(0, 4)
    assert torch.equal(ep.query_x, again.query_x)
    wide = EpisodeSampler(split.images, 20, 5, 5, seed=0).sample(1, 2)
    assert wide.support_x.shape == (2, 100, 1, 28, 28) and int(wide.support_y.max()) == 19
