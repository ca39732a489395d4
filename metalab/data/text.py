"""Self-supervised few-shot text tasks from masked words: SMLMT (Bansal, Jha, Munkhdalai & McCallum,
"Self-Supervised Meta-Learning for Few-Shot Natural Language Classification Tasks", EMNLP 2020).

A task is made from unlabelled text: draw N words, give them the labels ``0..N-1`` in the order drawn (random
per task), take K + Q sentences containing each word and replace every occurrence of the word by ``[MASK]``;
the support and query sets are (masked sentence, label) pairs. A learner must tell which word was masked.

Data: the validation and test parts of WikiText-2 (Merity et al. 2016) under the data root, as
``<root>/text/wikitext-2/{valid,test}.txt``. Choices made here (the paper's tasks come from large corpora and
BERT's tokenizer; these fit a small CPU model trained from scratch):

- Sentences: each non-empty, non-heading line (headings are ``= Title =``) is lowercased, split on spaces and
  cut after every ``.``, ``!`` or ``?`` token; sentences are cut to their first :data:`MAX_TOKENS` tokens,
  those under :data:`MIN_TOKENS` tokens are dropped, and repeated sentences of a file are kept once.
- Vocabulary: every token of the two files, lowercased, after the specials ``[PAD]`` (id 0), ``[MASK]`` (1)
  and ``<unk>`` (2, WikiText's own rare-word token). No download, no subwords.
- Candidate words: alphabetic tokens (no numbers, punctuation or ``<unk>``) of at least
  :data:`MIN_WORD_LENGTH` letters that are not in :data:`STOP_WORDS`, with at least K + Q eligible sentences
  in their part's file (K + ``train_queries`` for training).
- Masking rule: every token equal to the word becomes ``[MASK]``. A sentence in which the word is also a
  part of another token (``play`` in ``played`` or ``player``) is not eligible for that word, so a masked
  sentence contains the word in no form: not whole, not in another case (all text is lowercased), not inside
  another token.
- Word split: each word is assigned to ``train`` (70%), ``val`` (15%) or ``test`` (15%) by a salted hash of
  the word itself (:func:`word_split`), the same for every run. ``train`` and ``val`` words take their
  sentences from ``valid.txt``, ``test`` words from ``test.txt``: val words are held out of meta-training,
  and test tasks have both unseen words and unseen text. (A val sentence may have been a training sentence
  with another word masked; its val word was then visible but never a label.)

Episodes are :class:`~metalab.data.episodes.Episode` batches of token ids: ``support_x`` is ``(T, N*K, L)``
int64, padded with ``PAD_ID`` to the longest sentence of the batch (``x != PAD_ID`` is the mask of real
tokens). Batch ``index`` of seed ``s`` is always the same tasks; within a task no sentence is used twice.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from metalab.config import require, require_between
from metalab.data.episodes import Episode, SupportSwapped, generator_for
from metalab.data.root import md5sum
from metalab.errors import ConfigError, DataError
from metalab.train.evaluate import PARTS, part_seed

log = logging.getLogger(__name__)

TEXT_DIR = Path("text") / "wikitext-2"
"""Where the text lies under the data root."""
FILES = {"train": "valid.txt", "val": "valid.txt", "test": "test.txt"}
"""The file each word split takes its sentences from."""
MD5 = {"valid.txt": "d756d22ab2310e7e60c094bea5c5a8eb", "test.txt": "781c9418ab9414bd09e4aad825aae752"}
"""md5 of the files as the shared data README lists them (a mismatch is logged, not refused)."""
PAD, MASK, UNK = "[PAD]", "[MASK]", "<unk>"
PAD_ID, MASK_ID, UNK_ID = 0, 1, 2
SENTENCE_ENDS = frozenset({".", "!", "?"})
MAX_TOKENS = 64
"""Sentences are cut to this many tokens (99% of WikiText-2's are shorter)."""
MIN_TOKENS = 5
"""Shorter sentences (fragments such as ``" Yes . "``) are dropped."""
MIN_WORD_LENGTH = 3
"""Shortest candidate word."""
SPLIT_SALT = "metalab-smlmt-v1"
"""Salt of the word hash behind :func:`word_split`: part of the task set's definition, like a class split."""
SPLIT_SHARES = (("train", 70), ("val", 15), ("test", 15))
"""Percent of the words in each split."""
MAX_DRAWS = 1000
"""Redraws of a task's words allowed when the drawn words cannot get K + Q distinct sentences each."""
MAX_EXAMPLES = 64
"""Most sentences per word in a task (shots + queries)."""
STOP_WORDS = frozenset(
    """
    the and for are but not all any can had her was one our out has him his how its may you she who two
    that with have this will your from they been were each which their there what about would into than
    them then these some could other more very also only over such most where when while being both
    between through during before under again further once here same just should those because until
    against above below off why does doing having itself himself herself themselves whom upon onto among
    within without however after
    """.split()
)
"""Function words never used as candidates: masking them would make tasks of grammar rather than meaning."""

Part = Literal["train", "val", "test"]


def read_sentences(path: Path) -> list[tuple[str, ...]]:
    """The sentences of a WikiText file as lowercased token tuples (rules in the module docstring)."""
    if not path.is_file():
        raise DataError(
            f"{path} is missing: SMLMT tasks read WikiText-2's valid.txt and test.txt from "
            f"<data root>/{TEXT_DIR.as_posix()}/ (set --data-root or METALAB_DATA)"
        )
    expected = MD5.get(path.name)
    if expected is not None and md5sum(path) != expected:
        log.warning("%s has not the md5 of the WikiText-2 copy this module was written for", path)
    sentences: dict[tuple[str, ...], None] = {}  # insertion-ordered set: repeats kept once
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or (line.startswith("= ") and line.endswith(" =")):
            continue
        current: list[str] = []
        for token in line.lower().split():
            current.append(token)
            if token in SENTENCE_ENDS:
                _keep(current, sentences)
                current = []
        _keep(current, sentences)
    return list(sentences)


def _keep(tokens: list[str], sentences: dict[tuple[str, ...], None]) -> None:
    if len(tokens) >= MIN_TOKENS:
        sentences.setdefault(tuple(tokens[:MAX_TOKENS]), None)


@dataclass(frozen=True)
class Vocab:
    """Word-level vocabulary: specials first, then tokens by decreasing count (ties alphabetical)."""

    words: tuple[str, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {w: i for i, w in enumerate(self.words)})

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]]) -> Vocab:
        counts = Counter(token for sentence in sentences for token in sentence)
        specials = (PAD, MASK, UNK)
        rest = sorted((w for w in counts if w not in specials), key=lambda w: (-counts[w], w))
        return cls((*specials, *rest))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.index.get(t, UNK_ID) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids``, padding left out."""
        return [self.words[i] for i in ids if i != PAD_ID]


def is_candidate(word: str) -> bool:
    """Whether ``word`` may be masked to make a class: alphabetic, long enough, not a stop word."""
    return word.isalpha() and len(word) >= MIN_WORD_LENGTH and word not in STOP_WORDS


def word_split(word: str) -> Part:
    """The split of ``word``: a salted hash of the word, so a word is in one split only, for every run."""
    digest = hashlib.blake2b(f"{SPLIT_SALT}:{word}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    for part, share in SPLIT_SHARES:
        if bucket < share:
            return part  # type: ignore[return-value]
        bucket -= share
    raise AssertionError("SPLIT_SHARES must add up to 100")


def eligible_words(sentence: Sequence[str]) -> list[str]:
    """The candidate words ``sentence`` may stand for: each occurs in it as a whole token and inside no other
    token (so masking its whole-token occurrences leaves no trace of it)."""
    unique = set(sentence)
    joined = " ".join(unique)  # a word without spaces can only occur inside a token of this string
    return sorted(w for w in unique if is_candidate(w) and joined.count(w) == 1)


@dataclass(frozen=True)
class TextPart:
    """The sentences of one file as token ids, and for each candidate word the sentences eligible for it."""

    tokens: torch.Tensor  # (n_sentences, MAX_TOKENS) int64, padded with PAD_ID
    lengths: torch.Tensor  # (n_sentences,) int64
    pools: dict[int, torch.Tensor]  # word id -> (n,) ascending sentence indices

    @classmethod
    def build(cls, sentences: Sequence[Sequence[str]], vocab: Vocab) -> TextPart:
        tokens = torch.full((len(sentences), MAX_TOKENS), PAD_ID, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in sentences], dtype=torch.long)
        pools: dict[int, list[int]] = {}
        for i, sentence in enumerate(sentences):
            tokens[i, : len(sentence)] = torch.tensor(vocab.encode(sentence))
            for word in eligible_words(sentence):
                pools.setdefault(vocab.index[word], []).append(i)
        return cls(tokens, lengths, {w: torch.tensor(p) for w, p in sorted(pools.items())})


@dataclass(frozen=True)
class Corpus:
    """WikiText-2 read once: the vocabulary of both files and each file as a :class:`TextPart`."""

    vocab: Vocab
    files: dict[str, TextPart]

    def part(self, part: Part) -> TextPart:
        return self.files[FILES[part]]

    def words(self, part: Part, min_sentences: int) -> torch.Tensor:
        """Ascending ids of ``part``'s candidate words with at least ``min_sentences`` eligible sentences."""
        pools = self.part(part).pools
        ids = [
            w for w, p in pools.items() if len(p) >= min_sentences and word_split(self.vocab.words[w]) == part
        ]
        return torch.tensor(sorted(ids), dtype=torch.long)


