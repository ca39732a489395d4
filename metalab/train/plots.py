"""Figures of a run: learning curves from ``metrics.csv``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import Tensor

from metalab.data.episodes import Episode
from metalab.errors import CheckpointError
from metalab.train.logger import CSV_NAME, read_metrics


def plot_metrics(run_dir: Path) -> Path:
    """One panel per metric (CI half-widths drawn as bands around their metric); writes ``metrics.png``."""
    path = run_dir / CSV_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CSV_NAME} to plot")
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for step, key, value in read_metrics(path):
        series[key].append((step, value))
    keys = [k for k in series if not k.endswith("_ci95") and k != "train/lr"]
    if not keys:
        raise CheckpointError(f"{path} holds no metrics yet")
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
        ci = dict(series.get(f"{key}_ci95", []))
        if ci:
            lo = [v - ci.get(s, 0.0) for s, v in zip(steps, values, strict=True)]
            hi = [v + ci.get(s, 0.0) for s, v in zip(steps, values, strict=True)]
            ax.fill_between(steps, lo, hi, alpha=0.25)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    out = run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curves(
    path: Path,
    x: Tensor,
    curves: dict[str, Tensor],
    points: list[tuple[Tensor, Tensor]],
    title: str,
) -> Path:
    """One panel per task: each named curve ``(tasks, len(x))`` over ``x``, and that task's support points."""
    n = len(points)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False, sharey=True)
    for i, ax in enumerate(axes.flat):
        for name, ys in curves.items():
            style = {"color": "black", "lw": 2} if name == "true" else {"lw": 1.3}
            ax.plot(x.numpy(), ys[i].numpy(), label=name, **style)
        ax.scatter(points[i][0].numpy(), points[i][1].numpy(), color="red", zorder=5, s=18, label="support")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_episode(ep: Episode, path: Path, title: str = "") -> Path:
    """Grid of one image episode: a row per class, support images first (framed blue), then queries."""
    sx, sy, qx, qy = ep.support_x, ep.support_y, ep.query_x, ep.query_y  # (N*K, C, H, W), (N*K,), ...
    cols = ep.k_shot + min(ep.q_query, 8)
    fig, axes = plt.subplots(ep.n_way, cols, figsize=(0.9 * cols, 0.9 * ep.n_way), squeeze=False)
    for c in range(ep.n_way):
        row = [(img, True) for img in sx[sy == c]] + [(img, False) for img in qx[qy == c][: cols - ep.k_shot]]
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            img, support = row[j]
            ax.imshow(img[0].numpy(), cmap="gray_r", vmin=0, vmax=1)
            for spine in ax.spines.values():
                spine.set_color("tab:blue" if support else "0.7")
                spine.set_linewidth(2.5 if support else 0.5)
        axes[c, 0].set_ylabel(f"label {c}", fontsize=7)
    fig.suptitle(title or f"{ep.n_way}-way {ep.k_shot}-shot (blue: support)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
