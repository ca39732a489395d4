"""What one GNN graph costs at evaluation, per Omniglot cell: why the 20-way 5-shot cell does not fit a CPU.

    python -m benchmarks.gnn_cost --threads 1

For each cell, the graph network of :mod:`metalab.meta.gnn` (the configs' sizes, untrained, evaluation mode,
inductive BatchNorm) classifies ``--graphs`` one-query graphs of random node features (the Conv-4 is left out:
its cost does not depend on the graph). Records, in ``benchmarks/results/gnn_cost.json``: ``ms_per_graph`` (the
median of ``--repeats`` timings), its ratio to the 5-way 1-shot graph measured in the same run
(``cost_vs_5w1s``), and ``test_graph_minutes``, the graph time of a test of 1000 episodes with 15 queries per
class at that rate.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, merge_results, parse_args, parser, record
from metalab.meta.gnn import GNN, Config, graph_logits, graph_nodes

CELLS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
TEST_EPISODES, QUERIES_PER_CLASS = 1000, 15


def ms_per_graph(ways: int, shots: int, graphs: int, repeats: int) -> float:
    """Median milliseconds per one-query graph of a ``ways``-way ``shots``-shot episode."""
    torch.manual_seed(0)
    model = GNN(ways, Config()).eval()
    dim = model.encoder.embedding_dim
    labels = torch.arange(ways).repeat(shots)[None]
    nodes = graph_nodes(
        torch.randn(1, ways * shots, dim), labels, torch.randn(1, graphs, dim), ways, "per_query"
    )
    times = []
    with torch.no_grad():
        graph_logits(model, nodes[:1], 1)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            graph_logits(model, nodes, 1)
            times.append((time.perf_counter() - start) / graphs * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], list(CELLS))
    p.add_argument("--graphs", type=int, default=20, help="graphs per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per cell (the median is recorded)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where gnn_cost.json is merged")
    args = parse_args(p, argv)
    cost = {c: ms_per_graph(*CELLS[c], args.graphs, args.repeats) for c in ["5w1s", *(args.only or CELLS)]}
    records = []
    for cell, ms in cost.items():
        ways = CELLS[cell][0]
        minutes = ms * TEST_EPISODES * ways * QUERIES_PER_CLASS / 6e4
        print(
            f"{cell}: {ms:.2f} ms per graph ({ms / cost['5w1s']:.1f}x 5w1s); a 1000-episode test {minutes:.1f} min"
        )
        task = f"omniglot-vinyals-{cell}"
        extra = {"threads": torch.get_num_threads(), "graphs": args.graphs, "repeats": args.repeats}
        records += [
            record("gnn_cost", task, "gnn", "ms_per_graph", ms, unit="ms", **extra),
            record("gnn_cost", task, "gnn", "cost_vs_5w1s", ms / cost["5w1s"], unit="ratio", **extra),
            record("gnn_cost", task, "gnn", "test_graph_minutes", minutes, unit="minutes", **extra),
        ]
    print(merge_results("gnn_cost", records, args.results_dir))


if __name__ == "__main__":
    main()
