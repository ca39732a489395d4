"""Results pages generated from benchmark records (``benchmarks/results/*.json``): nothing in them is typed by hand.

``metalab report`` (``make report``) writes ``docs/results.md`` (every current record, one table per benchmark,
and what is pending) and the headline block of ``README.md`` (one line per family); ``metalab report --check``
fails if either differs from what the records say, and a test runs it.

A record is quoted only if it is *current*: written from a clean tree (no ``+dirty`` commit, no ``"dirty": true``)
and either under the evaluation protocol (``"protocol" >= 2``: selection on val or training data only, the test
part evaluated once) or from a benchmark that has no test split to develop on (speed). Every other record stays
in the JSON for its history and is listed as pending, with the reason, never as a result.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from metalab.errors import MetalabError

Record = dict[str, Any]
START, END = "<!-- results:start (metalab report) -->", "<!-- results:end -->"
NO_TEST_SPLIT = frozenset({"maml_speed", "sampler", "device_smoke", "distributed", "throughput"})
"""Benchmarks that measure speed or that code runs: no test data, so no protocol to predate."""
SHOWN = {
    "omniglot_metric": {"test_accuracy", "speedup_vs_plain-loop"},
    "omniglot_maml": {"test_accuracy"},
    "omniglot_blackbox": {"test_accuracy", "acc_instance2", "acc_instance5"},
    "sinusoid": {"test_mse_1_steps", "test_mse_5_steps", "test_mse_10_steps"},
    "bitflip": {"success", "steps_to_90"},
    "reinforce": {"return_greedy"},
    "meta_rl": {
        "return",
        "heldout_return",
        "beats_walking",
        "success_after1",
        "success_after2",
        "success_after9",
        "oyster_return",
        "success_after1_of_ceiling",
        "success_after2_of_ceiling",
        "success_after9_of_ceiling",
    },
    "sampler": {"speedup_vs_dataloader-png"},
    "maml_speed": {"speedup_vs_higher"},
    "memorization": {"test_accuracy", "probe_accuracy", "test_mse", "probe_mse", "train_mse"},
    "unsupervised": {"test_accuracy"},
    "smlmt": {"test_accuracy"},
    "bayesian": {"test_mse_k5", "test_nll_k5", "test_coverage90_k2", "test_coverage90_k5"},
    "sac": {"test_return", "seconds_ratio"},
    "distributed": {"speedup_vs_1x1"},
    "throughput": {
        "images_per_s",
        "speedup_vs_plain-loop",
        "speedup_vs_metalab",
        "fraction_of_conv_peak",
        "gflops",
    },
    "mbrl": {"test_return", "test_success_known", "test_success_learned", "test_reward_rmse"},
    "planning": {"test_return", "seconds_per_env_step", "planning_calls_per_s", "speedup_vs_python_loop"},
    "maml_rl": {
        "test_return_after0",
        "test_return_after1",
        "test_return_after3",
        "test_distance_after1",
        "test_progress_after0_forward",
        "test_progress_after1_forward",
        "test_progress_after0_backward",
        "test_progress_after1_backward",
    },
}
"""The metrics each benchmark's table shows (per-seed records, ``*_s0`` ..., are folded into their aggregate)."""
SHOWN_METHODS = {"maml_speed": {"metalab-vmap", "metalab-grad_loop", "metalab-loop"}}
"""Where a benchmark measures many variants, the ones its table shows."""
PER_SEED = re.compile(r"_s\d+$")


class Pick(NamedTuple):
    """Which record stands for a family in the README: ``benchmark``, ``task``, ``method``, ``metric``."""

    benchmark: str
    task: str
    method: str
    metric: str


HEADLINES: list[tuple[str, Pick, Pick | None]] = [
    ("metric-based", Pick("omniglot_metric", "omniglot-vinyals-5w1s", "protonet", "test_accuracy"), None),
    ("optimization-based", Pick("omniglot_maml", "omniglot-vinyals-5w1s", "maml", "test_accuracy"), None),
    ("black-box", Pick("omniglot_blackbox", "omniglot-vinyals-5w1s", "snail", "test_accuracy"), None),
    ("regression", Pick("sinusoid", "sinusoid-k5", "maml", "test_mse_10_steps"), None),
    (
        "goal-conditioned RL",
        Pick("bitflip", "bitflip-n15", "metalab-dqn-her-plain", "success"),
        Pick("bitflip", "bitflip-n15", "sb3-dqn-her-future", "success"),
    ),
    ("RL", Pick("reinforce", "CartPole-v1", "metalab-reinforce", "return_greedy"), None),
    (  # the paper's DREAM beside metalab's cross-fitted variant, both on the official nine-action grid
        "meta-RL",
        Pick("meta_rl", "citygrid5x5", "dream_paper", "return"),
        Pick("meta_rl", "citygrid5x5", "dream_xfit", "return"),
    ),
    (  # the same two on the official 9x9, the paper's DREAM benchmark (target 0.75, optimum 0.8)
        "meta-RL (9x9)",
        Pick("meta_rl", "citygrid", "dream_paper", "return"),
        Pick("meta_rl", "citygrid", "dream_xfit", "return"),
    ),
    (  # oyster's own logged quantity (AverageReturn_all_test_tasks) on the paper's half-cheetah velocity tasks
        "meta-RL (PEARL)",
        Pick("meta_rl", "half_cheetah_vel", "pearl", "oyster_return"),
        None,
    ),
    (  # success after 9 episodes as a fraction of the posterior-sampling ceiling (target 0.85), beside oyster's metric
        "meta-RL (PEARL)",
        Pick("meta_rl", "point_robot", "pearl", "success_after9_of_ceiling"),
        Pick("meta_rl", "point_robot", "pearl", "oyster_return"),
    ),
    (
        "gradient meta-RL",
        Pick("maml_rl", "navigation-2d", "maml-rl", "test_return_after1"),
        Pick("maml_rl", "navigation-2d", "pretrained", "test_return_after1"),
    ),
    (
        "model-based RL",
        Pick("mbrl", "pendulum", "metalab-pets", "test_return"),
        Pick("mbrl", "pendulum", "mbrl-lib-pets", "test_return"),
    ),
    ("data", Pick("sampler", "omniglot-5w1s15q-mb32", "metalab", "speedup_vs_dataloader-png"), None),
]
"""One line per family in the README: the record that stands for it, and a peer's where there is one (or, where
the peer is the same method, a second metric of it, named in its cell)."""


