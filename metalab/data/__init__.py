"""Few-shot data: the data root, Omniglot, sinusoid regression, and the episode sampler."""

from metalab.data.episodes import Episode, EpisodeSampler
from metalab.data.root import cache_root, data_root

__all__ = ["Episode", "EpisodeSampler", "cache_root", "data_root"]
