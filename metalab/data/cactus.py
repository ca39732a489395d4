"""CACTUs: meta-training tasks from clusters of an unsupervised embedding, no label read.

Hsu, Levine & Finn, "Unsupervised Learning via Meta-Learning" (ICLR 2019) build meta-training tasks from
unlabeled images in three steps: learn an embedding of the images without labels; cluster the embedding with
k-means many times, each time after rescaling every dimension by a random factor, so that each run gives a
different *partition* of the images; then draw each task from one partition, its N classes N clusters of it
and its shots and queries images of those clusters. The meta-learner trains on these tasks as on labelled
ones; evaluation stays on real labelled tasks. ``task.construction: cactus`` (:mod:`metalab.data.tasks`) does
this on the images of the Omniglot training part, with their class structure dropped at once
(:func:`tasks_from_pool`): no label can reach a task, the embedding or the clustering.

The pieces, each usable alone:

- :func:`train_embedding`: a small conv encoder (:mod:`metalab.models.embedding`) trained on the images only;
  it returns the embedding and its training seconds. ``contrastive`` (the default) trains it with a SimCLR
  loss on two views of each image made by :func:`metalab.data.augment.augment`; ``autoencoder`` trains it to
  reconstruct the image. Why contrastive by default: a cluster should be one character, and the contrastive
  loss asks exactly that the views a character's drawings differ by (a slightly other hand, position, slant,
  missing pixels: the augmentations of :mod:`metalab.data.augment`, tuned to Omniglot) map close together,
  while a reconstruction loss spends its capacity on pixel detail (stroke position and thickness) that
  separates two drawings of one character as much as two characters. The paper used ACAI and BiGAN
  embeddings, which are GANs or adversarially regularised autoencoders, far more costly to train on a CPU.
- :func:`make_partitions`: ``P`` k-means partitions (:mod:`metalab.data.kmeans`) of ``k`` clusters each,
  every partition on the embedding rescaled by its own random factors (uniform in ``[0, 1)``, one per
  dimension; drawn per group of :data:`PARTITIONS_PER_GROUP` partitions from ``(seed, group)``, so the first
  partitions do not change when ``P`` grows).
- :class:`CactusTasks`: the task sampler, reading only the images and the cluster ids.

The embedding and the partitions are cached under the cache root (``$METALAB_CACHE``, else
``~/.cache/metalab``; :func:`metalab.data.root.cache_root`) in ``cactus/``: the embedding keyed by a digest of
the images and its settings, the partitions by a digest of the embedding and theirs. Files are written
atomically; one that is unreadable, of another version or key, or whose tensors are not what they must be is
ignored and computed again. Each file records the seconds its computation took, so a run that finds it cached
can still report what it cost (:attr:`CactusTasks.timings`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F

from metalab.config import MAX_SEED, MAX_STEPS, MAX_UNITS, require_between
from metalab.data.augment import augment
from metalab.data.episodes import Episode, generator_for
from metalab.data.kmeans import kmeans
from metalab.data.root import cache_root
from metalab.errors import ConfigError
from metalab.models.embedding import ContrastiveEmbedding, ConvAutoencoder, ConvEncoder
from metalab.progress import progress
from metalab.utils import atomic_path

log = logging.getLogger(__name__)

EmbeddingKind = Literal["contrastive", "autoencoder"]

MAX_PARTITIONS = 1_000
"""Most partitions (k-means runs) of one CACTUs task distribution."""
MAX_CLUSTERS = 100_000
"""Most clusters per partition (the training images bound it too)."""
MAX_ITERATIONS = 1_000
"""Most Lloyd iterations of one k-means run."""
PARTITIONS_PER_GROUP = 10
"""Partitions clustered together by one batched :func:`kmeans` call, with one random stream per group."""
CACHE_VERSION = 1
BATCH = 256
"""Images per step of embedding training (the contrastive loss sees two views of each)."""
LEARNING_RATE = 1e-3
"""Adam's learning rate for the embedding."""
TEMPERATURE = 0.1
"""Temperature of the contrastive (NT-Xent) loss."""
WIDTH = 32
"""Filters of the encoder's first conv block (:class:`~metalab.models.embedding.ConvEncoder`)."""


