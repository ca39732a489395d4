"""Which tasks a run learns from: the ``task`` section of a config, turned into samplers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from metalab.config import require, require_between
from metalab.data import alphabet, omniglot, omniglot_install
from metalab.data.augment import AugmentedTasks
from metalab.data.cactus import CactusConfig, CactusTasks, tasks_from_pool
from metalab.data.episodes import ClassBatchSampler, EpisodeSampler, LabelAssignment, SupportSwapped
from metalab.data.sinusoid import NME_FEATURES, SinusoidTasks
from metalab.errors import ConfigError
from metalab.train.evaluate import PARTS, part_seed

Part = Literal["train", "val", "trainval", "test"]

MAX_WAYS = 4 * 1623
"""Most classes per episode: Omniglot's 1623 characters in four rotations."""
MAX_EXAMPLES = 10_000
"""Most shots or queries per class (sinusoid points; Omniglot allows 20 drawings in all)."""
MAX_IMAGE_SIZE = 105
"""Largest Omniglot image side: the drawings' own size (larger would only upsample)."""


@dataclass(frozen=True)
class TaskConfig:
    """The task distribution: data set, split and episode shape."""

    dataset: Literal["sinusoid", "omniglot"] = "omniglot"
    """``sinusoid`` (regression, no download) or ``omniglot`` (read from the data root)."""
    split: Literal["vinyals", "lake"] = "vinyals"
    """Omniglot class split: Vinyals (rotations as classes) or Lake (background vs evaluation)."""
    ways: int = 5
    """N: classes per episode (1 for regression)."""
    shots: int = 1
    """K: support examples per class."""
    queries: int = 15
    """Q: query examples per class."""
    train_ways: int | None = None
    """Ways during training when different from test (ProtoNets train 60-way); null: same as ``ways``."""
    train_queries: int | None = None
    """Queries per class during training when different from test; null: same as ``queries``."""
    image_size: int = 28
    """Omniglot images are resized to this side once, when decoded."""
    train_part: Literal["train", "trainval"] = "train"
    """Omniglot part to train on. ``trainval`` also trains on the val classes (as the ProtoNet and Matching
    papers did for their final numbers): the periodic val evaluation is then on trained classes, and
    ``train.keep_best`` refuses val metrics."""
    data_root: str | None = None
    """Data root; null: ``--data-root``, else ``$METALAB_DATA``, else ``~/.cache/metalab``."""
    label_assignment: LabelAssignment = "shuffled"
    """Training tasks: ``shuffled`` (mutually exclusive, the usual protocol) or non-mutually-exclusive, where
    one function of the input solves every training task (Yin et al., ICLR 2020). Omniglot: ``fixed`` splits
    the training classes once into fixed groups of N, each group a task and each class always the same
    label; ``fixed_labels`` gives each class one label for good and draws a class per label (see
    :data:`metalab.data.episodes.LabelAssignment`). Sinusoid: ``fixed`` is the NME family of 20 functions
    with a one-hot task code appended to ``x`` (:mod:`metalab.data.sinusoid`). Val and test tasks are always
    mutually exclusive (Omniglot: shuffled labels on the held-out classes; sinusoid: new functions)."""
    construction: Literal["labeled", "augmented", "cactus"] = "labeled"
    """How training tasks are built. ``labeled``: from the classes of the training part. ``augmented``
    (Omniglot only, UMTRA / AAL): from the training part's images with their labels ignored, each task N
    random images as its classes, the query set (and shots after the first) augmented views of them
    (:class:`metalab.data.augment.AugmentedTasks`); labels are random per task, so it needs
    ``label_assignment: shuffled``. ``cactus`` (Omniglot only, CACTUs: Hsu et al., ICLR 2019): from clusters
    of an unsupervised embedding of the training part's images, labels never read, each task N clusters of
    one of several k-means partitions as its classes (:mod:`metalab.data.cactus`; settings in ``cactus``).
    Val and test tasks are always the labelled held-out classes."""
    cactus: CactusConfig | None = None
    """CACTUs settings (partitions, clusters, embedding kind and steps:
    :class:`metalab.data.cactus.CactusConfig`) with ``construction: cactus``; null there means the defaults.
    Must stay null with other constructions."""
    label_level: Literal["character", "alphabet"] = "character"
    """What an Omniglot class is. ``character`` (the usual task): a character, its examples drawings of it.
    ``alphabet`` (the alphabet recognition task of Allen et al., ICML 2019): an alphabet, its K + Q examples one
    drawing each of K + Q distinct characters of it, so support and query share no character
    (:class:`metalab.data.alphabet.AlphabetSampler`). The classes of a part are its characters grouped by
    alphabet: in the Vinyals split an alphabet in one rotation (``Alphabet/rotDDD``: rotated characters are
    characters of their own, so their alphabet is one too; 33 alphabets, 132 classes in ``train``, 5 and 20 in
    ``val``, 13 and 52 in ``test``), in the Lake split an alphabet (25 / 5 / 20). Training draws from the
    training part's characters grouped by alphabet, evaluation from the held-out part's: the characters are
    disjoint, and so are the alphabets but for Gurmukhi, whose characters the Vinyals split divides between
    ``train`` (41) and ``test`` (4). Classes with fewer than ``shots + queries`` characters are left out (e.g.
    test Gurmukhi). Needs ``construction: labeled`` and ``label_assignment: shuffled``."""

    alphabet_queries: alphabet.AlphabetQueries = "new_characters"
    """Alphabet-level queries (``label_level: alphabet`` only). ``new_characters``: drawings of characters not in
    the support set (the alphabet must be recognised from characters never seen). ``support_characters``: other
    drawings of the support characters, as the official IMP code (k-r-allen/imp, ``next_episode`` with
    ``within_category``) builds the paper's alphabet episodes, where a class's support characters are the modes
    its queries come from; ``queries`` may then exceed the characters of an alphabet (up to ``shots`` times 19)."""

    def __post_init__(self) -> None:
        require_between(self.ways, "ways", 1, MAX_WAYS)
        require_between(self.shots, "shots", 1, MAX_EXAMPLES)
        require_between(self.queries, "queries", 1, MAX_EXAMPLES)
        if self.train_ways is not None:
            require_between(self.train_ways, "train_ways", 1, MAX_WAYS, " or null")
        if self.train_queries is not None:
            require_between(self.train_queries, "train_queries", 1, MAX_EXAMPLES, " or null")
        require(self.image_size >= 16, "image_size", "must be >= 16 (four 2x downsamplings)")
        require_between(self.image_size, "image_size", 16, MAX_IMAGE_SIZE, " (the drawings' own size)")
        if self.construction != "labeled":
            require(
                self.dataset == "omniglot",
                "construction",
                f"{self.construction} tasks are built from Omniglot images",
            )
            require(
                self.label_assignment == "shuffled",
                "construction",
                f"{self.construction} tasks label their images at random per task: label_assignment must be "
                "'shuffled'",
            )
        if self.cactus is not None:
            require(
                self.construction == "cactus",
                "cactus",
                "CACTUs settings apply with construction: cactus only",
            )
        if self.label_level == "alphabet":
            require(self.dataset == "omniglot", "label_level", "alphabet-level tasks are Omniglot's")
            require(
                self.construction == "labeled" and self.label_assignment == "shuffled",
                "label_level",
                "alphabet-level tasks need construction: labeled and label_assignment: shuffled",
            )
        if self.dataset == "sinusoid":
            require(self.ways == 1, "ways", "sinusoid regression has ways = 1")
            require(
                self.label_assignment != "fixed_labels",
                "label_assignment",
                "sinusoid tasks are 'shuffled' (MAML's family) or 'fixed' (the NME family); fixed_labels is "
                "for classification",
            )
            return
        if self.alphabet_queries != "new_characters":
            require(self.label_level == "alphabet", "alphabet_queries", "needs label_level: alphabet")
        for key in ("queries", "train_queries"):
            queries = getattr(self, key) or self.queries
            limit, per = omniglot_install.DRAWINGS, "drawings per character"
            if self.alphabet_queries == "support_characters":
                require(self.shots <= alphabet.MOST_CHARACTERS, "shots", "must fit in the largest alphabet")
                limit = self.shots * omniglot_install.DRAWINGS  # each query redraws a support character
                per = "support characters' drawings"
            elif self.label_level == "alphabet":
                limit, per = alphabet.MOST_CHARACTERS, "characters of the largest alphabet"
            require(self.shots + queries <= limit, key, f"shots + {key} must be <= {limit} ({per})")

    @property
    def name(self) -> str:
        """Short task tag for run names, e.g. ``omniglot-5w1s`` or ``sinusoid-10s``."""
        nme = "" if self.label_assignment == "shuffled" else "-nme"
        if self.dataset == "sinusoid":
            return f"sinusoid{nme}-{self.shots}s"
        aug = {"augmented": "-aug", "cactus": "-cactus"}.get(self.construction, "")
        level = "-alphabet" if self.label_level == "alphabet" else ""
        level += "-seenchars" if self.alphabet_queries == "support_characters" else ""
        return f"omniglot-{self.ways}w{self.shots}s{nme}{aug}{level}"

    @property
    def input_features(self) -> int:
        """Width of a sinusoid task's inputs: 1, or ``x`` and a one-hot task code for the NME family."""
        return NME_FEATURES if self.label_assignment == "fixed" else 1