def why_not_current(rec: Record) -> str | None:
    """None when ``rec`` may be quoted, else the reason it may not."""
    if rec.get("dirty") or "+dirty" in str(rec.get("commit", "")):
        return "written from a tree with uncommitted changes"
    if str(rec.get("commit", "unknown")) == "unknown":
        return "no commit recorded"
    if rec["benchmark"] not in NO_TEST_SPLIT and int(rec.get("protocol", 1)) < 2:
        return "made before the val/test protocol (periodic evaluations or choices on test data)"
    return None


def load_records(results: Path) -> list[Record]:
    """Every record of ``results/*.json``."""
    if not results.is_dir():
        raise MetalabError(f"no benchmark results at {results}")
    return [r for path in sorted(results.glob("*.json")) for r in json.loads(path.read_text())]


def _number(value: Any, unit: str) -> str:
    if isinstance(value, str):  # a record's note in place of a number (e.g. a paper's figure read off a plot)
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if unit in ("%", "accuracy %"):
        return f"{value:.2f}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.4g}"


def _cell(rec: Record) -> str:
    unit = str(rec.get("unit", ""))
    out = _number(rec.get("value"), unit)
    if rec.get("ci95") is not None:
        out += f" ± {_number(rec['ci95'], unit).rstrip('x')}"
    if rec.get("per_seed"):
        out += f" (seeds: {', '.join(_number(v, unit) for v in rec['per_seed'])}; t-interval)"
    return out


def _device(rec: Record) -> str:
    device = str(rec.get("device", ""))
    return "CPU" if device.startswith("cpu") else device


def _label(rec: Record) -> str:
    return rec["method"] + (f" [{rec['label']}]" if rec.get("label") else "")


def _met(rec: Record) -> str:
    """Whether the record reaches its ``target`` (higher is better unless the unit is an error or MSE)."""
    target, value = rec.get("target"), rec.get("value")
    if not isinstance(target, int | float) or not isinstance(value, int | float):
        return ""
    lower = "mse" in rec["metric"] or "error" in rec["metric"]
    return (
        "yes"
        if (value <= target if lower else value >= target)
        else f"no ({_number(target, str(rec.get('unit', '')))})"
    )


def _shown(rec: Record) -> bool:
    if rec["metric"] not in SHOWN.get(rec["benchmark"], set()) or PER_SEED.search(rec["metric"]):
        return False
    return rec["method"] in SHOWN_METHODS.get(rec["benchmark"], {rec["method"]})


