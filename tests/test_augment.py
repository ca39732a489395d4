"""Augmentation-built (UMTRA / AAL) tasks: the augmentations' geometry and determinism, episodes of the
``EpisodeSampler`` shape whose queries are views of their support images, no class label ever read, and the
``task.construction`` key (validation, run names, ``make_sampler``)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from metalab.data import omniglot
from metalab.data import tasks as tasks_module
from metalab.data.augment import (
    DEFAULT,
    IDENTITY,
    Augmentation,
    AugmentedTasks,
    affine_matrices,
    augment,
    random_affine,
    random_zero,
)
from metalab.data.episodes import EpisodeSampler, SupportSwapped
from metalab.data.tasks import TaskConfig, eval_sampler, make_sampler
from metalab.errors import ConfigError
from metalab.experiment import run_config_from_dict

SIDE = 28


def shapes_pool(classes: int = 12, per_class: int = 5, seed: int = 0) -> torch.Tensor:
    """``(classes, per_class, 1, 28, 28)`` uint8 images: each two random filled rectangles of ink (255) on 0,
    well inside the frame, so every image is a distinct smooth shape (a stand-in for Omniglot strokes)."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    grid = torch.arange(SIDE)
    images = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    for _ in range(2):
        top, left = (torch.randint(5, 16, (2, n), generator=g)).unbind()
        height, width = (torch.randint(3, 9, (2, n), generator=g)).unbind()
        rows = (grid >= top[:, None]) & (grid < (top + height)[:, None])
        cols = (grid >= left[:, None]) & (grid < (left + width)[:, None])
        images |= rows[:, :, None] & cols[:, None, :]
    return (images.to(torch.uint8) * 255).view(classes, per_class, 1, SIDE, SIDE)


def pool_images(pool: torch.Tensor) -> torch.Tensor:
    """The pool's images as the sampler sees them: ``(M, C, H, W)`` float in [0, 1]."""
    return pool.flatten(0, 1).float() / 255


# ---------------------------------------------------------------------------------------- augmentations


def test_zero_strength_is_the_identity() -> None:
    x = pool_images(shapes_pool())
    assert torch.allclose(augment(x, torch.Generator().manual_seed(3), IDENTITY), x, atol=1e-5)
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    zeros = torch.zeros(4)
    assert torch.allclose(
        affine_matrices(zeros, torch.ones(4), zeros, torch.zeros(4, 2)), eye.expand(4, 2, 3)
    )


def test_augment_is_deterministic_for_a_generator_and_varies_across_draws() -> None:
    x = pool_images(shapes_pool())
    a = augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(8)))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1


def test_a_positive_shift_moves_ink_right_and_down_by_that_many_pixels() -> None:
    x = torch.zeros(1, 1, SIDE, SIDE)
    x[0, 0, 10, 12] = 1.0
    pixels = 2  # normalised coordinates span 2 across SIDE pixels
    shift = torch.tensor([[2 * pixels / SIDE, 2 * pixels / SIDE]])
    theta = affine_matrices(torch.zeros(1), torch.ones(1), torch.zeros(1), shift)
    grid = torch.nn.functional.affine_grid(theta, [1, 1, SIDE, SIDE], align_corners=False)
    moved = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert moved[0, 0, 12, 14] == pytest.approx(1.0, abs=1e-4)
    assert moved.sum() == pytest.approx(1.0, abs=1e-4)


def test_a_scale_above_one_enlarges_the_ink() -> None:
    x = pool_images(shapes_pool())
    fixed = dataclasses.replace(IDENTITY, scale=(1.1, 1.1))
    bigger = random_affine(x, torch.Generator().manual_seed(0), fixed)
    # The shapes sit well inside the frame: the ink grows by the area factor, nothing is cropped.
    ratio = bigger.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert torch.allclose(ratio, torch.full_like(ratio, 1.21), atol=0.02)


def test_background_fills_what_the_warp_uncovers_and_what_is_erased() -> None:
    white = torch.ones(6, 1, SIDE, SIDE)  # dark-on-white images: a background of 1
    strong = Augmentation(rotation=30, scale=(0.5, 0.7), shear=20, translate=0.3, erase=0.5, drop=0.3)
    assert torch.allclose(
        augment(white, torch.Generator(), dataclasses.replace(strong, background=1.0)), white
    )
    half = dataclasses.replace(IDENTITY, scale=(0.5, 0.5))  # background 0: the central 14 x 14 stays ink
    black = augment(white, torch.Generator(), half)
    assert black[..., :7, :].max() == 0 and black[..., 7:21, 7:21].min() == 1
    assert black.sum().item() == pytest.approx(6 * 14 * 14, abs=1e-3)