def make_sampler(
    cfg: TaskConfig, part: str, seed: int, root: Path
) -> SinusoidTasks | EpisodeSampler | AugmentedTasks | CactusTasks | alphabet.AlphabetSampler:
    """A sampler over ``part``: ``train`` (meaning ``cfg.train_part``) with the run's ``seed``, or ``val`` /
    ``test`` with the evaluation seed ``seed`` (each part then draws from its own :func:`part_seed`)."""
    if part in PARTS:
        seed = part_seed(seed, part)
    elif part != "train":
        raise ValueError(f"unknown part {part!r}")
    if cfg.dataset == "sinusoid":  # one infinite task family: parts differ only by seed
        if cfg.label_assignment == "shuffled":
            return SinusoidTasks(cfg.shots, cfg.queries, seed=seed)
        family = "nme_train" if part == "train" else "nme_eval"
        return SinusoidTasks(cfg.shots, cfg.queries, seed=seed, family=family)
    if part == "train":
        part = cfg.train_part
    data = omniglot.load(root, cfg.image_size)
    classes = omniglot.split_classes(data, root, cfg.split, part)  # type: ignore[arg-type]
    training = part in ("train", "trainval")
    ways = (cfg.train_ways or cfg.ways) if training else cfg.ways
    queries = (cfg.train_queries or cfg.queries) if training else cfg.queries
    if cfg.label_level == "alphabet":  # classes are alphabets, examples distinct characters of each
        seen = cfg.alphabet_queries == "support_characters"
        alphabets = alphabet.alphabet_classes(classes, min_characters=cfg.shots + (0 if seen else queries))
        if ways > len(alphabets.alphabets):
            raise ConfigError(
                "task.ways",
                f"{ways} ways but the {part} part has only {len(alphabets.alphabets)} alphabet classes of at "
                f"least {cfg.shots if seen else cfg.shots + queries} characters",
            )
        return alphabet.AlphabetSampler(alphabets, ways, cfg.shots, queries, seed, cfg.alphabet_queries)
    if ways > classes.images.shape[0]:
        raise ConfigError(
            "task.ways", f"{ways} ways but the {part} part has only {classes.images.shape[0]} classes"
        )
    if training and cfg.construction == "augmented":  # unlabeled: the images only, never their classes
        return AugmentedTasks(classes.images, ways, cfg.shots, queries, seed)
    if training and cfg.construction == "cactus":  # unlabeled: clusters of the images, never their classes
        return tasks_from_pool(classes.images, cfg.cactus or CactusConfig(), ways, cfg.shots, queries, seed)
    assignment = cfg.label_assignment if training else "shuffled"  # evaluation stays mutually exclusive
    return EpisodeSampler(classes.images, ways, cfg.shots, queries, seed, assignment)


