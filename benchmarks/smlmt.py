"""SMLMT masked-word tasks on WikiText-2: N-way K-shot accuracy on held-out words, ProtoNet vs bag of words.

    python -m benchmarks.smlmt                                  # the six trainings (60 min each), baselines
    python -m benchmarks.smlmt --only protonet-4shot maml-4shot --minutes 30
    python -m benchmarks.smlmt --only baselines                 # bag of words and chance: no training
    python -m benchmarks.smlmt --only show                      # writes docs/notes/smlmt_tasks.md

Tasks (Bansal, Jha, Munkhdalai & McCallum, "Self-Supervised Meta-Learning for Few-Shot Natural Language
Classification Tasks", EMNLP 2020; :mod:`metalab.data.text`): N words are hidden, K + Q sentences of each have
every occurrence of their word replaced by ``[MASK]``, and a learner tells from K labelled sentences per word
which word each of the Q query sentences hides. The grid is N in {4, 8} by K in {1, 4, 8}, Q = 4
(:data:`CELLS`). Test tasks use words of the ``test`` split and sentences of WikiText-2's ``test.txt``: words
and text never seen in training.

Test episodes: every cell draws its words from one pool, the test words with at least ``8 + 4`` eligible
sentences (:data:`MIN_SENTENCES`; 271 words), so that accuracy across K compares the same words (the config's
own sampler would draw K = 1 tasks from rarer words too). Episodes are fixed by the config's ``eval.seed`` and
``eval.batch``, and every method of a cell is scored on exactly the same ``--test-episodes`` episodes: each
record carries ``episodes_digest``, a hash of their token ids and labels, equal across the methods of a cell.

Methods, records ``test_accuracy`` (%) with a 95% interval over the episodes in ``results/smlmt.json``:

- ``protonet``: ProtoNet (``configs/smlmt_protonet.yaml``: a 2-layer transformer sentence encoder trained from
  scratch). A ProtoNet is shot- and way-agnostic at test time (prototypes are means of any number of
  embeddings), so one training per K serves both N (:data:`TRAININGS`): trained 8-way with the test's K, as
  Snell et al. (NeurIPS 2017) found training with more ways than the test, and with the test's shot, to work
  best. Each trains in ``<runs-dir>/protonet-<K>shot`` for ``--minutes`` (counted across resumes) or
  :data:`STEPS` (``--steps``), whichever comes first, resuming a checkpoint when there is one; its periodic
  evaluation (``val/acc``, 8-way K-shot on the held-out val words) is the record's ``curve``.
- ``maml``: MAML with a prototype-initialised head (``configs/smlmt_maml.yaml``, :func:`metalab.meta.maml.text_logits`:
  the same encoder; per task, ``maml.eval_inner_steps`` gradient steps on the head alone, started at the
  support prototypes; the outer loop meta-learns the encoder through them, second order). Its head is built
  from each episode's support set, so it too is way-agnostic, and it trains as ProtoNet does, one training per
  K (``maml-<K>shot``), 8-way.
- ``bow`` and ``tfidf``: nearest prototype with no training. A sentence is its token-count vector over the
  vocabulary (``[PAD]`` and ``[MASK]`` left out), weighted by inverse document frequency for ``tfidf`` (over
  the sentences of ``valid.txt``, the training words' file: no test text), normalised to unit length; a
  word's prototype is the mean of its support vectors; a query goes to the prototype of highest cosine
  similarity (:func:`bow_scores`). The ``baselines`` configuration records both on every cell.
- ``chance``: 1/N, exact (no interval), recorded beside them.

``show`` renders a few tasks of the val words as Markdown (:func:`render_tasks`) into
``docs/notes/smlmt_tasks.md`` (``--show N`` tasks, ``--show-out`` elsewhere): support and query sentences with
``[MASK]``, labels, and the hidden words only in an answer key at the end. ``smlmt.png`` (accuracy against
K, a panel per N) is redrawn from the records. Provenance flags (``--allow-dirty``, ``--label``):
:mod:`benchmarks.common`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from benchmarks.common import (
    current_label,
    device_kind,
    device_name,
    merge_results,
    parse_args,
    parser,
    record,
)
from benchmarks.fewshot import (
    accuracy_record,
    add_budget_args,
    add_run_args,
    config_path,
    run_overrides,
    train,
)
from metalab.data.episodes import Episode
from metalab.data.root import data_root
from metalab.data.text import (
    MASK,
    MASK_ID,
    PAD_ID,
    SMLMTSampler,
    TextPart,
    TextTaskConfig,
    Vocab,
    load_corpus,
)
from metalab.experiment import load_run_config
from metalab.meta import maml
from metalab.meta.episodic import accuracy, embed_sentences
from metalab.meta.gbml import Inner
from metalab.meta.protonet import embedding_logits
from metalab.stats import Estimate
from metalab.train.evaluate import evaluate_episodes, part_seed

BENCH = "smlmt"
METHODS = ("protonet", "maml")
"""Trained methods; method ``m`` trains ``configs/smlmt_<m>.yaml``."""
WAYS = (4, 8)
SHOTS = (1, 4, 8)
QUERIES = 4
"""Query sentences per word in every cell (the config's ``task.queries``)."""
CELLS = tuple(f"{n}w{k}s" for n in WAYS for k in SHOTS)
MIN_SENTENCES = max(SHOTS) + QUERIES
"""Eligible sentences a test word needs to be in the pool of every cell."""
TRAIN_WAYS = max(WAYS)
TRAININGS = {f"{m}-{k}shot": tuple(f"{n}w{k}s" for n in WAYS) for m in METHODS for k in SHOTS}
"""Training name -> the cells its model is tested on."""
STEPS = {1: 8000, 4: 7000, 8: 5000}
"""Training steps per K: about what 60 minutes allow on one thread of a busy 2-core CPU (0.33, 0.37 and
0.53 s per step of 8 tasks, 8-way, measured), so the cosine schedule anneals within the default budget."""
BASELINES = ("bow", "tfidf")
SHOW_CELL = "4w1s"
SHOW_OUT = Path(__file__).resolve().parents[1] / "docs" / "notes" / "smlmt_tasks.md"
CONFIGS = [*TRAININGS, "baselines", "show"]
DEFAULT = [*TRAININGS, "baselines"]
REFERENCE = (
    "Bansal, Jha, Munkhdalai & McCallum, Self-Supervised Meta-Learning for Few-Shot Natural Language "
    "Classification Tasks, EMNLP 2020 (SMLMT); tasks here: WikiText-2, word-level, metalab.data.text"
)


def parse_cell(cell: str) -> tuple[int, int]:
    """``"8w4s"`` -> ``(8, 4)``."""
    ways, _, shots = cell.removesuffix("s").partition("w")
    return int(ways), int(shots)


def task_name(cell: str) -> str:
    return f"smlmt-wikitext2-{cell}{QUERIES}q"


def cell_sampler(
    task: TextTaskConfig, cell: str, eval_seed: int, root: Path, part: str = "test"
) -> SMLMTSampler:
    """The fixed episodes of ``cell`` on ``part``'s words with at least :data:`MIN_SENTENCES` sentences (one
    pool for every cell), drawn from ``part``'s evaluation seed, each sentence cut to ``task.window``
    tokens."""
    n, k = parse_cell(cell)
    corpus = load_corpus(root)
    words = corpus.words(part, MIN_SENTENCES)  # type: ignore[arg-type]
    text = corpus.part(part)  # type: ignore[arg-type]
    return SMLMTSampler(text, words, n, k, QUERIES, part_seed(eval_seed, part), window=task.window)


# ----------------------------------------------------------------------------------------- bag of words


def document_frequency_idf(text: TextPart, vocab_size: int) -> torch.Tensor:
    """Smoothed inverse document frequency ``(V,)`` over the sentences of ``text``:
    ``log((1 + S) / (1 + df)) + 1``, ``df`` the number of sentences holding the token (each counted once)."""
    rows = torch.arange(text.tokens.shape[0])[:, None] * vocab_size  # (S, 1)
    pairs = torch.unique(text.tokens + rows)  # each (sentence, token) once, without an (S, V) matrix
    df = torch.bincount(pairs % vocab_size, minlength=vocab_size).double()  # (V,)
    return (torch.log((1.0 + text.tokens.shape[0]) / (1.0 + df)) + 1.0).float()


def bow_vectors(tokens: torch.Tensor, vocab_size: int, idf: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-length bag-of-words vectors ``(S, V)`` of token ids ``(S, L)``: counts of each token (``[PAD]``
    and ``[MASK]`` not counted), times ``idf`` when given. A sentence with no counted token stays all
    zeros."""
    counts = torch.zeros(tokens.shape[0], vocab_size).scatter_add_(
        1, tokens, torch.ones(tokens.shape)
    )  # (S, V)
    counts[:, [PAD_ID, MASK_ID]] = 0.0
    if idf is not None:
        counts = counts * idf
    return counts / counts.norm(dim=1, keepdim=True).clamp_min(1e-12)


def prototypes(vectors: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """``(N, V)``: the mean of each label's vectors ``(S, V)``."""
    sums = torch.zeros(n_way, vectors.shape[1]).index_add_(0, labels, vectors)
    return sums / torch.bincount(labels, minlength=n_way).clamp_min(1)[:, None]


def bow_scores(ep: Episode, vocab_size: int, idf: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity ``(T, N*Q, N)`` of each query's bag of words to each word's prototype (the mean of
    its support vectors). Ties (a query sharing no token with any prototype) go to label 0, which is a random
    word of the task: chance, not a bias."""
    out = []
    for t in range(ep.tasks):  # one task at a time: a (sentences, vocabulary) matrix per task stays small
        protos = prototypes(
            bow_vectors(ep.support_x[t], vocab_size, idf), ep.support_y[t], ep.n_way
        )  # (N, V)
        protos = protos / protos.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out.append(bow_vectors(ep.query_x[t], vocab_size, idf) @ protos.T)  # (N*Q, N)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_cell(
    scores: Callable[[Episode], torch.Tensor],
    sampler: SMLMTSampler,
    episodes: int,
    batch: int,
    device: torch.device | str = "cpu",
) -> tuple[Estimate, str]:
    """Accuracy of ``scores`` over ``episodes`` fixed episodes of ``sampler``, and a digest of those episodes
    (token ids and labels): two methods with the same digest were scored on the same episodes."""
    digest = hashlib.blake2b(digest_size=8)

    def per_task(ep: Episode) -> torch.Tensor:
        for x in ep[:4]:
            digest.update(x.cpu().contiguous().numpy().tobytes())
        return accuracy(scores(ep), ep)

    return evaluate_episodes(per_task, sampler, episodes, batch, device), digest.hexdigest()


def cell_fields(cell: str, sampler: SMLMTSampler, digest: str) -> dict[str, Any]:
    n, k = parse_cell(cell)
    return {"ways": n, "shots": k, "queries": QUERIES, "test_words": len(sampler.words),
            "episodes_digest": digest, "reference": REFERENCE}  # fmt: skip


def scorer(method: str, trained: Any) -> Callable[[Episode], torch.Tensor]:
    """The test-time query logits of a trained ``method`` (evaluation settings of its config)."""
    model = trained.learner.model
    if method == "maml":
        cfg = trained.run.params
        inner = Inner(model, False, cfg.inner_lr, cfg.eval_inner_steps, cfg.first_order)
        return lambda ep: maml.text_logits(model, inner, ep)
    return lambda ep: embedding_logits(embed_sentences(model, ep), ep)


def train_and_test(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train configuration ``name`` (``<method>-<K>shot``, 8-way); test it on each cell it serves."""
    method, shots = name.split("-")
    k = int(shots.removesuffix("shot"))
    base = [
        f"task.ways={TRAIN_WAYS}",
        f"task.shots={k}",
        f"task.queries={QUERIES}",
        f"train.steps={STEPS[k]}",
    ]
    trained = train(config_path(f"smlmt_{method}"), [*base, *run_overrides(args)], args.runs_dir / name)
    run, root, scores = trained.run, data_root(), scorer(method, trained)
    out = []
    for cell in TRAININGS[name]:
        sampler = cell_sampler(run.task, cell, run.eval.seed, root)
        est, digest = evaluate_cell(scores, sampler, run.eval.episodes, run.eval.batch, trained.device)
        test = {"test/acc": est.mean, "test/acc_ci95": est.ci95}
        out.append(
            accuracy_record(BENCH, task_name(cell), method, trained, test, label=f"{name} on {cell}",
                            training=name, train_ways=TRAIN_WAYS, **cell_fields(cell, sampler, digest))
        )  # fmt: skip
    return out


def baselines(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Bag-of-words and tf-idf nearest prototypes, and chance, on every cell's test episodes (no training)."""
    run = load_run_config(config_path("smlmt_protonet"), run_overrides(args))
    root = data_root()
    corpus = load_corpus(root)
    vocab_size = len(corpus.vocab)
    idf = document_frequency_idf(corpus.part("train"), vocab_size)
    weights = {"bow": None, "tfidf": idf}
    on, out = device_name("cpu"), []
    for cell in CELLS:
        n, _ = parse_cell(cell)
        sampler = cell_sampler(run.task, cell, run.eval.seed, root)
        for method in BASELINES:
            start = time.perf_counter()
            est, digest = evaluate_cell(
                lambda ep, w=weights[method]: bow_scores(ep, vocab_size, w),
                sampler,
                run.eval.episodes,
                run.eval.batch,
            )
            seconds = time.perf_counter() - start
            shown = f"{100 * est.mean:.2f} ± {100 * est.ci95:.2f}%"
            print(f"{method} on {cell}: {shown} (chance {100 / n:.1f}%)")
            out.append(
                record(BENCH, task_name(cell), method, "test_accuracy", 100 * est.mean, ci95=100 * est.ci95,
                       unit="%", steps=0, seconds=seconds, device=on, test_episodes=run.eval.episodes,
                       similarity="cosine", idf="valid.txt sentences" if method == "tfidf" else None,
                       **cell_fields(cell, sampler, digest))
            )  # fmt: skip
        out.append(
            record(BENCH, task_name(cell), "chance", "test_accuracy", 100 / n, unit="%", steps=0, seconds=0.0,
                   device=on, test_episodes=run.eval.episodes, note="1/N, exact",
                   **cell_fields(cell, sampler, digest))
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- rendering


def leaks(word: str, tokens: list[str]) -> bool:
    """Whether ``word`` shows in ``tokens`` in any form: whole, in another case, or inside another token."""
    return any(word.lower() in token.lower() for token in tokens if token != MASK)


def render_tasks(sampler: SMLMTSampler, vocab: Vocab, tasks: int, index: int = 0) -> str:
    """Markdown for ``tasks`` tasks of episode batch ``index``: each task's support sentences with their
    labels, then its query sentences in a shuffled order (queries are grouped by label in an episode), and,
    after all the tasks, an answer key: each label's hidden word and vocabulary id, and each query's label.

    Raises:
        ValueError: a rendered sentence shows its hidden word (whole, in another case, or inside a token), or
            holds no ``[MASK]``.
    """
    draw, ep = sampler.draw(index, tasks), sampler.sample(index, tasks)
    shuffle = torch.Generator().manual_seed(index)
    body, key = [], ["## Answer key", ""]
    for t in range(tasks):
        words = vocab.decode(draw.words[t].tolist())
        sentences = {}
        for name, xs, ys in (
            ("support", ep.support_x[t], ep.support_y[t]),
            ("query", ep.query_x[t], ep.query_y[t]),
        ):
            rows = []
            for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
                tokens = vocab.decode(x)
                if MASK not in tokens or leaks(words[y], tokens):
                    raise ValueError(f"task {t + 1}: a {name} sentence of label {y} shows its word: {tokens}")
                rows.append((y, " ".join(tokens)))
            sentences[name] = rows
        order = torch.randperm(len(sentences["query"]), generator=shuffle).tolist()
        queries = [sentences["query"][i] for i in order]
        body += [f"## Task {t + 1}", "", "Support: label, sentence.", "", "```text"]
        body += [f"{y}  {s}" for y, s in sentences["support"]] + [
            "```",
            "",
            "Queries: which label?",
            "",
            "```text",
        ]
        body += [f"q{j + 1:<3} {s}" for j, (_, s) in enumerate(queries)] + ["```", ""]
        key += [f"Task {t + 1}:", "", "| label | hidden word | vocabulary id |", "| --- | --- | --- |"]
        key += [
            f"| {y} | {w} | {i} |" for y, (w, i) in enumerate(zip(words, draw.words[t].tolist(), strict=True))
        ]
        key += ["", "Queries: " + ", ".join(f"q{j + 1} = {y}" for j, (y, _) in enumerate(queries)) + ".", ""]
    return "\n".join([*body, *key])


def show(args: argparse.Namespace) -> Path:
    """Write :func:`render_tasks` of ``--show`` tasks of the val words (cell :data:`SHOW_CELL`) to
    ``--show-out``."""
    run = load_run_config(config_path("smlmt_protonet"), args.overrides)
    root = data_root()
    sampler = cell_sampler(run.task, SHOW_CELL, run.eval.seed, root, part="val")
    n, k = parse_cell(SHOW_CELL)
    head = [
        "# What an SMLMT task looks like",
        "",
        "<!-- Generated by `python -m benchmarks.smlmt --only show`: edit benchmarks/smlmt.py, not this. -->",
        "",
        f"The first {args.show} tasks ({n}-way {k}-shot, {QUERIES} queries per word) of the episodes the "
        "benchmark draws (`benchmarks/smlmt.py`; tasks: `metalab.data.text`, after Bansal et al., EMNLP "
        "2020), here from the held-out **val** words and the sentences of WikiText-2's `valid.txt`. Each "
        f"task hides {n} words: every occurrence of a word in its sentences is replaced by `[MASK]`, and its "
        f"sentences get the word's label, 0 to {n - 1}, in the random order the words were drawn. A learner "
        "sees the labelled support sentences and must label each query sentence, that is, tell which hidden "
        "word its `[MASK]` stands for. A sentence is eligible for a word only if the word occurs in it as a "
        "whole token and inside no other token, and all text is lowercased, so no form of the hidden word is "
        "left in a sentence (checked again when this page was written). Sentences are cut to a window of "
        f"{run.task.window} tokens around the first `[MASK]`; `<unk>` is WikiText's own rare-word token.",
        "",
        "Try the tasks before reading the answer key at the end.",
        "",
    ]
    out = args.show_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*head, render_tasks(sampler, load_corpus(root).vocab, args.show)]))
    print(f"wrote {out}")
    return out


# ---------------------------------------------------------------------------------------------- figure


def plot(results: Path) -> Path | None:
    """Test accuracy (%) against K with 95% intervals, a line per method and a panel per N, from the main
    records in ``<results>/smlmt.json`` (the latest of each method and cell); None when there are none."""
    path = results / f"{BENCH}.json"
    kept = {
        (r["method"], r["ways"], r["shots"]): r
        for r in (json.loads(path.read_text()) if path.is_file() else [])
        if r.get("label") is None and r["metric"] == "test_accuracy" and "ways" in r
    }
    if not kept:
        return None
    methods = list(dict.fromkeys(m for m, _, _ in kept))
    fig, axes = plt.subplots(1, len(WAYS), figsize=(4.2 * len(WAYS), 3.4), squeeze=False)
    for ax, n in zip(axes.flat, WAYS, strict=True):
        for method in methods:
            points = [kept[(method, n, k)] for k in SHOTS if (method, n, k) in kept]
            if points:
                ci = [r["ci95"] or 0.0 for r in points]
                on = sorted({device_kind(r["device"]) for r in points} - {"cpu"})  # GPU names, if any
                ax.errorbar([r["shots"] for r in points], [r["value"] for r in points], yerr=ci, marker="o",
                            ms=3, capsize=2, label=" ".join([method, *(f"({d})" for d in on)]),
                            linestyle="--" if method == "chance" else "-")  # fmt: skip
        ax.set_title(f"SMLMT WikiText-2, {n}-way, test words")
        ax.set_xlabel("K (support sentences per word)")
        ax.set_xticks(SHOTS)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = results / f"{BENCH}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS, DEFAULT)
    add_budget_args(p, test_episodes=1000)
    add_run_args(p, BENCH)
    p.add_argument(
        "--show", type=int, default=3, metavar="N", help="tasks rendered by --only show (default 3)"
    )
    p.add_argument(
        "--show-out", type=Path, default=SHOW_OUT, help=f"where --only show writes (default {SHOW_OUT})"
    )
    args = parse_args(p, argv)  # a dirty tree is refused here, before any training
    if args.show < 1:
        p.error("--show must be >= 1")
    for name in args.only or DEFAULT:
        if name == "show":
            show(args)
            continue
        records = baselines(args) if name == "baselines" else train_and_test(name, args)
        print(merge_results(BENCH, records, args.results_dir))
        if current_label() is None:  # the figure shows the main records only
            plot(args.results_dir)


if __name__ == "__main__":
    main()
