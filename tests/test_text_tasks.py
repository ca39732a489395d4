"""SMLMT text tasks (Bansal et al., EMNLP 2020): sentence reading, the masking rule, the word split, episodes,
determinism, config errors, tiny ProtoNet and MAML runs on them, and the MAML text head.

Tests marked ``needs_text`` read WikiText-2 from the shared data folder and skip without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA

from metalab.data import text
from metalab.data.episodes import Episode
from metalab.data.text import (
    MASK_ID,
    MAX_TOKENS,
    PAD_ID,
    SMLMTSampler,
    TextPart,
    TextTaskConfig,
    Vocab,
    eligible_words,
    load_corpus,
    make_sampler,
    read_sentences,
    render_task,
    word_split,
)
from metalab.errors import ConfigError, DataError
from metalab.experiment import algorithm, load_run_config, run_config_from_dict
from metalab.meta import maml
from metalab.meta.adapt import adapt
from metalab.meta.episodic import accuracy, cross_entropy, embed_sentences
from metalab.meta.gbml import Inner
from metalab.meta.protonet import embedding_logits
from metalab.models.text import SentenceEncoder
from metalab.train.evaluate import part_seed

TEXT = DATA / text.TEXT_DIR
needs_text = pytest.mark.skipif(
    not all((TEXT / name).is_file() for name in ("valid.txt", "test.txt")),
    reason=f"WikiText-2 valid.txt / test.txt not found under {TEXT}",
)
CFG = TextTaskConfig(ways=4, shots=4, queries=4)
EVAL_SEED = 1_000_003
SPECIAL_IDS = (text.PAD_ID, text.MASK_ID, text.UNK_ID)


def smlmt_run(algo: str = "protonet", **train: Any) -> dict[str, Any]:
    section = {"hidden": 32} | (
        {"inner_lr": 0.1, "inner_steps": 2, "eval_inner_steps": 2} if algo == "maml" else {}
    )
    return {
        "algo": algo,
        "seed": 0,
        "task": {"dataset": "smlmt", "ways": 4, "shots": 4, "queries": 4},
        "train": {"steps": 10, "meta_batch": 4, "lr": 0.003, "device": "cpu", **train},
        "eval": {"episodes": 8, "batch": 8},
        algo: section,
    }


def text_scores(algo: str, encoder: torch.nn.Module, ep: Any) -> torch.Tensor:
    """The query logits a learner of ``algo`` (as :func:`smlmt_run` configures it) evaluates with."""
    if algo == "maml":
        return maml.text_logits(encoder, Inner(encoder, False, 0.1, 2), ep)
    return embedding_logits(embed_sentences(encoder, ep), ep)


# ------------------------------------------------------------------------------------ without the data


def test_sentences_are_split_lowercased_and_deduplicated(tmp_path: Path) -> None:
    path = tmp_path / "valid.txt"
    path.write_text(
        " \n = Title = \n \n = = Part = = \n"
        " The Cat sat on the mat . It was very Happy ! Too short . \n"
        " The cat sat on the mat . Was it seen by anyone ? \n"
    )
    assert read_sentences(path) == [
        ("the", "cat", "sat", "on", "the", "mat", "."),
        ("it", "was", "very", "happy", "!"),  # "too short ." is under MIN_TOKENS: dropped
        ("was", "it", "seen", "by", "anyone", "?"),
    ]


def test_sentences_are_cut_to_max_tokens(tmp_path: Path) -> None:
    path = tmp_path / "valid.txt"
    path.write_text(" " + " ".join(f"w{i}" for i in range(2 * MAX_TOKENS)) + " . \n")
    (sentence,) = read_sentences(path)
    assert len(sentence) == MAX_TOKENS


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "text" / "wikitext-2" / "test.txt")):
        make_sampler(CFG, "train", 0, tmp_path)


def test_masking_rule_whole_tokens_only_and_no_part_of_another_token() -> None:
    """The rule: a sentence stands for a word when the word is a whole token of it and inside no other token
    (``play`` in ``played``); masking then replaces every occurrence and leaves no trace of the word."""
    assert eligible_words("play the play today , they said .".split()) == ["play", "said", "today"]
    assert "play" not in eligible_words("they played the play again .".split())  # "played" holds "play"
    assert "play" not in eligible_words("the player will play tomorrow .".split())
    assert "played" in eligible_words("they played the play again .".split())
    assert eligible_words("the and of 1984 <unk> , to be".split()) == []  # stop words, numbers, specials
    sentences = [
        "we play and play again today .".split(),
        "children play outside every day .".split(),
        "he sang a song last night .".split(),
        "they sang together all evening .".split(),
        "the players play loudly tonight .".split(),  # not eligible for "play"
    ]
    vocab = Vocab.build(sentences)
    part = TextPart.build(sentences, vocab)
    play, sang = vocab.index["play"], vocab.index["sang"]
    assert part.pools[play].tolist() == [0, 1] and part.pools[sang].tolist() == [2, 3]
    sampler = SMLMTSampler(part, torch.tensor([play, sang]), n_way=2, k_shot=1, q_query=1, seed=0)
    ep = sampler.sample(0, 8)
    for t in range(8):
        for xs in (ep.support_x[t], ep.query_x[t]):
            for x in xs.tolist():
                tokens = vocab.decode(x)
                assert text.MASK in tokens
                assert not any(w in token for token in tokens for w in ("play", "sang") if token != text.MASK)


def test_a_word_in_any_case_in_the_file_is_masked_everywhere(tmp_path: Path) -> None:
    """Case variants in the raw text (``Album``, ``ALBUM``) are the same word once read: every one is masked,
    and no form of the word is left in the masked sentence."""
    path = tmp_path / "valid.txt"
    path.write_text(
        " The Album was an ALBUM of songs , an album indeed . \n The second album sold well . \n"
        " Their tour began in May . \n A long TOUR of Europe followed . \n"
    )
    sentences = read_sentences(path)
    vocab = Vocab.build(sentences)
    part = TextPart.build(sentences, vocab)
    album, tour = vocab.index["album"], vocab.index["tour"]
    sampler = SMLMTSampler(part, torch.tensor([album, tour]), n_way=2, k_shot=1, q_query=1, seed=0)
    draw, ep = sampler.draw(0, 4), sampler.sample(0, 4)
    for t in range(4):
        words = vocab.decode(draw.words[t].tolist())
        for xs, ys in ((ep.support_x[t], ep.support_y[t]), (ep.query_x[t], ep.query_y[t])):
            for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
                tokens = vocab.decode(x)
                assert not any(words[y] in token.lower() for token in tokens if token != text.MASK), tokens
                assert tokens.count(text.MASK) == (3 if "songs" in tokens else 1)


def test_word_split_is_a_fixed_hash() -> None:
    assert word_split("album") == word_split("album")
    parts = [word_split(f"word{i}") for i in range(2000)]
    shares = {p: parts.count(p) / len(parts) for p in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.70, abs=0.04)
    assert shares["val"] == pytest.approx(0.15, abs=0.03) and shares["test"] == pytest.approx(0.15, abs=0.03)


@pytest.mark.parametrize(
    ("task", "key"),
    [
        ({"shots": 0}, "task.shots"),
        ({"ways": 1}, "task.ways"),
        ({"shots": 40, "queries": 30}, "task.queries"),
        ({"window": MAX_TOKENS + 1}, "task.window"),
        ({"image_size": 28}, "task.image_size"),  # an image key: unknown to text tasks
        ({"train_part": "trainval"}, "task.train_part"),
    ],
)
def test_config_errors_name_the_key(task: dict[str, Any], key: str) -> None:
    data = smlmt_run()
    data["task"].update(task)
    with pytest.raises(ConfigError) as info:
        run_config_from_dict(data)
    assert info.value.key == key


def test_unknown_dataset_lists_smlmt_and_other_algorithms_are_refused() -> None:
    data = smlmt_run()
    data["task"]["dataset"] = "smlm"
    with pytest.raises(ConfigError, match="'smlmt'") as info:
        run_config_from_dict(data)
    assert info.value.key == "task.dataset"
    data = {**smlmt_run(), "algo": "reptile"}
    del data["protonet"]
    with pytest.raises(ConfigError, match="maml, protonet") as info:
        run_config_from_dict(data)
    assert info.value.key == "task.dataset"


@pytest.mark.parametrize("name", ["smlmt_protonet", "smlmt_maml"])
def test_the_config_file_loads(name: str) -> None:
    run = load_run_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert isinstance(run.task, TextTaskConfig) and run.label == "smlmt-4w4s"
    assert (run.task.ways, run.task.shots) == (4, 4)


# ---------------------------------------------------------------------------------------- with the data


@pytest.fixture(scope="module")
def corpus() -> text.Corpus:
    return load_corpus(DATA)


@needs_text
def test_words_are_disjoint_between_splits(corpus: text.Corpus) -> None:
    words = {
        p: {corpus.vocab.words[w] for w in corpus.words(p, 8).tolist()} for p in ("train", "val", "test")
    }
    assert all(len(w) >= 100 for w in words.values()), {p: len(w) for p, w in words.items()}
    assert not words["train"] & words["val"] and not words["train"] & words["test"]
    assert not words["val"] & words["test"]
    assert all(word_split(w) == p for p, ws in words.items() for w in ws)
    # Training draws only train words; val and test samplers only theirs.
    for part, seed in (("train", 0), ("val", EVAL_SEED), ("test", EVAL_SEED)):
        drawn = make_sampler(CFG, part, seed, DATA).draw(0, 32).words
        assert {corpus.vocab.words[w] for w in drawn.flatten().tolist()} <= words[part]


@needs_text
@pytest.mark.parametrize("part", ["train", "test"])
def test_no_sentence_in_both_support_and_query(corpus: text.Corpus, part: str) -> None:
    sampler = make_sampler(CFG, part, 3, DATA)
    draw, ep = sampler.draw(5, 64), sampler.sample(5, 64)
    for t in range(64):
        ids = draw.sentences[t].flatten().tolist()
        assert len(set(ids)) == len(ids)  # no sentence twice in a task, let alone in support and query
        support = {tuple(x) for x in ep.support_x[t].tolist()}
        assert not support & {tuple(x) for x in ep.query_x[t].tolist()}


@needs_text
@pytest.mark.parametrize("part", ["train", "val", "test"])
def test_masked_word_never_appears_in_its_sentence(corpus: text.Corpus, part: str) -> None:
    vocab = corpus.vocab
    sampler = make_sampler(CFG, part, 1, DATA)
    draw, ep = sampler.draw(0, 64), sampler.sample(0, 64)
    k = CFG.shots
    for t in range(64):
        for label, word in enumerate(vocab.decode(draw.words[t].tolist())):
            rows = torch.cat(
                [ep.support_x[t, label * k : (label + 1) * k], ep.query_x[t, label * 4 : (label + 1) * 4]]
            )
            for x in rows.tolist():
                assert MASK_ID in x  # the window keeps the first mask
                tokens = [vocab.words[i] for i in x if i not in SPECIAL_IDS]
                assert not any(word in token.lower() for token in tokens), (word, tokens)


@needs_text
def test_every_occurrence_is_masked_and_nothing_else_changes(corpus: text.Corpus) -> None:
    part = corpus.part("train")
    words = corpus.words("train", 8)
    sampler = SMLMTSampler(part, words, 4, 4, 4, seed=2, window=MAX_TOKENS)  # whole sentences
    draw, ep = sampler.draw(0, 16), sampler.sample(0, 16)
    x = torch.cat([ep.support_x.unflatten(1, (4, 4)), ep.query_x.unflatten(1, (4, 4))], 2)  # (T, N, K+Q, L)
    original = part.tokens[draw.sentences][..., : x.shape[-1]]
    assert torch.equal(x, torch.where(original == draw.words[:, :, None, None], MASK_ID, original))
    assert ((original == draw.words[:, :, None, None]).sum(-1) >= 1).all()
    assert (x[..., -1] == PAD_ID).any()  # padded to the longest sentence only


@needs_text
def test_labels_are_a_random_permutation_per_task() -> None:
    sampler = make_sampler(CFG, "train", 0, DATA)
    draw, ep = sampler.draw(0, 64), sampler.sample(0, 64)
    assert torch.equal(ep.support_y, torch.arange(4).repeat_interleave(4).expand(64, -1))
    assert torch.equal(ep.query_y, torch.arange(4).repeat_interleave(4).expand(64, -1))
    assert all(len(set(w)) == 4 for w in draw.words.tolist())  # 4 distinct words: labels 0..3 are a bijection
    # Labels follow the random draw order, not the word: label 0 is not always the smallest id.
    assert 0 < sum(w == sorted(w) for w in draw.words.tolist()) < 64


@needs_text
def test_seeded_sampling_is_bit_reproducible() -> None:
    a = make_sampler(CFG, "train", 7, DATA).sample(11, 8)
    b = make_sampler(CFG, "train", 7, DATA).sample(11, 8)
    for x, y in zip(a[:4], b[:4], strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.support_x, make_sampler(CFG, "train", 7, DATA).sample(12, 8).support_x)
    assert not torch.equal(a.support_x, make_sampler(CFG, "train", 8, DATA).sample(11, 8).support_x)
    # Val and test episodes are fixed by the evaluation seed: each part from its own part seed.
    val = make_sampler(CFG, "val", EVAL_SEED, DATA)
    assert (
        val.seed == part_seed(EVAL_SEED, "val")
        and make_sampler(CFG, "test", EVAL_SEED, DATA).seed == EVAL_SEED
    )
    assert torch.equal(
        val.sample(0, 8).query_x, make_sampler(CFG, "val", EVAL_SEED, DATA).sample(0, 8).query_x
    )


@needs_text
def test_render_task(corpus: text.Corpus) -> None:
    sampler = make_sampler(CFG, "test", EVAL_SEED, DATA)
    words = corpus.vocab.decode(sampler.draw(0, 1).words[0].tolist())
    shown = render_task(sampler.sample(0, 1), corpus.vocab, words)
    lines = shown.splitlines()
    assert len(lines) == 4 * (4 + 4) and all(text.MASK in line for line in lines)
    assert lines[0].startswith(f"support 0 [{words[0]}]: ") and lines[-1].startswith(
        f"query 3 [{words[3]}]: "
    )


@needs_text
def test_too_many_ways_for_the_words_names_the_key() -> None:
    cfg = TextTaskConfig(ways=64, shots=32, queries=32)
    with pytest.raises(ConfigError) as info:
        make_sampler(cfg, "test", EVAL_SEED, DATA)
    assert info.value.key == "task.ways"
    run = run_config_from_dict({**smlmt_run(), "protonet": {"bottleneck": 8}})
    with pytest.raises(ConfigError) as info:
        algorithm("protonet").build(run, DATA, torch.device("cpu"))
    assert info.value.key == "protonet.bottleneck"


@needs_text
@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_tiny_run_learns_the_training_tasks(algo: str) -> None:
    """100 steps of training lower the loss on fixed tasks of the training words (new to the learner), and
    the model then beats chance (1/4) on them."""
    torch.manual_seed(0)
    run = run_config_from_dict(smlmt_run(algo, meta_batch=8))
    learner = algorithm(algo).build(run, DATA, torch.device("cpu"))
    held = make_sampler(run.task, "train", 12345, DATA).sample(0, 64)  # another stream than training's

    def held_loss() -> float:
        learner.model.eval()
        with torch.no_grad():
            scores = text_scores(algo, learner.model, held)
        learner.model.train()
        return cross_entropy(scores, held).item()

    before = held_loss()
    opt = torch.optim.Adam(learner.model.parameters(), lr=1e-2)
    for step in range(100):
        loss, _ = learner.loss(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert after < before - 0.05, (before, after)
    learner.model.eval()
    with torch.no_grad():
        acc = accuracy(text_scores(algo, learner.model, held), held).mean().item()
    assert acc > 0.25 + 0.05, acc
    # the shared episodic evaluation, on the text samplers' fixed val episodes
    out = learner.evaluate("val", 4)
    assert set(out) == {
        "val/acc",
        "val/acc_ci95",
        "val/nll",
        "val/nll_ci95",
        "val/ece",
        "val/ece_low",
        "val/ece_high",
    }
    assert 0.0 <= out["val/acc"] <= 1.0 and out["val/nll"] > 0 and 0.0 <= out["val/ece"] <= 1.0


# ------------------------------------------------------------------------- the MAML text head, no data


def random_text_episode(tasks: int = 2, n: int = 4, k: int = 3, q: int = 2, seed: int = 0) -> Any:
    """A batched episode of random token ids (no corpus), labels grouped by class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n)
    return Episode(
        torch.randint(3, 50, (tasks, n * k, 12), generator=g),
        labels.repeat_interleave(k).expand(tasks, -1),
        torch.randint(3, 50, (tasks, n * q, 12), generator=g),
        labels.repeat_interleave(q).expand(tasks, -1),
        n,
        k,
        q,
    )