def test_pixel_zeroing_only_removes_ink_at_about_its_rate() -> None:
    x = torch.ones(64, 1, SIDE, SIDE)
    dropped = random_zero(x, torch.Generator().manual_seed(1), dataclasses.replace(IDENTITY, drop=0.1))
    assert set(dropped.unique().tolist()) <= {0.0, 1.0}
    assert 1 - dropped.mean().item() == pytest.approx(0.1, abs=0.01)


# ------------------------------------------------------------------------------------------- the sampler


def test_episodes_have_the_episode_sampler_layout() -> None:
    pool = shapes_pool()
    ep = AugmentedTasks(pool, 5, 3, 4, seed=0).sample(0, 2)
    plain = EpisodeSampler(pool, 5, 3, 2, seed=0).sample(0, 2)
    assert ep.support_x.shape == (2, 15, 1, SIDE, SIDE) and ep.query_x.shape == (2, 20, 1, SIDE, SIDE)
    assert (ep.n_way, ep.k_shot, ep.q_query) == (5, 3, 4)
    for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
        assert x.dtype == plain.support_x.dtype and y.dtype == plain.support_y.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1
    assert ep.support_y.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]] * 2
    assert ep.query_y.tolist() == [torch.arange(5).repeat_interleave(4).tolist()] * 2


def test_an_episode_is_a_function_of_seed_and_index() -> None:
    pool = shapes_pool()
    sampler = AugmentedTasks(pool, 5, 2, 3, seed=4)
    a, again = sampler.sample(6, 3), AugmentedTasks(pool, 5, 2, 3, seed=4).sample(6, 3)
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, field), getattr(again, field))
    assert not torch.equal(a.support_x, sampler.sample(7, 3).support_x)
    assert not torch.equal(a.support_x, AugmentedTasks(pool, 5, 2, 3, seed=5).sample(6, 3).support_x)


def test_first_shots_are_distinct_pool_images_and_later_shots_views_of_them() -> None:
    pool = shapes_pool()
    images = pool_images(pool).flatten(1)  # (M, D)
    ep = AugmentedTasks(pool, 6, 2, 1, seed=1).sample(0, 4)
    firsts = ep.support_x[:, ::2].flatten(2)  # (T, N, D): shot 0 of each class
    for task in firsts:
        found = [(images == image).all(1).nonzero().flatten().tolist() for image in task]
        assert all(found), "shot 0 must be a pool image, unaugmented"
        assert len({hit[0] for hit in found}) == len(found), "the N images of a task are distinct"
    assert not torch.equal(ep.support_x[:, 1::2], ep.support_x[:, ::2])


def test_queries_are_views_that_stay_closer_to_their_own_image() -> None:
    ep = AugmentedTasks(shapes_pool(), 8, 1, 5, seed=2).sample(0, 6)
    support, query = ep.support_x.flatten(2), ep.query_x.flatten(2)  # (T, N, D), (T, N*Q, D)
    distance = torch.cdist(query, support)  # (T, N*Q, N)
    own = distance.gather(2, ep.query_y[..., None]).squeeze(2)
    assert (own > 0.1).all(), "every query view differs from its support image"
    others = (distance.sum(2) - own) / (ep.n_way - 1)  # mean distance to the task's other images
    assert own.mean() < 0.85 * others.mean()
    assert (own < others).float().mean() > 0.85  # measured 0.92-0.97 over sampler seeds 0-7
    nearest = distance.argmin(2)  # pixel nearest neighbour: far above chance (1/8), measured 0.53-0.66
    assert (nearest == ep.query_y).float().mean() > 0.4


def test_zero_strength_queries_are_copies_of_the_support_image() -> None:
    ep = AugmentedTasks(shapes_pool(), 4, 1, 3, seed=0, aug=IDENTITY).sample(0, 2)
    assert torch.allclose(ep.query_x, ep.support_x.repeat_interleave(3, 1), atol=1e-5)


