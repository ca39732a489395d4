"""Unsupervised tasks from augmentation (UMTRA / AAL): N random unlabeled images, each its own class.

Khodadadeh et al., "Unsupervised Meta-Learning for Few-Shot Image Classification" (UMTRA, NeurIPS 2019) and
Antoniou & Storkey, "Assume, Augment and Learn" (AAL, 2019) build meta-training tasks without labels: draw N
images at random, call image ``i`` class ``i``, and make the query set out of augmented views of those same
images. With many underlying classes and small N, two draws rarely share a class, so the tasks are mostly
right, and the learner meta-learns on them as on labelled tasks. Evaluation stays on real labelled tasks.

The augmentations here are batched tensor ops driven by one ``torch.Generator``: one ``affine_grid`` +
``grid_sample`` for the whole batch, then a random erased rectangle and random pixel zeroing (UMTRA used
random pixel zeroing plus shifts on Omniglot). Images are float ``(B, C, H, W)`` in ``[0, 1]`` with ink on a
uniform background; metalab stores Omniglot ink as 1 on a 0 background (:mod:`metalab.data.omniglot`), which
is the default :attr:`Augmentation.background`. Everything a transform uncovers or removes becomes
background, so a view never gains a border or a hole of the wrong colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalab.data.episodes import Episode, generator_for


@dataclass(frozen=True)
class Augmentation:
    """Strength of each random transform. The defaults suit 28x28 Omniglot characters.

    Omniglot drawings at 28x28 fill much of the frame: the ink's bounding box is 17 px tall at the median and
    22 px at the 90th percentile, leaving about 5 px (median) and 3 px (90th percentile) of margin on each
    side. Hence a translation of at most 10% of the side (2.8 px, not the 15% often used on larger images)
    and a scale of 0.8-1.1 (shrinking is safe, enlarging eats margin): measured on the Vinyals training
    images at the extreme scale 1.1, the warp keeps 99% of the ink on average and over 87% for all but 1% of
    the views (translation 15% with scale 1.2 keeps under 83% for 5% of them). Rotation up to 15 degrees and
    shear up to 10 degrees change the hand, not the character (a 90-degree turn is another class in the
    Vinyals split). Pixel zeroing at 10% thins and breaks the 2-3 px strokes without erasing them, and a
    rectangle of side up to 20% (5.6 px) hides a part of the character the way an occlusion does, rarely a
    whole stroke. :data:`IDENTITY` (every strength zero) leaves images unchanged.
    """

    rotation: float = 15.0
    """Largest rotation, in degrees (uniform in ``[-rotation, rotation]``)."""
    scale: tuple[float, float] = (0.8, 1.1)
    """Range of the isotropic scale factor (uniform); ``> 1`` enlarges the character."""
    shear: float = 10.0
    """Largest horizontal shear angle, in degrees (uniform in ``[-shear, shear]``)."""
    translate: float = 0.1
    """Largest shift along each axis, as a fraction of the image side (uniform in ``[-t, t]``)."""
    erase: float = 0.2
    """Largest side of the erased rectangle, as a fraction of the image side (uniform in ``[0, erase]``)."""
    drop: float = 0.1
    """Probability that a pixel is set to the background."""
    background: float = 0.0
    """Background value: padding of the warp and the value of erased or zeroed pixels."""


DEFAULT = Augmentation()
"""The augmentation :class:`AugmentedTasks` uses unless told otherwise."""
IDENTITY = Augmentation(rotation=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.0, erase=0.0, drop=0.0)
"""Zero strength everywhere: :func:`augment` returns its input (up to float rounding of the warp)."""


def symmetric(n: int, bound: float, g: torch.Generator) -> torch.Tensor:
    """``n`` draws uniform in ``[-bound, bound]``."""
    return (torch.rand(n, generator=g) * 2 - 1) * bound


def affine_matrices(
    angle: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``(B, 2, 3)`` sampling matrices for ``F.affine_grid`` of the forward maps ``p -> A p + shift``.

    ``A = rotation(angle) @ shear_x(shear) * scale`` in normalised coordinates (``[-1, 1]`` across the image;
    square images assumed, as Omniglot's are). ``affine_grid`` wants the inverse map (output pixel -> where to
    read in the input), so the result is ``[A^-1 | -A^-1 shift]``: a positive ``scale`` above 1 then really
    enlarges and a positive shift really moves the ink right/down. Angles in radians, ``shift`` ``(B, 2)``.
    """
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    shear_x = torch.stack([torch.stack([one, shear.tan()], -1), torch.stack([zero, one], -1)], -2)
    forward = rotate @ shear_x * scale[:, None, None]
    inverse = torch.linalg.inv(forward)
    return torch.cat([inverse, -(inverse @ shift[..., None])], -1)