@functools.lru_cache(maxsize=2)
def load_corpus(root: Path) -> Corpus:
    """Read and index ``<root>/text/wikitext-2/{valid,test}.txt`` (about a second; cached per process)."""
    texts = {name: read_sentences(root / TEXT_DIR / name) for name in sorted(set(FILES.values()))}
    vocab = Vocab.build(s for sentences in texts.values() for s in sentences)
    return Corpus(vocab, {name: TextPart.build(s, vocab) for name, s in texts.items()})


class TaskDraw(NamedTuple):
    """What a batch of SMLMT tasks is made of."""

    words: torch.Tensor  # (T, N) vocabulary ids; label i of task t is words[t, i]
    sentences: torch.Tensor  # (T, N, K+Q) sentence indices into the part: K support, then Q query


class SMLMTSampler:
    """Draws batches of N-way K-shot SMLMT episodes (Bansal et al., EMNLP 2020) from one word split.

    Args:
        text: the sentences of the split's file.
        words: ids of the split's candidate words, each with at least ``k_shot + q_query`` eligible sentences.
        n_way: words per task.
        k_shot: support sentences per word.
        q_query: query sentences per word.
        seed: the sampler's stream; batch ``index`` of seed ``s`` is always the same tasks.
        window: tokens kept of each sentence: a window around the first ``[MASK]`` (the whole sentence when
            shorter). Attention costs grow with the square of the length; the mask's context is the evidence.
    """

    def __init__(
        self,
        text: TextPart,
        words: torch.Tensor,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        *,
        window: int = MAX_TOKENS,
    ):
        if not 1 <= n_way <= len(words):
            raise ValueError(f"n_way={n_way} but the split has {len(words)} candidate words")
        if k_shot < 1 or q_query < 1:
            raise ValueError(f"need k_shot >= 1 and q_query >= 1, got {k_shot}, {q_query}")
        short = [int(w) for w in words if len(text.pools.get(int(w), ())) < k_shot + q_query]
        if short:
            raise ValueError(f"word ids {short[:5]} have fewer than {k_shot + q_query} sentences")
        if not 1 <= window <= MAX_TOKENS:
            raise ValueError(f"window={window} must be in [1, {MAX_TOKENS}]")
        self.text, self.words, self.window = text, words, window
        self.n_way, self.k_shot, self.q_query, self.seed = n_way, k_shot, q_query, seed

    def draw(self, index: int, tasks: int) -> TaskDraw:
        """The words and sentences of batch ``index`` (the ones :meth:`sample` masks)."""
        g = generator_for(self.seed, index)
        drawn = [self._draw_task(g) for _ in range(tasks)]
        return TaskDraw(torch.stack([w for w, _ in drawn]), torch.stack([s for _, s in drawn]))

    def _draw_task(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N,)`` words in label order and ``(N, K+Q)`` distinct sentences; words are redrawn in the rare
        case that two of them share so many sentences that one is left with too few."""
        need = self.k_shot + self.q_query
        for _ in range(MAX_DRAWS):
            words = self.words[torch.randperm(len(self.words), generator=g)[: self.n_way]]  # (N,)
            used: set[int] = set()
            picks = []
            for word in words.tolist():
                pool = self.text.pools[word]
                order = pool[torch.randperm(len(pool), generator=g)].tolist()
                fresh = [s for s in order if s not in used][:need]
                if len(fresh) < need:
                    break
                used.update(fresh)
                picks.append(fresh)
            else:
                return words, torch.tensor(picks)
        raise DataError(f"could not draw {self.n_way} words with {need} distinct sentences each")

    def sample(self, index: int, tasks: int) -> Episode:
        """Episode batch ``index``: token ids ``(T, N*K, L)`` and ``(T, N*Q, L)``, every occurrence of a task's
        word replaced by ``MASK_ID``, each cut to its ``window`` tokens around the first mask, padded with
        ``PAD_ID`` to the batch's longest ``L``."""
        n, k, q, w = self.n_way, self.k_shot, self.q_query, self.window
        draw = self.draw(index, tasks)
        x = self.text.tokens[draw.sentences]  # (T, N, K+Q, MAX_TOKENS)
        x = torch.where(x == draw.words[:, :, None, None], MASK_ID, x)
        lengths = self.text.lengths[draw.sentences]  # (T, N, K+Q)
        first = (x == MASK_ID).to(torch.uint8).argmax(-1)  # (T, N, K+Q) position of the first mask
        # The window starts half a window before the first mask, moved back to end with the sentence if it can.
        start = torch.minimum((first - w // 2).clamp_min(0), (lengths - w).clamp_min(0))
        x = x.gather(-1, start[..., None] + torch.arange(w))  # (T, N, K+Q, w): start + w <= max(w, length)
        length = int(lengths.clamp_max(w).max())
        x = x[..., :length]  # (T, N, K+Q, L)
        support_x = x[:, :, :k].reshape(tasks, n * k, length)
        query_x = x[:, :, k:].reshape(tasks, n * q, length)
        labels = torch.arange(n)
        support_y = labels.repeat_interleave(k).expand(tasks, -1).contiguous()
        query_y = labels.repeat_interleave(q).expand(tasks, -1).contiguous()
        return Episode(support_x.contiguous(), support_y, query_x.contiguous(), query_y, n, k, q)


def render_task(episode: Episode, vocab: Vocab, words: Sequence[str] | None = None) -> str:
    """One task as text, a line per sentence: ``support 0 [word]: sentence``. A batched episode renders its
    first task; ``words`` (the task's words in label order, e.g. from :meth:`SMLMTSampler.draw`) adds them."""
    if episode.support_x.dim() == 3:
        episode = episode.task(0)
    lines = []
    for name, xs, ys in (
        ("support", episode.support_x, episode.support_y),
        ("query", episode.query_x, episode.query_y),
    ):
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            tag = f" [{words[y]}]" if words is not None else ""
            lines.append(f"{name} {y}{tag}: {' '.join(vocab.decode(x))}")
    return "\n".join(lines)


@dataclass(frozen=True)
class TextTaskConfig:
    """The ``task`` section for SMLMT text tasks (``dataset: smlmt``; Bansal et al., EMNLP 2020)."""

    dataset: Literal["smlmt"] = "smlmt"
    """``smlmt``: masked-word tasks from WikiText-2 under the data root (:mod:`metalab.data.text`)."""
    ways: int = 4
    """N: words per task."""
    shots: int = 4
    """K: support sentences per word."""
    queries: int = 4
    """Q: query sentences per word."""
    train_ways: int | None = None
    """Words per task during training when different from test; null: same as ``ways``."""
    train_queries: int | None = None
    """Query sentences per word during training when different from test; null: same as ``queries``."""
    window: int = 32
    """Tokens kept of each sentence: a window around the first ``[MASK]`` (at most :data:`MAX_TOKENS`)."""
    train_part: Literal["train"] = "train"
    """Meta-training uses the ``train`` words only; the ``val`` words stay held out."""
    data_root: str | None = None
    """Data root; null: ``--data-root``, else ``$METALAB_DATA``, else ``~/.cache/metalab``."""

    def __post_init__(self) -> None:
        require_between(self.ways, "ways", 2, MAX_EXAMPLES)
        require_between(self.window, "window", 1, MAX_TOKENS, " (longest sentence kept)")
        if self.train_ways is not None:
            require_between(self.train_ways, "train_ways", 2, MAX_EXAMPLES, " or null")
        for key in ("shots", "queries", "train_queries"):
            value = getattr(self, key)
            if value is not None:
                require_between(value, key, 1, MAX_EXAMPLES)
                require(
                    self.shots + value <= MAX_EXAMPLES or key == "shots",
                    key,
                    f"shots + {key} must be <= {MAX_EXAMPLES} (sentences per word)",
                )

    @property
    def name(self) -> str:
        """Short task tag for run names, e.g. ``smlmt-4w4s``."""
        return f"smlmt-{self.ways}w{self.shots}s"


def make_sampler(cfg: TextTaskConfig, part: str, seed: int, root: Path) -> SMLMTSampler:
    """A sampler over the words of ``part``: ``train`` with the run's ``seed``, or ``val`` / ``test`` with the
    evaluation seed (each part then draws from its own :func:`~metalab.train.evaluate.part_seed`)."""
    if part in PARTS:
        seed = part_seed(seed, part)
    elif part != "train":
        raise ValueError(f"unknown part {part!r}")
    training = part == "train"
    ways = (cfg.train_ways or cfg.ways) if training else cfg.ways
    queries = (cfg.train_queries or cfg.queries) if training else cfg.queries
    corpus = load_corpus(root)
    words = corpus.words(part, cfg.shots + queries)  # type: ignore[arg-type]
    if ways > len(words):
        raise ConfigError(
            "task.ways",
            f"{ways} ways but only {len(words)} {part} words have {cfg.shots + queries} sentences (shots + queries)",
        )
    text = corpus.part(part)  # type: ignore[arg-type]
    return SMLMTSampler(text, words, ways, cfg.shots, queries, seed, window=cfg.window)


def eval_sampler(cfg: TextTaskConfig, part: str, seed: int, root: Path) -> SMLMTSampler | SupportSwapped:
    """The sampler of evaluation ``part`` (``val``, ``test``, ``train`` or ``probe``, as
    :func:`metalab.data.tasks.eval_sampler`) from the evaluation seed ``seed``."""
    if part in PARTS:
        return make_sampler(cfg, part, seed, root)
    if part not in ("train", "probe"):
        raise ValueError(f"unknown evaluation part {part!r}; choose one of val, test, train, probe")
    train = make_sampler(cfg, "train", part_seed(seed, "train"), root)
    return SupportSwapped(train) if part == "probe" else train  # type: ignore[arg-type]