def make_batch_sampler(cfg: TaskConfig, seed: int, root: Path) -> ClassBatchSampler:
    """Labelled images of the training part (``cfg.train_part``) in uniform batches, for classification over
    all its classes (:mod:`metalab.meta.transfer`), drawn from the run's ``seed``.

    Class ``c`` is line ``c`` of the part's split list: in the Vinyals split a character in one rotation (4112
    classes in ``train``, 4800 in ``trainval``), in the Lake split a character."""
    if cfg.dataset != "omniglot":
        raise ConfigError("task.dataset", f"class batches are drawn from Omniglot, not {cfg.dataset!r}")
    classes = omniglot.split_classes(omniglot.load(root, cfg.image_size), root, cfg.split, cfg.train_part)
    return ClassBatchSampler(classes.images, seed)


EVAL_PARTS = ("val", "test", "train", "probe")
"""What a few-shot learner's ``evaluate`` accepts: the protocol's ``val`` and ``test`` parts, and two views of
the training tasks for diagnosis (never evaluated during training): ``train`` (new episodes of the training
task family, labels assigned as in training, metrics ``train/...``) and ``probe`` (the same episodes with
another task's support set, :class:`~metalab.data.episodes.SupportSwapped`, metrics ``probe/...``)."""


def eval_sampler(cfg: TaskConfig, part: str, seed: int, root: Path) -> SinusoidTasks | EpisodeSampler:
    """The sampler of evaluation ``part`` (one of :data:`EVAL_PARTS`) from the evaluation seed ``seed``.

    ``train`` and ``probe`` draw training tasks from a stream of their own (derived from ``seed``), so they
    share no batch with training itself (which draws from the run's seed)."""
    if part in PARTS:
        return make_sampler(cfg, part, seed, root)
    if part not in EVAL_PARTS:
        raise ValueError(f"unknown evaluation part {part!r}; choose one of {', '.join(EVAL_PARTS)}")
    train = make_sampler(cfg, "train", part_seed(seed, "train"), root)
    return SupportSwapped(train) if part == "probe" else train


class EvalSamplers(dict):
    """``part -> sampler`` for a run's evaluation: ``val`` and ``test`` built at once (a missing split fails
    early), ``train`` and ``probe`` on first use (:func:`eval_sampler`)."""

    def __init__(self, cfg: TaskConfig, seed: int, root: Path):
        super().__init__({part: eval_sampler(cfg, part, seed, root) for part in PARTS})
        self.cfg, self.seed, self.root = cfg, seed, root

    def __missing__(self, part: str) -> SinusoidTasks | EpisodeSampler | SupportSwapped:
        sampler = self[part] = eval_sampler(self.cfg, part, self.seed, self.root)
        return sampler