def split(
    records: list[Record],
) -> tuple[dict[str, list[Record]], dict[str, dict[str, dict[str, list[str]]]]]:
    """The shown records that are current, by benchmark; and the rest, as reason -> benchmark -> method -> tasks
    (only for what no current record of the same benchmark, task and method stands in for)."""
    current: dict[str, list[Record]] = defaultdict(list)
    pending: dict[tuple[str, str, str], str] = {}
    quoted: set[tuple[str, str, str]] = set()
    for rec in filter(_shown, records):
        key = (rec["benchmark"], rec["task"], _label(rec))
        reason = why_not_current(rec)
        if reason is None:
            current[rec["benchmark"]].append(rec)
            quoted.add(key)
        else:
            pending.setdefault(key, reason)
    grouped: dict[str, dict[str, dict[str, list[str]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for (bench, task, method), reason in sorted(pending.items()):
        if (bench, task, method) not in quoted:
            grouped[reason][bench][method].append(task)
    return current, grouped


def render_page(records: list[Record]) -> str:
    """``docs/results.md``: a table per benchmark of its current records, then what is pending."""
    current, pending = split(records)
    lines = [
        "# Results",
        "",
        "Generated by `metalab report` from `benchmarks/results/*.json`; do not edit. Only records from committed",
        "code under the evaluation protocol (README, Evaluation protocol) are quoted. Intervals are 95%: normal",
        "over test episodes, Student t over seeds (per-seed values given).",
        "",
    ]
    for bench in sorted(current):
        lines += [f"## {bench}", "", f"`python -m benchmarks.{bench}`", ""]
        lines += ["| task | method | metric | ours | paper | target met | steps | device | commit |"]
        lines += ["| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for rec in sorted(current[bench], key=lambda r: (r["task"], _label(r), r["metric"], _device(r))):
            paper = rec.get("published")
            lines.append(
                f"| {rec['task']} | {_label(rec)} | {rec['metric']} | {_cell(rec)} | "
                f"{'' if paper is None else _number(paper, str(rec.get('unit', '')))} | {_met(rec)} | "
                f"{rec.get('steps') or ''} | {_device(rec)} | {rec.get('commit', '')} |"
            )
        lines.append("")
    lines += render_calibration([r for recs in current.values() for r in recs])
    if pending:
        lines += ["## Pending reruns", "", "Records kept in the JSON for their history, not results:", ""]
        for reason, benches in sorted(pending.items()):
            lines.append(f"- {reason}:")
            for bench, methods in sorted(benches.items()):
                tasks = "; ".join(f"{m} ({', '.join(t)})" for m, t in sorted(methods.items()))
                lines.append(f"  - {bench}: {tasks}")
        lines.append("")
    return "\n".join(lines)


def _ece(record: Record) -> str:
    """The ECE, with its bootstrap interval ``[low, high]`` when the record has one."""
    low, high = record.get("ece_interval") or (None, None)
    interval = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
    return f"{record['ece']:.4f}{interval}"


def render_calibration(current: list[Record]) -> list[str]:
    """A table of the classification records that carry the calibration of their test predictive (``ece``,
    ``nll``), by cell: records of one cell made with the same test episodes compare like for like."""
    rows = sorted(
        (r for r in current if r.get("ece") is not None and r["metric"] == "test_accuracy"),
        key=lambda r: (r["task"], r["ece"]),
    )
    if not rows:
        return []
    lines = ["## calibration", ""]
    lines += [
        "Expected calibration error (15 bins, all test queries pooled; in brackets its 95% bootstrap interval over"
    ]
    lines += [
        "the episodes, where recorded) and mean NLL (nats per query) of the test predictive, beside the accuracy",
        "of the same episodes; lower is better for both.",
        "",
    ]
    lines += ["| task | method | accuracy % | NLL | ECE | test episodes | benchmark | commit |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {_label(r)} | {_cell(r)} | {_number(r.get('nll'), '')} | {_ece(r)} | "
            f"{r.get('test_episodes', '')} | {r['benchmark']} | {r.get('commit', '')} |"
        )
    return [*lines, ""]


def _find(records: list[Record], pick: Pick) -> Record | None:
    """The current CPU record of ``pick`` (a GPU one if there is none on the CPU)."""
    found = [
        r
        for r in records
        if (r["benchmark"], r["task"], r["method"], r["metric"]) == tuple(pick)
        and not r.get("label")
        and why_not_current(r) is None
    ]
    found.sort(key=lambda r: _device(r) != "CPU")
    return found[0] if found else None


def render_headlines(records: list[Record]) -> str:
    """The README block: one line per family, with the paper's number and a peer's where there is one."""
    lines = [
        START,
        "| family | task | metalab | paper | peer (or a second metric) | device, commit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for family, pick, peer in HEADLINES:
        rec = _find(records, pick)
        other = _find(records, peer) if peer else None
        if rec is None:
            lines.append(f"| {family} | {pick.task} | pending rerun ({pick.method}) | | | |")
            continue
        paper = rec.get("published")
        if isinstance(paper, str) and len(paper) > 40:  # a sentence, not a figure: the page quotes it in full
            paper = "see docs/results.md"
        peer_cell = "pending" if peer else ""
        if peer and other:
            named = other["method"] if peer.metric == pick.metric else f"{other['method']} {peer.metric}"
            peer_cell = f"{named}: {_cell(other)}"
        lines.append(
            f"| {family} | {pick.task}, {pick.metric} | {pick.method}: {_cell(rec)} | "
            f"{'' if paper is None else _number(paper, str(rec.get('unit', '')))} | {peer_cell} | "
            f"{_device(rec)}, {rec.get('commit', '')} |"
        )
    lines += [
        "",
        "Every current figure, with what is still pending: [docs/results.md](docs/results.md).",
        END,
    ]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with everything from the start marker to the end marker replaced by ``block``."""
    if START not in text or END not in text:
        raise MetalabError(f"README.md has no results block ({START} ... {END})")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def report(repo: Path, check: bool = False) -> list[Path]:
    """Write (or with ``check``, compare) ``docs/results.md`` and README.md's block under ``repo``; the paths
    that differ from the records (with ``check``) or that were written."""
    records = load_records(repo / "benchmarks" / "results")
    readme = repo / "README.md"
    wanted = {
        repo / "docs" / "results.md": render_page(records) + "\n",
        readme: replace_block(readme.read_text(), render_headlines(records)),
    }
    if check:
        return [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(wanted)
