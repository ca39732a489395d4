"""benchmarks.smlmt: the bag-of-words nearest prototype against values computed by hand, the task renderer (no
hidden word in a sentence, the answer key apart), and a tiny run of one training and of the baselines writing
records in the agreed shape, every method of a cell on the same test episodes.

Tests marked ``needs_text`` read WikiText-2 from the shared data folder and skip without it.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import DATA, REPO

from metalab.data import text
from metalab.data.episodes import Episode
from metalab.data.text import SMLMTSampler, TextPart, Vocab

needs_text = pytest.mark.skipif(
    not all((DATA / text.TEXT_DIR / name).is_file() for name in ("valid.txt", "test.txt")),
    reason=f"WikiText-2 valid.txt / test.txt not found under {DATA / text.TEXT_DIR}",
)
KEYS = {"benchmark", "task", "method", "metric", "value", "ci95", "unit", "steps", "seconds", "device",
        "torch", "commit"}  # fmt: skip
R = 1 / math.sqrt(2)
V = 8  # toy vocabulary: [PAD] 0, [MASK] 1, <unk> 2, words 3..7


@pytest.fixture
def smlmt(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(
        str(REPO)
    )  # benchmarks/ is a top-level package beside metalab/, not installed
    return importlib.import_module("benchmarks.smlmt")


def toy_episode() -> Episode:
    """2-way 2-shot 2-query, one task. Support 0: ``3 3``, ``3 4``; support 1: ``5``, ``5 6`` (with masks)."""
    support = [[3, 3, 1, 0], [3, 4, 1, 0], [5, 1, 0, 0], [5, 6, 1, 1]]
    query = [[4, 1, 0, 0], [3, 6, 1, 0], [6, 6, 6, 3], [5, 1, 0, 0]]
    y = torch.tensor([[0, 0, 1, 1]])
    return Episode(torch.tensor([support]), y, torch.tensor([query]), y.clone(), 2, 2, 2)


def test_the_grid_is_the_issues_and_each_cell_has_one_training_per_method(smlmt: ModuleType) -> None:
    assert set(smlmt.CELLS) == {f"{n}w{k}s" for n in (4, 8) for k in (1, 4, 8)}
    assert smlmt.METHODS == ("protonet", "maml")
    for method in smlmt.METHODS:
        served = [
            cell for name, cells in smlmt.TRAININGS.items() if name.startswith(f"{method}-") for cell in cells
        ]
        assert sorted(served) == sorted(smlmt.CELLS)
    for training, cells in smlmt.TRAININGS.items():  # <method>-<K>shot serves the K-shot cells
        method = training.split("-")[0]
        assert {f"{method}-{smlmt.parse_cell(cell)[1]}shot" for cell in cells} == {training}
    assert smlmt.parse_cell("8w4s") == (8, 4) and smlmt.MIN_SENTENCES == 8 + smlmt.QUERIES


def test_bow_vectors_leave_out_pad_and_mask_and_have_unit_length(smlmt: ModuleType) -> None:
    vectors = smlmt.bow_vectors(toy_episode().support_x[0], V)
    expected = torch.zeros(4, V)
    expected[0, 3] = 1.0  # "3 3": counts (2) normalised
    expected[1, [3, 4]] = R
    expected[2, 5] = 1.0
    expected[3, [5, 6]] = R  # its two masks count for nothing
    assert torch.allclose(vectors, expected)
    assert torch.equal(smlmt.bow_vectors(torch.tensor([[1, 0, 0]]), V), torch.zeros(1, V))  # nothing to count


def test_bow_prototype_and_prediction_by_hand(smlmt: ModuleType) -> None:
    ep = toy_episode()
    protos = smlmt.prototypes(smlmt.bow_vectors(ep.support_x[0], V), ep.support_y[0], 2)
    p0, p1 = torch.zeros(V), torch.zeros(V)
    p0[3], p0[4] = (1 + R) / 2, R / 2  # mean of e3 and (e3 + e4) / sqrt 2
    p1[5], p1[6] = (1 + R) / 2, R / 2
    assert torch.allclose(protos, torch.stack([p0, p1]))
    norm = math.sqrt(((1 + R) / 2) ** 2 + (R / 2) ** 2)  # both prototypes' length
    expected = torch.tensor(
        [
            [(R / 2) / norm, 0.0],  # "4": only prototype 0 holds word 4
            [R * (1 + R) / 2 / norm, R * (R / 2) / norm],  # "3 6"
            [(1 + R) / 2 / math.sqrt(10) / norm, 3 * (R / 2) / math.sqrt(10) / norm],  # "6 6 6 3"
            [0.0, (1 + R) / 2 / norm],  # "5"
        ]
    )
    scores = smlmt.bow_scores(ep, V)
    assert scores.shape == (1, 4, 2) and torch.allclose(scores[0], expected)
    # "6 6 6 3" shares one token with each prototype; the three 6s, weighted by prototype 1's smaller entry,
    # still win: 3 * 0.354 > 0.854.
    assert scores[0].argmax(-1).tolist() == [0, 0, 1, 1]
    # Swapping the support labels swaps the prototypes and every prediction.
    swapped = ep._replace(support_y=1 - ep.support_y)
    assert smlmt.bow_scores(swapped, V)[0].argmax(-1).tolist() == [1, 1, 0, 0]


def test_idf_counts_each_sentence_once_and_weights_the_vectors(smlmt: ModuleType) -> None:
    tokens = torch.tensor([[3, 3, 4, 0], [3, 5, 0, 0], [6, 1, 0, 0]])  # 3 sentences; token 3 in 2 of them
    part = TextPart(tokens, torch.tensor([3, 2, 2]), {})
    idf = smlmt.document_frequency_idf(part, V)
    df = {3: 2, 4: 1, 5: 1, 6: 1, 7: 0}
    for token, count in df.items():
        assert idf[token].item() == pytest.approx(math.log(4 / (1 + count)) + 1)
    vector = smlmt.bow_vectors(torch.tensor([[3, 4, 1]]), V, idf)[0]
    w3, w4 = math.log(4 / 3) + 1, math.log(2) + 1
    assert vector[3].item() == pytest.approx(w3 / math.hypot(w3, w4))
    assert vector[4].item() == pytest.approx(w4 / math.hypot(w3, w4))


@pytest.mark.parametrize(
    ("word", "tokens", "leak"),
    [
        ("play", ["[MASK]", "today"], False),
        ("play", ["we", "play"], True),
        ("play", ["Play", "[MASK]"], True),  # another case
        ("play", ["[MASK]", "REPLAYED"], True),  # inside another token
        ("Play", ["[MASK]", "player"], True),
    ],
)
def test_leaks(smlmt: ModuleType, word: str, tokens: list[str], leak: bool) -> None:
    assert smlmt.leaks(word, tokens) is leak


def fenced(markdown: str) -> list[str]:
    """The lines inside the ```text blocks of ``markdown`` (the rendered sentences)."""
    return [ln for block in markdown.split("```text\n")[1:] for ln in block.split("```")[0].splitlines()]


def toy_text() -> tuple[Vocab, TextPart]:
    sentences = [
        "we play and play again today .".split(),
        "children play outside every day .".split(),
        "he sang a song last night .".split(),
        "they sang together all evening .".split(),
    ]
    vocab = Vocab.build(sentences)
    return vocab, TextPart.build(sentences, vocab)


def test_render_keeps_the_hidden_words_for_the_answer_key(smlmt: ModuleType) -> None:
    vocab, part = toy_text()
    words = torch.tensor(sorted([vocab.index["play"], vocab.index["sang"]]))
    sampler = SMLMTSampler(part, words, n_way=2, k_shot=1, q_query=1, seed=0)
    shown = smlmt.render_tasks(sampler, vocab, 2)
    tasks, key = shown.split("## Answer key")
    sentences = fenced(tasks)
    assert len(sentences) == 2 * (2 + 2) and all("[MASK]" in line for line in sentences)
    assert "play" not in tasks and "sang" not in tasks  # the words are in the key only
    draw = sampler.draw(0, 2)
    for t in range(2):
        for label, word in enumerate(vocab.decode(draw.words[t].tolist())):
            assert f"| {label} | {word} | {vocab.index[word]} |" in key
    # The key's query labels are the episode's: each query's sentence is one of its word's sentences.
    first = tasks.split("## Task 2")[0]
    queries = {ln.split()[0]: ln.split(maxsplit=1)[1] for ln in fenced(first) if ln.startswith("q")}
    answers = key.split("Task 2:")[0].split("Queries: ")[1].rstrip(".\n").split(", ")
    hidden = vocab.decode(draw.words[0].tolist())
    for answer in answers:
        q, label = answer.split(" = ")
        assert queries[q].replace("[MASK]", hidden[int(label)]).split() in (
            "we play and play again today .".split(),
            "children play outside every day .".split(),
            "he sang a song last night .".split(),
            "they sang together all evening .".split(),
        )


def test_render_refuses_a_sentence_that_shows_its_word(smlmt: ModuleType) -> None:
    vocab, part = toy_text()
    play, sang = vocab.index["play"], vocab.index["sang"]
    # A pool that breaks the masking rule: a made-up sentence "the player will play" listed for "play" keeps
    # "player" once "play" is masked.
    player = Vocab((*vocab.words, "player"))
    tokens = torch.cat([part.tokens, torch.zeros(1, part.tokens.shape[1], dtype=torch.long)])
    tokens[-1, :4] = torch.tensor(player.encode("the player will play".split()))
    leaky = TextPart(tokens, torch.cat([part.lengths, torch.tensor([4])]), {play: torch.tensor([0, 4]),
                     sang: torch.tensor([2, 3])})  # fmt: skip
    sampler = SMLMTSampler(leaky, torch.tensor([play, sang]), n_way=2, k_shot=1, q_query=1, seed=0)
    with pytest.raises(ValueError, match="player"):
        smlmt.render_tasks(sampler, player, 8)


@needs_text
def test_rendered_val_tasks_never_show_their_words(smlmt: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "tasks.md"
    smlmt.main(["--only", "show", "--show", "4", "--show-out", str(out), "--allow-dirty"])
    tasks, key = out.read_text().split("## Answer key")
    sections = tasks.split("## Task ")[1:]
    keys = key.split("Task ")[1:]
    assert len(sections) == len(keys) == 4
    for section, answer in zip(sections, keys, strict=True):
        words = [
            row.split(" | ")[1] for row in answer.splitlines() if row.startswith("| ") and "---" not in row
        ][1:]
        assert len(words) == 4
        lines = fenced(section)
        assert len(lines) == 4 * (1 + smlmt.QUERIES) and all("[MASK]" in ln for ln in lines)
        # Each sentence's label, from the support lines and the key's query answers: a sentence never shows
        # its own hidden word (another word of the task may appear in it, as in any SMLMT task).
        answers = dict(a.split(" = ") for a in answer.split("Queries: ")[1].strip().rstrip(".").split(", "))
        labelled = [
            (int(answers[ln.split()[0]]) if ln.startswith("q") else int(ln.split()[0]), ln) for ln in lines
        ]
        assert sorted(y for y, _ in labelled) == sorted(list(range(4)) * (1 + smlmt.QUERIES))
        assert not any(words[y] in ln.lower().split(maxsplit=1)[1] for y, ln in labelled)


@needs_text
def test_tiny_run_of_one_training_and_the_baselines(smlmt: ModuleType, tmp_path: Path) -> None:
    tiny = ["train.eval_episodes=4", "train.meta_batch=2", "protonet.hidden=16", "eval.batch=3"]
    smlmt.main(["--only", "protonet-1shot", "baselines", "--steps", "2", "--test-episodes", "4",
                *(a for s in tiny for a in ("--set", s)), "--runs-dir", str(tmp_path / "runs"),
                "--results-dir", str(tmp_path / "results"), "--allow-dirty"])  # fmt: skip
    records = json.loads((tmp_path / "results" / "smlmt.json").read_text())
    by = {(r["method"], r["task"]): r for r in records}
    assert len(by) == len(records) == 2 + 3 * 6  # protonet on 4w1s and 8w1s; bow, tfidf, chance on all six
    for r in records:
        assert KEYS <= set(r) and r["benchmark"] == "smlmt" and r["metric"] == "test_accuracy"
        assert r["unit"] == "%" and 0 <= r["value"] <= 100 and r["test_episodes"] == 4
        assert r["task"] == f"smlmt-wikitext2-{r['ways']}w{r['shots']}s4q" and r["seconds"] >= 0
        assert (r["ci95"] is None) == (r["method"] == "chance")
        assert r["steps"] == (2 if r["method"] == "protonet" else 0)
    for cell in ("4w1s", "8w1s"):
        task = f"smlmt-wikitext2-{cell}4q"
        protonet = by[("protonet", task)]
        assert protonet["training"] == "protonet-1shot" and protonet["budget_minutes"] == 60.0
        # Every method of a cell is scored on the same episodes.
        assert {by[(m, task)]["episodes_digest"] for m in ("protonet", "bow", "tfidf", "chance")} == {
            protonet["episodes_digest"]
        }
    assert len({by[("bow", f"smlmt-wikitext2-{c}4q")]["episodes_digest"] for c in smlmt.CELLS}) == 6
    assert by[("chance", "smlmt-wikitext2-8w4s4q")]["value"] == 12.5
    assert (tmp_path / "results" / "smlmt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs" / "protonet-1shot" / "config.yaml").is_file()
