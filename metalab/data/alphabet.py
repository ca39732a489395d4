"""Alphabet-level Omniglot tasks (the alphabet recognition task of Allen et al., "Infinite Mixture Prototypes
for Few-Shot Learning", ICML 2019): the characters of a split part grouped by alphabet, and episodes whose
classes are alphabets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from metalab.data.episodes import Episode, generator_for
from metalab.data.omniglot import ClassSplit
from metalab.errors import DataError

MOST_CHARACTERS = 55
"""Characters of the largest alphabet (Tifinagh): the most distinct characters an alphabet-level class has."""


@dataclass(frozen=True)
class AlphabetClasses:
    """The characters of one split part grouped by alphabet: the classes of alphabet-level episodes.

    A class is one alphabet in one rotation, ``Alphabet/rotDDD``: the Vinyals split makes each rotation of a
    character a character of its own, so the rotated characters of an alphabet make an alphabet of their own
    (the Lake split has rotation 0 only, so its classes are the alphabets).
    """

    images: torch.Tensor  # (n_characters, 20, 1, H, W) uint8: the part's characters, as ClassSplit.images
    members: torch.Tensor  # (n_alphabets, most) int64: the characters of each class, -1 past its count
    counts: torch.Tensor  # (n_alphabets,) int64: characters per class
    alphabets: list[str]  # "Alphabet/rotDDD", in the order of members


def alphabet_classes(classes: ClassSplit, min_characters: int = 1) -> AlphabetClasses:
    """Group the characters of ``classes`` (names ``Alphabet/characterNN/rotDDD``) by alphabet and rotation,
    keeping the classes of at least ``min_characters`` characters (sorted by name)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(classes.classes):
        parts = name.split("/")
        if len(parts) != 3:
            raise DataError(f"cannot read an alphabet from class {name!r} (want Alphabet/characterNN/rotDDD)")
        groups.setdefault(f"{parts[0]}/{parts[2]}", []).append(i)
    kept = sorted(key for key, chars in groups.items() if len(chars) >= min_characters)
    counts = torch.tensor([len(groups[key]) for key in kept], dtype=torch.long)
    members = torch.full((len(kept), int(counts.max()) if kept else 0), -1, dtype=torch.long)
    for row, key in enumerate(kept):
        members[row, : len(groups[key])] = torch.tensor(groups[key])
    return AlphabetClasses(classes.images, members, counts, kept)


AlphabetQueries = Literal["new_characters", "support_characters"]
"""What an alphabet episode's queries draw: characters not in its support set, or new drawings of its support
characters (:class:`AlphabetSampler`)."""


class AlphabetSampler:
    """Alphabet-level episodes (the alphabet recognition task of Allen et al., "Infinite Mixture Prototypes for
    Few-Shot Learning", ICML 2019): each class is an alphabet, and its K + Q examples are one random drawing each
    of K + Q distinct characters of it, so no character is in both the support and the query set and a class's
    support spans several characters (one prototype per class is too few).

    A pure function of ``(seed, index)``, like :class:`~metalab.data.episodes.EpisodeSampler`; labels and layout
    as in :class:`~metalab.data.episodes.Episode` (examples grouped by class, labels in the order drawn).

    Args:
        classes: the alphabet classes (:func:`alphabet_classes`).
        n_way: alphabets per episode (N).
        k_shot: support characters per alphabet (K).
        q_query: query characters per alphabet; every class needs at least ``k_shot + q_query`` characters.
        seed: the sampler's stream; batch ``index`` of seed ``s`` is always the same episodes.
        queries: ``new_characters`` (the default, above) or ``support_characters``: each query is another
            drawing of one of the class's K support characters (Q distinct character-drawing pairs), as the
            official IMP code builds its alphabet episodes; every class then needs only ``k_shot`` characters.
    """

    def __init__(
        self,
        classes: AlphabetClasses,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        queries: AlphabetQueries = "new_characters",
    ):
        n_classes = len(classes.alphabets)
        if not 1 <= n_way <= n_classes:
            raise ValueError(f"n_way={n_way} but there are {n_classes} alphabet classes")
        fewest = int(classes.counts.min())
        if queries == "support_characters":
            others = k_shot * (classes.images.shape[1] - 1)
            if k_shot < 1 or k_shot > fewest or not 0 <= q_query <= others:
                raise ValueError(
                    f"k_shot={k_shot} must fit in the {fewest} characters of the smallest alphabet class and "
                    f"q_query={q_query} in the {others} other drawings of the support characters"
                )
        elif k_shot < 1 or q_query < 0 or k_shot + q_query > fewest:
            raise ValueError(
                f"k_shot={k_shot} + q_query={q_query} must fit in the {fewest} characters of the smallest "
                f"alphabet class"
            )
        self.classes, self.n_way, self.k_shot, self.q_query, self.seed = classes, n_way, k_shot, q_query, seed
        self.queries = queries

    def draw(self, index: int, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(T, N, K+Q)`` characters (indices into ``classes.images``) of batch ``index``, support then
        query of each class, and the drawing of each."""
        g = generator_for(self.seed, index)
        members, n, kq = self.classes.members, self.n_way, self.k_shot + self.q_query
        classes = torch.multinomial(torch.ones(tasks, members.shape[0]), n, replacement=False, generator=g)
        keys = torch.rand(tasks, n, members.shape[1], generator=g)  # (T, N, most)
        keys = keys.masked_fill(members[classes] < 0, 2.0)  # padding sorts after every character
        if self.queries == "support_characters":  # the official code's episodes: queries redraw support chars
            k, per = self.k_shot, self.classes.images.shape[1]
            picks = keys.argsort(-1)[..., :k]  # (T, N, K): distinct characters of each alphabet
            drawn = torch.randint(per, (tasks, n, k), generator=g)
            # Q distinct (support character, other drawing) pairs per class
            pairs = torch.rand(tasks, n, k * (per - 1), generator=g).argsort(-1)[..., : self.q_query]
            which, offset = pairs // (per - 1), pairs % (per - 1)
            chars = members[classes[..., None], picks]
            query_chars = chars.gather(-1, which)
            query_drawn = (drawn.gather(-1, which) + 1 + offset) % per  # never the support drawing
            return torch.cat([chars, query_chars], -1), torch.cat([drawn, query_drawn], -1)
        picks = keys.argsort(-1)[..., :kq]  # (T, N, K+Q): distinct characters of each alphabet
        drawings = torch.randint(self.classes.images.shape[1], (tasks, n, kq), generator=g)
        return members[classes[..., None], picks], drawings

    def sample(self, index: int, tasks: int) -> Episode:
        """Episode batch number ``index`` with ``tasks`` tasks; images as float in [0, 1]."""
        n, k, q = self.n_way, self.k_shot, self.q_query
        chars, drawings = self.draw(index, tasks)
        images = self.classes.images[chars, drawings].float().div_(255.0)  # (T, N, K+Q, C, H, W)
        shape = images.shape[3:]
        labels = torch.arange(n)
        return Episode(
            images[:, :, :k].reshape(tasks, n * k, *shape),
            labels.repeat_interleave(k).expand(tasks, -1).contiguous(),
            images[:, :, k:].reshape(tasks, n * q, *shape),
            labels.repeat_interleave(q).expand(tasks, -1).contiguous(),
            n,
            k,
            q,
        )