def random_affine(images: torch.Tensor, g: torch.Generator, aug: Augmentation) -> torch.Tensor:
    """Each image warped by its own random rotation, scale, shear and shift (one ``grid_sample`` call).

    Bilinear sampling; what comes from outside the image is ``aug.background`` (the warp runs on
    ``images - background`` with zero padding, then adds it back).
    """
    b = images.shape[0]
    angle = symmetric(b, math.radians(aug.rotation), g)
    low, high = aug.scale
    scale = low + torch.rand(b, generator=g) * (high - low)
    shear = symmetric(b, math.radians(aug.shear), g)
    shift = symmetric(2 * b, 2 * aug.translate, g).view(b, 2)  # the side is 2 in normalised coordinates
    theta = affine_matrices(angle, scale, shear, shift).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(
        images - aug.background, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped + aug.background


def random_erase(images: torch.Tensor, g: torch.Generator, aug: Augmentation) -> torch.Tensor:
    """Each image with one axis-aligned rectangle set to the background (a cutout).

    The rectangle's centre is uniform over the image and each side uniform in ``[0, aug.erase]`` of the image
    side; pixels whose centres lie strictly inside are erased, so a side of 0 erases nothing.
    """
    b, _, h, w = images.shape
    centre = torch.rand(b, 2, generator=g) * torch.tensor([h, w])
    half = torch.rand(b, 2, generator=g) * aug.erase * torch.tensor([h, w]) / 2
    centre, half = centre.to(images.device), half.to(images.device)
    rows = ((torch.arange(h, device=images.device) + 0.5) - centre[:, :1]).abs() < half[:, :1]  # (B, H)
    cols = ((torch.arange(w, device=images.device) + 0.5) - centre[:, 1:]).abs() < half[:, 1:]  # (B, W)
    inside = (rows[:, :, None] & cols[:, None, :])[:, None]  # (B, 1, H, W)
    return images.masked_fill(inside, aug.background)


def random_zero(images: torch.Tensor, g: torch.Generator, aug: Augmentation) -> torch.Tensor:
    """Each pixel (all channels together) set to the background with probability ``aug.drop``."""
    b, _, h, w = images.shape
    dropped = (torch.rand(b, 1, h, w, generator=g) < aug.drop).to(images.device)
    return images.masked_fill(dropped, aug.background)


def augment(images: torch.Tensor, g: torch.Generator, aug: Augmentation = DEFAULT) -> torch.Tensor:
    """Random views of float images ``(B, C, H, W)`` in ``[0, 1]``: warp, erase a rectangle, zero pixels.

    Every random number comes from ``g`` (drawn on the CPU, whatever the images' device), so the same
    generator state gives the same views. The result stays in ``[0, 1]``.
    """
    if images.shape[0] == 0:
        return images
    views = random_affine(images, g, aug)
    views = random_erase(views, g, aug)
    views = random_zero(views, g, aug)
    return views.clamp_(0.0, 1.0)


class AugmentedTasks:
    """Draws batches of N-way K-shot Q-query episodes from unlabeled images: UMTRA / AAL task construction.

    A task draws N distinct images at random; image ``i`` is class ``i``. Its support set is the image itself
    (shot 0) and ``K - 1`` augmented views of it; its query set is ``Q`` further augmented views. Same
    interface, shapes, dtypes and labels (``0..N-1``, grouped by class) as
    :class:`~metalab.data.episodes.EpisodeSampler`, and likewise a pure function of ``(seed, index)``.

    Args:
        pool: ``(n_classes, n_per_class, C, H, W)`` uint8 images, as ``EpisodeSampler`` takes. It is flattened
            at once into a copied ``(M, C, H, W)`` image set: the class structure is neither kept nor read (not
            even through a view), so no label can reach a task.
        n_way: images (classes) per episode (N); at most the number of images.
        k_shot: support examples per class (K): the image itself, then ``K - 1`` views of it.
        q_query: query examples per class: views of the image.
        seed: the sampler's stream; batch ``index`` of seed ``s`` is always the same episodes.
        aug: the augmentation of the views (:data:`DEFAULT`).
    """

    def __init__(
        self,
        pool: torch.Tensor,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        aug: Augmentation = DEFAULT,
    ):
        if pool.dtype != torch.uint8 or pool.dim() != 5:
            raise ValueError(
                f"pool must be uint8 (classes, samples, C, H, W), got {pool.dtype} {tuple(pool.shape)}"
            )
        images = pool.reshape(-1, *pool.shape[2:]).clone()  # (M, C, H, W): no class axis, not a view
        if not 1 <= n_way <= images.shape[0]:
            raise ValueError(f"n_way={n_way} but the pool has {images.shape[0]} images")
        if k_shot < 1 or q_query < 0:
            raise ValueError(f"need k_shot >= 1 and q_query >= 0, got k_shot={k_shot} q_query={q_query}")
        self.images, self.n_way, self.k_shot, self.q_query, self.seed = images, n_way, k_shot, q_query, seed
        self.aug = aug

    def sample(self, index: int, tasks: int) -> Episode:
        """Episode batch number ``index`` with ``tasks`` tasks; images as float in [0, 1]."""
        g = generator_for(self.seed, index)
        n, k, q = self.n_way, self.k_shot, self.q_query
        picks = torch.multinomial(torch.ones(tasks, self.images.shape[0]), n, replacement=False, generator=g)
        originals = self.images[picks].float().div_(255.0)  # (T, N, C, H, W)
        shape = originals.shape[2:]
        copies = originals[:, :, None].expand(tasks, n, k - 1 + q, *shape).reshape(-1, *shape)
        views = augment(copies, g, self.aug).view(tasks, n, k - 1 + q, *shape)
        support_x = torch.cat([originals[:, :, None], views[:, :, : k - 1]], 2).view(tasks, n * k, *shape)
        query_x = views[:, :, k - 1 :].reshape(tasks, n * q, *shape)
        labels = torch.arange(n)
        support_y = labels.repeat_interleave(k).expand(tasks, -1).contiguous()
        query_y = labels.repeat_interleave(q).expand(tasks, -1).contiguous()
        return Episode(support_x, support_y, query_x, query_y, n, k, q)