@dataclass(frozen=True)
class CactusConfig:
    """How CACTUs builds its training tasks (the ``task.cactus`` section, with ``task.construction: cactus``).

    The defaults keep the unsupervised stage to a few CPU minutes on the 82,240 images of Omniglot's Vinyals
    training part (1028 characters in 4 rotations, 20 drawings each): measured on an otherwise idle core,
    130 s of embedding training and 56 s of clustering, both cached. ``partitions`` buys task diversity with
    clustering time, ``clusters`` sets how fine a class is (500 clusters hold about 160 images each, 2000
    about 40; clustering time grows with it: 257 s for 2000). The paper's own settings were not checked here.
    """

    partitions: int = 20
    """P: k-means runs, each on the embedding rescaled by its own random factors; a task draws from one."""
    clusters: int = 500
    """k: clusters per partition. A task's N classes are N clusters of at least K + Q images."""
    iterations: int = 15
    """Most Lloyd iterations per k-means run (it stops earlier once no assignment changes)."""
    embedding: EmbeddingKind = "contrastive"
    """The unsupervised embedding: ``contrastive`` (SimCLR loss on augmented views) or ``autoencoder``
    (reconstruction); see :func:`train_embedding`."""
    embedding_steps: int = 1000
    """Training steps of the embedding (Adam, 256 images a step); 0 keeps the random initial encoder."""
    embedding_dim: int = 64
    """Size of the embedding that is clustered."""
    seed: int = 0
    """Seed of the embedding's training and of the partitions: part of the task distribution's definition
    (like a class split), not the run's seed, so runs of several seeds share one cached clustering."""

    def __post_init__(self) -> None:
        require_between(self.partitions, "partitions", 1, MAX_PARTITIONS)
        require_between(self.clusters, "clusters", 2, MAX_CLUSTERS)
        require_between(self.iterations, "iterations", 1, MAX_ITERATIONS)
        require_between(self.embedding_steps, "embedding_steps", 0, MAX_STEPS)
        require_between(self.embedding_dim, "embedding_dim", 1, MAX_UNITS)
        require_between(self.seed, "seed", 0, MAX_SEED)


# ------------------------------------------------------------------------------------------ the embedding


class Embedded(NamedTuple):
    """An embedding of every image and what it cost to learn."""

    vectors: torch.Tensor  # (M, D) float32, one row per image, in the images' order
    seconds: float  # wall-clock seconds of training and embedding (0 for an untrained encoder's pass alone)


def contrastive_loss(z: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """NT-Xent (SimCLR) over ``2B`` unit vectors whose rows ``i`` and ``i + B`` are two views of one image.

    Each view's positive is its twin; the other ``2B - 2`` views are its negatives (cross-entropy over the
    cosine similarities divided by ``temperature``, the view itself left out).
    """
    n = z.shape[0] // 2
    sim = (z @ z.T) / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, twin)


