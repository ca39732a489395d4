"""Episode sampler throughput: metalab's tensor sampler vs a DataLoader that reads PNG files per episode.

    python -m benchmarks.sampler [--only 5w1s 20w5s] [--seconds 20]

Both draw Vinyals-train Omniglot episodes (rotations included, 28x28), meta-batch 32, in the same run. The
baseline is the usual approach: a ``Dataset`` whose item is an episode, built by opening each PNG with PIL,
resizing and rotating it, collated by a ``DataLoader`` (2 workers on this 2-core machine). metalab decodes once
(cached) and then only indexes tensors.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import merge_results, parse_args, parser, record
from metalab.data import omniglot, omniglot_install
from metalab.data.episodes import EpisodeSampler
from metalab.data.root import data_root, safe_extract

CONFIGS = {"5w1s": (5, 1, 15), "20w5s": (20, 5, 15)}
META_BATCH = 32


class PngEpisodes(Dataset):
    """Episode ``i``: pick N classes and K+Q drawings, read each PNG from disk (the baseline)."""

    def __init__(self, folder: Path, classes: list[str], n: int, k: int, q: int):
        self.files = []
        for line in classes:  # "Alphabet/characterNN/rotDDD"
            alphabet, char, rot = line.split("/")
            base = next(
                folder / s / alphabet / char
                for s in omniglot_install.SETS
                if (folder / s / alphabet / char).is_dir()
            )
            self.files.append((sorted(base.glob("*.png")), int(rot[3:])))
        self.n, self.k, self.q = n, k, q

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(i)
        images = []
        for c in rng.choice(len(self.files), self.n, replace=False):
            files, rot = self.files[c]
            for j in rng.choice(len(files), self.k + self.q, replace=False):
                img = Image.open(files[j]).convert("L").resize((28, 28), Image.Resampling.LANCZOS).rotate(rot)
                images.append(torch.from_numpy(255 - np.asarray(img, dtype=np.uint8)).float().div(255))
        x = torch.stack(images).view(self.n, self.k + self.q, 1, 28, 28)
        return x, torch.arange(self.n).repeat_interleave(self.k + self.q)


def rate(draw, seconds: float, min_batches: int = 3) -> tuple[float, int, float]:
    """Episodes per second of ``draw(i)`` (one meta-batch per call) over about ``seconds``."""
    draw(0)  # warm-up
    start, batches = time.perf_counter(), 0
    while batches < min_batches or time.perf_counter() - start < seconds:
        draw(batches + 1)
        batches += 1
    elapsed = time.perf_counter() - start
    return batches * META_BATCH / elapsed, batches, elapsed


def main() -> None:
    p = parser(__doc__.splitlines()[0], list(CONFIGS))
    p.add_argument("--seconds", type=float, default=20.0, help="time per measurement")
    args = parse_args(p)  # a dirty tree is refused here, before anything is measured
    root = data_root()
    t0 = time.perf_counter()
    data = omniglot.load(root)
    load_s = time.perf_counter() - t0
    split = omniglot.split_classes(data, root, "vinyals", "train")
    records = [
        record(
            "sampler", "omniglot-vinyals-train", "metalab", "load_seconds", load_s, unit="s", seconds=load_s
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for s in omniglot_install.SETS:  # the baseline reads extracted PNG files, as torchvision/Torchmeta do
            safe_extract(omniglot_install.omniglot_dir(root) / f"{s}.zip", folder)
        for name in args.only or CONFIGS:
            n, k, q = CONFIGS[name]
            task = f"omniglot-{n}w{k}s{q}q-mb{META_BATCH}"
            sampler = EpisodeSampler(split.images, n, k, q, seed=0)
            fast, fb, fs = rate(lambda i, s=sampler: s.sample(i, META_BATCH), args.seconds)
            loader = DataLoader(
                PngEpisodes(folder, split.classes, n, k, q),
                batch_size=META_BATCH,
                num_workers=2,
                persistent_workers=True,
                prefetch_factor=2,
            )
            it = iter(loader)
            slow, sb, ss = rate(lambda i, it=it: next(it), args.seconds)
            records += [
                record(
                    "sampler",
                    task,
                    "metalab",
                    "episodes_per_s",
                    fast,
                    unit="episodes/s",
                    steps=fb,
                    seconds=fs,
                ),
                record(
                    "sampler",
                    task,
                    "dataloader-png",
                    "episodes_per_s",
                    slow,
                    unit="episodes/s",
                    steps=sb,
                    seconds=ss,
                    note="DataLoader, 2 workers, PIL decode+resize per image",
                ),
                record("sampler", task, "metalab", "speedup_vs_dataloader-png", fast / slow, unit="x"),
            ]
            print(
                f"{task}: metalab {fast:,.0f} episodes/s, PNG DataLoader {slow:,.1f} episodes/s, {fast / slow:,.0f}x"
            )
    print(merge_results("sampler", records))


if __name__ == "__main__":
    main()