def test_prototype_head_ranks_like_protonet() -> None:
    """Before any inner step the MAML text head's softmax is ProtoNet's: 2 c.z - |c|^2 differs from -|z - c|^2
    by |z|^2, the same for every class of a query."""
    torch.manual_seed(0)
    encoder = SentenceEncoder(50, 16).eval()
    ep = random_text_episode()
    with torch.no_grad():
        head = maml.text_logits(encoder, Inner(encoder, False, 0.1, 0), ep)
        proto = embedding_logits(embed_sentences(encoder, ep), ep)
    torch.testing.assert_close(head.log_softmax(-1), proto.log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_maml_text_head_steps_lower_the_support_loss_and_never_read_query_labels() -> None:
    torch.manual_seed(0)
    encoder = SentenceEncoder(50, 16).eval()
    ep = random_text_episode()
    z = embed_sentences(encoder, ep).detach()
    zs, ys = z[0, : ep.support_x.shape[1]], ep.support_y[0]
    start = maml.prototype_head(zs, ys, ep.n_way)
    adapted = adapt(start, maml.head_loss, (zs, ys), 5, 0.5)
    assert maml.head_loss(adapted, zs, ys) < maml.head_loss(start, zs, ys)
    inner = Inner(encoder, False, 0.5, 5)
    shuffled = ep._replace(query_y=ep.query_y.flip(-1))
    with torch.no_grad():
        torch.testing.assert_close(
            maml.text_logits(encoder, inner, ep), maml.text_logits(encoder, inner, shuffled)
        )


def test_maml_text_meta_gradient_matches_finite_differences() -> None:
    """The outer gradient through two inner head steps (second order), for one encoder weight, against a
    central difference in float64."""
    torch.manual_seed(0)
    encoder = SentenceEncoder(50, 8, layers=1, heads=2, dropout=0.0).double().eval()
    ep = random_text_episode(tasks=1)
    inner = Inner(encoder, False, 0.3, 2)
    weight = encoder.norm.weight

    def loss() -> torch.Tensor:
        return cross_entropy(maml.text_logits(encoder, inner, ep), ep)

    (grad,) = torch.autograd.grad(loss(), weight)
    eps, i = 1e-6, 3
    with torch.no_grad():
        weight[i] += eps
        up = loss().item()
        weight[i] -= 2 * eps
        down = loss().item()
        weight[i] += eps
    assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