def encode(encoder: ConvEncoder, images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``(M, D)`` outputs of ``encoder`` (in eval mode, no gradient) on uint8 images ``(M, C, H, W)``."""
    encoder.eval()
    with torch.no_grad():
        return torch.cat([encoder(images[i : i + chunk].float() / 255) for i in range(0, len(images), chunk)])


def train_embedding(
    images: torch.Tensor,
    kind: EmbeddingKind = "contrastive",
    steps: int = 1000,
    dim: int = 64,
    seed: int = 0,
) -> Embedded:
    """Train a small conv encoder on ``images`` alone and embed them all: the vectors and the seconds it took.

    ``contrastive``: each step draws :data:`BATCH` images, makes two random views of each
    (:func:`~metalab.data.augment.augment`, its Omniglot defaults) and minimises :func:`contrastive_loss` on
    the projections of :class:`~metalab.models.embedding.ContrastiveEmbedding`; the embedding is the encoder's
    output scaled to unit length (the loss compares directions). ``autoencoder``: each step reconstructs
    :data:`BATCH` images through :class:`~metalab.models.embedding.ConvAutoencoder` (per-pixel binary
    cross-entropy); the embedding is the bottleneck, standardised per dimension so that no dimension's scale
    decides the clustering before CACTUs' random rescaling does. Adam at :data:`LEARNING_RATE`, on the CPU.

    Args:
        images: ``(M, C, H, W)`` uint8 images, ink 255 on a 0 background (no labels: there are none here).
        kind: ``contrastive`` or ``autoencoder``.
        steps: training steps; 0 embeds with the randomly initialised encoder.
        dim: size of the embedding.
        seed: seeds the initial weights, the batches and the views (the global RNG state is left as it was).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (M, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if kind not in ("contrastive", "autoencoder"):
        raise ValueError(f"unknown embedding kind {kind!r}; choose 'contrastive' or 'autoencoder'")
    start = time.perf_counter()
    _, channels, side, _ = images.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (ContrastiveEmbedding if kind == "contrastive" else ConvAutoencoder)(
            channels, WIDTH, dim, side
        )
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    with progress(steps, f"cactus {kind} embedding", "step") as bar:
        for _ in range(steps):
            x = images[torch.randint(len(images), (BATCH,), generator=g)].float() / 255  # (B, C, H, W)
            if kind == "contrastive":
                loss = contrastive_loss(model(augment(torch.cat([x, x]), g)))
            else:
                loss = F.binary_cross_entropy_with_logits(model(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
    vectors = encode(model.encoder, images)  # (M, D)
    if kind == "contrastive":
        vectors = F.normalize(vectors, dim=1)
    else:
        vectors = (vectors - vectors.mean(0)) / vectors.std(0).clamp(min=1e-6)
    return Embedded(vectors, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ partitions


class Partitions(NamedTuple):
    """``P`` clusterings of the same images and what they cost."""

    labels: torch.Tensor  # (P, M) int64: cluster id (0..k-1) of each image in each partition
    seconds: float  # wall-clock seconds of the k-means runs


def make_partitions(
    embedding: torch.Tensor, partitions: int, clusters: int, iterations: int = 15, seed: int = 0
) -> Partitions:
    """``partitions`` k-means clusterings of ``embedding`` ``(M, D)``, each after a random rescaling.

    Partition ``p`` clusters ``embedding * s_p`` with ``s_p`` ``(D,)`` uniform in ``[0, 1)`` (k-means++
    seeding, at most ``iterations`` Lloyd iterations), run as dimension weights ``s_p ** 2`` by
    :func:`kmeans`, which gives the same clusters without copying the points. Partitions are clustered in
    groups of :data:`PARTITIONS_PER_GROUP`, group ``j`` drawing its scalings and seedings from ``(seed, j)``.
    """
    x = embedding.float()
    start = time.perf_counter()
    labels = []
    with progress(partitions, "cactus k-means partitions", "partition") as bar:
        for group, first in enumerate(range(0, partitions, PARTITIONS_PER_GROUP)):
            size = min(PARTITIONS_PER_GROUP, partitions - first)
            g = generator_for(seed, group)
            scales = torch.rand(size, x.shape[1], generator=g)  # (B, D)
            result = kmeans(x, clusters, weights=scales**2, iterations=iterations, generator=g)
            labels.append(result.assignments)
            bar.update(size)
    return Partitions(torch.cat(labels), time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- caching


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a CPU tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()


def embedding_key(images: torch.Tensor, cfg: CactusConfig) -> str:
    """Cache key of the embedding of ``images``: their digest and every setting the embedding depends on."""
    settings = [cfg.embedding, cfg.embedding_steps, cfg.embedding_dim, cfg.seed, BATCH, LEARNING_RATE, WIDTH]
    if cfg.embedding == "contrastive":
        settings.append(TEMPERATURE)
    return _key("embedding", tensor_digest(images), settings)


def partitions_key(embedding: torch.Tensor, cfg: CactusConfig) -> str:
    """Cache key of the partitions of ``embedding``: its digest and the clustering settings."""
    settings = [cfg.partitions, cfg.clusters, cfg.iterations, cfg.seed, PARTITIONS_PER_GROUP]
    return _key("partitions", tensor_digest(embedding), settings)


def cache_file(what: str, key: str) -> Path:
    """``<cache root>/cactus/<what>_<key prefix>.pt``."""
    return cache_root() / "cactus" / f"{what}_{key[:16]}.pt"


def _read(path: Path, key: str) -> dict[str, Any] | None:
    """A cache file's dict if it is readable and of this version and key, else None (logged)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if isinstance(blob, dict) and blob.get("version") == CACHE_VERSION and blob.get("key") == key:
            return blob
        log.info("CACTUs cache %s is for other settings or an older format; computing again", path)
    except (
        OSError,
        RuntimeError,
        EOFError,
        KeyError,
        AttributeError,
        TypeError,
        pickle.UnpicklingError,
    ) as e:
        log.warning("ignoring unreadable CACTUs cache %s (%s); computing again", path, e)
    return None


def _write(path: Path, key: str, **tensors: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save({"version": CACHE_VERSION, "key": key, **tensors}, tmp)


def cached_embedding(images: torch.Tensor, cfg: CactusConfig) -> Embedded:
    """:func:`train_embedding` of ``images`` with ``cfg``'s settings, from the cache when it holds it."""
    key = embedding_key(images, cfg)
    path = cache_file(f"embedding_{cfg.embedding}", key)
    blob = _read(path, key)
    if blob is not None:
        vectors, seconds = blob.get("vectors"), blob.get("seconds")
        shape = (images.shape[0], cfg.embedding_dim)
        if (
            isinstance(vectors, torch.Tensor)
            and vectors.dtype == torch.float32
            and tuple(vectors.shape) == shape
            and bool(vectors.isfinite().all())
            and isinstance(seconds, float)
        ):
            return Embedded(vectors, seconds)
        log.warning("CACTUs cache %s does not hold a (%d, %d) embedding; computing again", path, *shape)
    log.info(
        "training the CACTUs %s embedding (%d steps) on %d images",
        cfg.embedding,
        cfg.embedding_steps,
        len(images),
    )
    embedded = train_embedding(images, cfg.embedding, cfg.embedding_steps, cfg.embedding_dim, cfg.seed)
    _write(path, key, vectors=embedded.vectors, seconds=embedded.seconds)
    return embedded


def cached_partitions(embedding: torch.Tensor, cfg: CactusConfig) -> Partitions:
    """:func:`make_partitions` of ``embedding`` with ``cfg``'s settings, from the cache when it holds them."""
    key = partitions_key(embedding, cfg)
    path = cache_file("partitions", key)
    blob = _read(path, key)
    if blob is not None:
        labels, seconds = blob.get("labels"), blob.get("seconds")
        if (
            isinstance(labels, torch.Tensor)
            and labels.dtype == torch.int32
            and tuple(labels.shape) == (cfg.partitions, embedding.shape[0])
            and int(labels.min()) >= 0
            and int(labels.max()) < cfg.clusters
            and isinstance(seconds, float)
        ):
            return Partitions(labels.long(), seconds)
        log.warning(
            "CACTUs cache %s does not hold %d partitions of the embedding; computing again",
            path,
            cfg.partitions,
        )
    made = make_partitions(embedding, cfg.partitions, cfg.clusters, cfg.iterations, cfg.seed)
    _write(path, key, labels=made.labels.to(torch.int32), seconds=made.seconds)
    return made


# ------------------------------------------------------------------------------------------------ tasks


def distinct_draws(sizes: torch.Tensor, r: int, g: torch.Generator) -> torch.Tensor:
    """``(*sizes.shape, r)`` draws, for each entry ``n`` of ``sizes`` ``r`` distinct integers of ``[0, n)`` in
    random order (every ``n >= r``).

    Robert Floyd's sampling, vectorised over the entries: for ``j = n - r .. n - 1`` draw ``t`` uniform in
    ``[0, j]`` and keep ``t``, or ``j`` itself when ``t`` is already kept; every ``r``-subset is equally
    likely.
    Then a random order. Memory and time do not depend on ``n`` (clusters may hold thousands of images).
    """
    chosen = torch.empty(*sizes.shape, r, dtype=torch.long)
    for j in range(r):
        top = sizes - r + j  # (...)
        t = (torch.rand(sizes.shape, generator=g, dtype=torch.float64) * (top + 1)).long().clamp_(max=top)
        taken = (chosen[..., :j] == t[..., None]).any(-1)
        chosen[..., j] = torch.where(taken, top, t)
    order = torch.rand(chosen.shape, generator=g).argsort(-1)
    return chosen.gather(-1, order)


class CactusTasks:
    """Draws batches of N-way K-shot Q-query episodes whose classes are clusters: CACTUs task construction.

    A task picks one partition uniformly among those with at least N clusters of at least ``K + Q`` images,
    then N distinct such clusters of it uniformly, then ``K + Q`` distinct images of each uniformly: the first
    K are the class's shots, the rest its queries. Same interface, shapes, dtypes and labels (``0..N-1`` in
    the order the clusters were drawn, grouped by class) as :class:`~metalab.data.episodes.EpisodeSampler`,
    and likewise a pure function of ``(seed, index)``. It is given images and cluster ids, nothing else.

    Args:
        images: ``(M, C, H, W)`` uint8 images.
        partitions: ``(P, M)`` integer cluster id of each image in each partition.
        n_way: clusters (classes) per episode (N).
        k_shot: support images per class (K).
        q_query: query images per class (Q).
        seed: the sampler's stream; batch ``index`` of seed ``s`` is always the same episodes.
        timings: what building the clusters cost, for records (e.g. ``embedding_seconds``); not used here.
    """

    def __init__(
        self,
        images: torch.Tensor,
        partitions: torch.Tensor,
        n_way: int,
        k_shot: int,
        q_query: int,
        *,
        seed: int = 0,
        timings: dict[str, float] | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (M, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if partitions.dim() != 2 or partitions.shape[1] != images.shape[0] or partitions.is_floating_point():
            raise ValueError(
                f"partitions must be integer (P, {images.shape[0]}), got {partitions.dtype} "
                f"{tuple(partitions.shape)}"
            )
        if n_way < 1 or k_shot < 1 or q_query < 0:
            raise ValueError(f"need n_way, k_shot >= 1 and q_query >= 0, got {n_way}, {k_shot}, {q_query}")
        labels = partitions.long()
        if int(labels.min()) < 0:
            raise ValueError("cluster ids must be >= 0")
        clusters = int(labels.max()) + 1
        p = labels.shape[0]
        offsets = torch.arange(p)[:, None] * clusters
        counts = torch.bincount((labels + offsets).flatten(), minlength=p * clusters).view(p, clusters)
        eligible = counts >= k_shot + q_query  # (P, k)
        usable = (eligible.sum(1) >= n_way).nonzero().flatten()
        if len(usable) == 0:
            raise ValueError(
                f"no partition has {n_way} clusters of at least {k_shot + q_query} images "
                "(k_shot + q_query); "
                f"the largest count of such clusters is {int(eligible.sum(1).max())}"
            )
        self.images, self.n_way, self.k_shot, self.q_query, self.seed = images, n_way, k_shot, q_query, seed
        self.usable = usable  # (U,) partitions a task may come from
        self.eligible = eligible[usable]  # (U, k)
        self.counts = counts[usable]  # (U, k)
        self.starts = self.counts.cumsum(1) - self.counts  # (U, k): where each cluster begins in `members`
        self.members = labels[usable].argsort(dim=1, stable=True)  # (U, M): image indices grouped by cluster
        self.timings = dict(timings or {})

    def sample(self, index: int, tasks: int) -> Episode:
        """Episode batch number ``index`` with ``tasks`` tasks; images as float in [0, 1]."""
        g = generator_for(self.seed, index)
        n, k, q = self.n_way, self.k_shot, self.q_query
        part = torch.randint(len(self.usable), (tasks,), generator=g)  # (T,)
        clusters = torch.multinomial(self.eligible[part].float(), n, replacement=False, generator=g)  # (T, N)
        rows = part[:, None]
        ranks = distinct_draws(self.counts[rows, clusters], k + q, g)  # (T, N, K+Q)
        picks = self.members[rows[..., None], self.starts[rows, clusters][..., None] + ranks]  # (T, N, K+Q)
        images = self.images[picks].float().div_(255.0)  # (T, N, K+Q, C, H, W)
        shape = images.shape[3:]
        support_x = images[:, :, :k].reshape(tasks, n * k, *shape)
        query_x = images[:, :, k:].reshape(tasks, n * q, *shape)
        labels = torch.arange(n)
        support_y = labels.repeat_interleave(k).expand(tasks, -1).contiguous()
        query_y = labels.repeat_interleave(q).expand(tasks, -1).contiguous()
        return Episode(support_x, support_y, query_x, query_y, n, k, q)


def tasks_from_pool(
    pool: torch.Tensor, cfg: CactusConfig, n_way: int, k_shot: int, q_query: int, seed: int = 0
) -> CactusTasks:
    """CACTUs tasks over the images of a class pool, its class structure dropped first.

    ``pool`` ``(n_classes, n_per_class, C, H, W)`` uint8 (as :class:`~metalab.data.episodes.EpisodeSampler`
    takes it) is flattened at once into a copied ``(M, C, H, W)`` image set; the embedding
    (:func:`cached_embedding`), the partitions (:func:`cached_partitions`) and the sampler see only that. The
    sampler's :attr:`~CactusTasks.timings` hold ``embedding_seconds`` and ``clustering_seconds``: what the
    two stages took when they were computed (now, or by the run that cached them).

    A :class:`~metalab.errors.ConfigError` naming ``task.cactus.clusters`` says when there are more clusters
    than images, or too few clusters of ``k_shot + q_query`` images for ``n_way``-way tasks.
    """
    if pool.dtype != torch.uint8 or pool.dim() != 5:
        raise ValueError(
            f"pool must be uint8 (classes, samples, C, H, W), got {pool.dtype} {tuple(pool.shape)}"
        )
    images = pool.reshape(-1, *pool.shape[2:]).clone()  # (M, C, H, W): no class axis, not a view
    if cfg.clusters > images.shape[0]:
        raise ConfigError("task.cactus.clusters", f"{cfg.clusters} clusters of only {images.shape[0]} images")
    embedded = cached_embedding(images, cfg)
    made = cached_partitions(embedded.vectors, cfg)
    timings = {"embedding_seconds": embedded.seconds, "clustering_seconds": made.seconds}
    try:
        return CactusTasks(images, made.labels, n_way, k_shot, q_query, seed=seed, timings=timings)
    except ValueError as e:
        raise ConfigError(
            "task.cactus.clusters", f"{e}; use fewer clusters, ways, shots or queries"
        ) from None