def test_the_class_structure_of_the_pool_is_never_used() -> None:
    pool = shapes_pool(classes=12, per_class=5)
    regrouped = pool.reshape(6, 10, *pool.shape[2:])  # same images, same order, other "classes"
    sampler = AugmentedTasks(pool, 5, 2, 3, seed=9)
    for index in range(3):
        a, b = sampler.sample(index, 2), AugmentedTasks(regrouped, 5, 2, 3, seed=9).sample(index, 2)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    tensors = [value for value in vars(sampler).values() if isinstance(value, torch.Tensor)]
    assert [tuple(t.shape) for t in tensors] == [(60, 1, SIDE, SIDE)]
    assert tensors[0]._base is None, "a copy, not a view of the class-shaped pool"


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        AugmentedTasks(shapes_pool().float(), 5, 1, 1)
    with pytest.raises(ValueError, match="n_way"):
        AugmentedTasks(shapes_pool(classes=2, per_class=3), 7, 1, 1)
    with pytest.raises(ValueError, match="k_shot"):
        AugmentedTasks(shapes_pool(), 5, 0, 1)


def test_default_strength_is_the_documented_choice() -> None:
    assert (DEFAULT.rotation, DEFAULT.scale, DEFAULT.translate, DEFAULT.background) == (
        15,
        (0.8, 1.1),
        0.1,
        0,
    )
    assert math.isclose(DEFAULT.drop, 0.1) and math.isclose(DEFAULT.erase, 0.2)


# -------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"construction": "clustered"}, "must be one of"),
        ({"dataset": "sinusoid", "ways": 1, "construction": "augmented"}, "built from Omniglot"),
        ({"construction": "augmented", "label_assignment": "fixed"}, "must be 'shuffled'"),
        ({"construction": "augmented", "label_assignment": "fixed_labels"}, "must be 'shuffled'"),
    ],
)
def test_bad_construction_names_the_key(task: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_config_from_dict({"algo": "protonet", "task": task})
    assert info.value.key == "task.construction"
    assert message in str(info.value)


def test_run_names_mark_augmented_tasks() -> None:
    assert TaskConfig(ways=5).name == "omniglot-5w1s"
    assert TaskConfig(ways=5, construction="augmented").name == "omniglot-5w1s-aug"
    config = run_config_from_dict({"algo": "protonet", "task": {"construction": "augmented"}})
    assert config.task.construction == "augmented"


@pytest.fixture
def fake_omniglot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make_sampler`` on Omniglot without the data: each part a shapes pool of its own size."""
    sizes = {"train": 30, "trainval": 36, "val": 11, "test": 13}
    monkeypatch.setattr(omniglot, "load", lambda root, size=28: None)
    monkeypatch.setattr(
        tasks_module.omniglot,
        "split_classes",
        lambda data, root, split, part: omniglot.ClassSplit(shapes_pool(sizes[part], 20), []),
    )


@pytest.mark.usefixtures("fake_omniglot")
def test_make_sampler_augments_training_tasks_only() -> None:
    cfg = TaskConfig(ways=5, queries=4, train_ways=20, train_queries=3, construction="augmented")
    train = make_sampler(cfg, "train", 0, Path("."))
    assert isinstance(train, AugmentedTasks)
    assert (train.n_way, train.k_shot, train.q_query, train.images.shape[0]) == (20, 1, 3, 30 * 20)
    for part in ("val", "test"):  # evaluation: the real labelled classes
        sampler = make_sampler(cfg, part, 0, Path("."))
        assert isinstance(sampler, EpisodeSampler) and sampler.n_way == 5 and sampler.q_query == 4
    trainval = make_sampler(dataclasses.replace(cfg, train_part="trainval"), "train", 0, Path("."))
    assert isinstance(trainval, AugmentedTasks) and trainval.images.shape[0] == 36 * 20
    labeled = make_sampler(dataclasses.replace(cfg, construction="labeled"), "train", 0, Path("."))
    assert isinstance(labeled, EpisodeSampler)
    probe = eval_sampler(cfg, "probe", 0, Path("."))  # the memorisation probe wraps the augmented tasks
    assert isinstance(probe, SupportSwapped) and isinstance(probe.base, AugmentedTasks)
    assert probe.sample(0, 2).query_x.shape == (2, 60, 1, SIDE, SIDE)
