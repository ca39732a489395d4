"""Black-box learners (MANN-style LSTM, SNAIL): causality, sequence construction, shuffling, shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metalab.data.episodes import EpisodeSampler, ShuffledSampler, shuffle_order
from metalab.errors import ConfigError
from metalab.experiment import algorithm, run_config_from_dict
from metalab.meta import mann, snail
from metalab.train.loop import fit


def pool(classes: int = 6, per_class: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (classes, per_class, 1, 28, 28), dtype=torch.uint8, generator=g)


def test_shuffled_sampler_is_deterministic_per_index_and_keeps_image_label_pairs() -> None:
    base = EpisodeSampler(pool(), 3, 2, 4, seed=0)
    sampler = ShuffledSampler(base, seed=7)
    a, b, c = sampler.sample(0, 4), sampler.sample(0, 4), sampler.sample(1, 4)
    assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4], strict=True))
    assert not torch.equal(a.support_y, c.support_y) or not torch.equal(a.support_x, c.support_x)
    plain = base.sample(0, 4)
    for t in range(4):  # same multiset of (image, label) pairs, in another order
        for x, y in zip(a.query_x[t], a.query_y[t], strict=True):
            match = (plain.query_x[t] == x).flatten(1).all(1)
            assert plain.query_y[t][match].eq(y).all() and match.any()
    assert not torch.equal(a.query_y, plain.query_y)  # the order did change


def test_offset_sequence_shows_previous_label() -> None:
    ep = shuffle_order(EpisodeSampler(pool(), 3, 2, 2, seed=1).sample(0, 2), torch.Generator().manual_seed(0))
    x, shown, y, mask = mann.sequence(ep, "offset")
    assert x.shape == (2, 12, 1, 28, 28) and mask.all()
    assert shown[:, 0].eq(0).all()
    assert torch.equal(shown[:, 1:].argmax(-1), y[:, :-1])


def test_support_query_sequence_hides_query_labels_and_scores_queries_only() -> None:
    ep = EpisodeSampler(pool(), 3, 2, 2, seed=1).sample(0, 2)
    _, shown, y, mask = mann.sequence(ep, "support_query")
    assert torch.equal(shown[:, :6].argmax(-1), ep.support_y) and shown[:, 6:].eq(0).all()
    assert mask[:, 6:].all() and not mask[:, :6].any()
    assert torch.equal(y[:, 6:], ep.query_y)


def test_instance_numbers_by_hand() -> None:
    y = torch.tensor([[2, 0, 2, 1, 0, 2]])
    assert mann.instance_numbers(y, 3).tolist() == [[1, 1, 2, 1, 2, 3]]


MEMORY_VARIANTS = {
    "lstm": {},
    "memory": {"memory": True},
    "fed_back": {"memory": True, "feed_reads": True},
    "per_head_sharpened": {
        "memory": True,
        "feed_reads": True,
        "least_used": "per_head",
        "key_strength": 10.0,
    },
    "read_before_write": {"memory": True, "key_strength": 10.0, "read_before_write": True},
}


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_mann_is_causal(variant: str) -> None:
    torch.manual_seed(0)
    extra = MEMORY_VARIANTS[variant]
    model = mann.MANN(
        mann.Config(hidden=16, encoder="conv4", memory_slots=8, memory_width=4, read_heads=2, **extra), 3
    )
    x, shown = torch.rand(2, 7, 1, 28, 28), torch.rand(2, 7, 3)
    out = model(x, shown)
    x2, shown2 = x.clone(), shown.clone()
    x2[:, 4:] = torch.rand(2, 3, 1, 28, 28)
    shown2[:, 4:] = 0
    out2 = model(x2, shown2)
    torch.testing.assert_close(out[:, :4], out2[:, :4])
    assert not torch.allclose(out[:, 4:], out2[:, 4:])


def test_mann_fused_lstm_equals_a_loop_of_lstm_cells_and_loads_their_checkpoints() -> None:
    """The controller runs as one ``nn.LSTM`` call; it must compute what a step-by-step ``nn.LSTMCell`` loop over
    the same weights computes, and checkpoints saved with the ``LSTMCell`` names must load into it."""
    torch.manual_seed(0)
    model = mann.MANN(mann.Config(hidden=6, encoder="pixels"), 3, image_size=16).double()
    x, shown = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64), torch.rand(2, 5, 3, dtype=torch.float64)
    cell = torch.nn.LSTMCell(16 * 16 + 3, 6).double()
    saved = {k: v for k, v in model.state_dict().items() if not k.startswith("lstm.")}
    saved |= {f"lstm.{k}": v for k, v in cell.state_dict().items()}  # the old names: lstm.weight_ih, ...
    model.load_state_dict(saved)
    inputs = torch.cat([x.flatten(2), shown], dim=-1)
    h = c = inputs.new_zeros(2, 6)
    steps = []
    for t in range(5):
        h, c = cell(inputs[:, t], (h, c))
        steps.append(h)
    torch.testing.assert_close(model(x, shown), model.head(torch.stack(steps, dim=1)))


def test_mann_fed_back_reads_reach_the_controller_and_only_from_earlier_steps() -> None:
    """With ``feed_reads`` step t's controller input holds the reads of step t-1: cutting that input (zero weights)
    leaves step 0 unchanged (its reads input is zero), changes every later step, and leaves an LSTM over the
    image and label inputs alone, i.e. the stepped cell computes what ``nn.LSTM`` computes."""
    torch.manual_seed(0)
    cfg = mann.Config(hidden=6, encoder="pixels", memory=True, memory_slots=8, memory_width=3, read_heads=2,
                      feed_reads=True)  # fmt: skip
    model = mann.MANN(cfg, 3, image_size=16).double()
    x, shown = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64), torch.rand(2, 5, 3, dtype=torch.float64)
    given = 16 * 16 + 3
    assert model.lstm.input_size == given + 2 * 3
    out = model(x, shown)
    inputs = torch.cat([x.flatten(2), shown], dim=-1)
    with torch.no_grad():
        model.lstm.weight_ih_l0[:, given:] = 0
    cut = model(x, shown)
    torch.testing.assert_close(out[:, 0], cut[:, 0])
    assert (out[:, 1:] - cut[:, 1:]).abs().amax(-1).min() > 1e-6  # every later step depended on its reads
    ref = torch.nn.LSTM(given, 6, batch_first=True).double()
    ref.load_state_dict(
        {k: v[:, :given] if k == "weight_ih_l0" else v for k, v in model.lstm.state_dict().items()}
    )
    torch.testing.assert_close(model._with_reads_fed_back(inputs)[..., :6], ref(inputs)[0])


@pytest.mark.parametrize("least_used", ["one", "per_head"])
def test_lru_memory_clears_and_writes_the_least_used_slots(least_used: str) -> None:
    """All write weight on the least-used side (gate closed): ``one`` clears the least-used row and sums every
    head's key into it; ``per_head`` clears the ``heads`` least-used rows and writes head i's key into the i-th."""
    torch.manual_seed(0)
    mem = mann.LRUMemory(5, slots=6, width=3, heads=2, decay=0.9, least_used=least_used).double()
    with torch.no_grad():
        mem.gate.weight.zero_()
        mem.gate.bias.fill_(-50.0)  # sigma(alpha) ~ 0: no weight on the last-read slots
    h = torch.randn(1, 5, dtype=torch.float64)
    memory = torch.randn(1, 6, 3, dtype=torch.float64)
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.05, 0.7, 0.3]], dtype=torch.float64)  # least used: 3, then 1
    last_read = torch.softmax(torch.randn(1, 2, 6, dtype=torch.float64), -1)
    _, (new, new_usage, read) = mem.step(h, (memory, usage, last_read))
    keys = mem.keys(h).view(2, 3)
    written = [3] if least_used == "one" else [3, 1]
    if least_used == "one":
        torch.testing.assert_close(new[0, 3], keys.sum(0))
    else:
        torch.testing.assert_close(new[0, 3], keys[0])
        torch.testing.assert_close(new[0, 1], keys[1])
    kept = [i for i in range(6) if i not in written]
    torch.testing.assert_close(new[0, kept], memory[0, kept])
    write = torch.zeros(6, dtype=torch.float64)
    write[written] = 2.0 / len(written)
    torch.testing.assert_close(new_usage[0], 0.9 * usage[0] + read[0].sum(0) + write, atol=1e-12, rtol=0)


def test_lru_memory_read_before_write_reads_the_old_memory_and_writes_the_same() -> None:
    """Reading after the write (the default), head i's best match is the slot it just wrote (cosine 1); with
    ``read_before_write`` the reads are those of the memory before the write, and the write is unchanged."""
    torch.manual_seed(0)
    after = mann.LRUMemory(5, slots=6, width=3, heads=2, decay=0.9, least_used="per_head").double()
    before = mann.LRUMemory(
        5, slots=6, width=3, heads=2, decay=0.9, least_used="per_head", read_before_write=True
    )
    before.double().load_state_dict(after.state_dict())
    with torch.no_grad():
        for mem in (after, before):
            mem.gate.weight.zero_()
            mem.gate.bias.fill_(-50.0)
    h = torch.randn(1, 5, dtype=torch.float64)
    memory = torch.randn(1, 6, 3, dtype=torch.float64)
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.05, 0.7, 0.3]], dtype=torch.float64)  # least used: 3, then 1
    state = (memory, usage, torch.softmax(torch.randn(1, 2, 6, dtype=torch.float64), -1))
    r_after, (m_after, _, w_after) = after.step(h, state)
    r_before, (m_before, _, w_before) = before.step(h, state)
    assert w_after.argmax(-1).tolist() == [[3, 1]]
    torch.testing.assert_close(m_before, m_after)
    keys = before.keys(h).view(1, 2, 3)
    expected = torch.softmax(F.cosine_similarity(keys[:, :, None], memory[:, None], dim=-1), -1)
    torch.testing.assert_close(w_before, expected)
    torch.testing.assert_close(r_before, (expected @ memory).flatten(1))
    assert not torch.allclose(r_before, r_after)


def test_lru_memory_key_strength_starts_where_set_and_sharpens_reads() -> None:
    """Plain cosine reads keep every slot within e^2 of another's weight; a key strength starting at 500 puts
    nearly all of a head's read weight on its best-matching slot."""
    torch.manual_seed(0)
    h = torch.randn(4, 5)
    state = (torch.randn(4, 8, 3), torch.rand(4, 8), torch.softmax(torch.randn(4, 2, 8), -1))
    plain = mann.LRUMemory(5, slots=8, width=3, heads=2, decay=0.9)
    read = plain.step(h, state)[1][2]
    assert (read.amax(-1) / read.amin(-1)).max() <= torch.e**2 + 1e-4
    for start in (1.5, 10.0, 500.0):
        sharp = mann.LRUMemory(5, slots=8, width=3, heads=2, decay=0.9, key_strength=start)
        torch.testing.assert_close(1 + F.softplus(sharp.strength.bias), torch.full((2,), start))
    sharp.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        sharp.strength.weight.zero_()
    sharpened = sharp.step(h, state)[1][2]
    assert sharpened.amax(-1).min() > 0.99
    torch.testing.assert_close(sharpened.argmax(-1), read.argmax(-1))


@pytest.mark.parametrize("key", ["feed_reads", "key_strength", "least_used", "read_before_write"])
def test_mann_memory_options_need_memory(key: str) -> None:
    value = {"least_used": "per_head", "key_strength": 10.0}.get(key, True)
    with pytest.raises(ConfigError) as err:
        mann.Config(**{key: value})
    assert err.value.key == key
    mann.Config(memory=True, **{key: value})


def test_snail_is_causal_and_shapes() -> None:
    torch.manual_seed(0)
    model = snail.SNAIL(n_way=5, length=6, hidden=8, filters=8)
    z, shown = torch.rand(3, 6, 8), torch.rand(3, 6, 5)
    out = model(z, shown)
    assert out.shape == (3, 6, 5)
    z2 = z.clone()
    z2[:, 3:] += 1.0
    out2 = model(z2, shown)
    torch.testing.assert_close(out[:, :3], out2[:, :3])
    assert not torch.allclose(out[:, 3:], out2[:, 3:])


@pytest.mark.parametrize(("n_way", "support", "length"), [(5, 5, 6), (3, 6, 7), (2, 8, 9), (4, 1, 9)])
def test_snail_shared_prefix_equals_one_whole_sequence_per_query(
    n_way: int, support: int, length: int
) -> None:
    # query_forward runs the support prefix once; forward runs each (support + query) sequence whole. Same
    # logits and same gradients, also where a dilation reaches past the start of the sequence (a network built
    # for length 9 has dilations up to 8, on a prefix of 1).
    torch.manual_seed(0)
    model = snail.SNAIL(n_way=n_way, length=length, hidden=8, filters=8).double()
    b, q = 2, 3
    d = model.encoder.embedding_dim
    z, query = torch.randn(b, support, d, dtype=torch.double), torch.randn(b, q, d, dtype=torch.double)
    shown = F.one_hot(torch.randint(n_way, (b, support)), n_way).double()
    fast = model.query_forward(z, shown, query)
    params = [*model.body.parameters(), *model.head.parameters()]
    fast_grads = torch.autograd.grad(fast.square().sum(), params)
    seq = torch.cat([z[:, None].expand(-1, q, -1, -1), query[:, :, None]], dim=2).flatten(0, 1)
    labels = F.pad(shown, (0, 0, 0, 1))[:, None].expand(-1, q, -1, -1).flatten(0, 1)
    whole = model(seq, labels)[:, -1].view(b, q, n_way)
    whole_grads = torch.autograd.grad(whole.square().sum(), params)
    torch.testing.assert_close(fast, whole)
    for g_fast, g_whole in zip(fast_grads, whole_grads, strict=True):
        torch.testing.assert_close(g_fast, g_whole)


def test_snail_tied_init_starts_keys_equal_to_queries_as_separate_parameters() -> None:
    torch.manual_seed(0)
    tied = snail.SNAIL(n_way=3, length=4, hidden=8, filters=8)  # tied is the default
    blocks = [m for m in tied.modules() if isinstance(m, snail.AttentionBlock)]
    assert len(blocks) == 3
    for b in blocks:
        torch.testing.assert_close(b.key.weight, b.query.weight)
        torch.testing.assert_close(b.key.bias, b.query.bias)
    # separate parameters: a gradient step moves them apart (a shared one would get one summed gradient)
    z, shown = torch.randn(2, 3, tied.encoder.embedding_dim), torch.eye(3).expand(2, 3, 3)
    tied(z, shown).square().sum().backward()
    assert not torch.allclose(blocks[0].key.weight.grad, blocks[0].query.weight.grad)
    untied = snail.SNAIL(n_way=3, length=4, hidden=8, filters=8, tied_qk_init=False)
    b0 = next(m for m in untied.modules() if isinstance(m, snail.AttentionBlock))
    assert not torch.allclose(b0.key.weight, b0.query.weight)


@pytest.mark.parametrize("embed_norm", [False, True])
def test_snail_query_logits_shape_and_each_query_sees_only_the_support(embed_norm: bool) -> None:
    torch.manual_seed(0)
    model = snail.SNAIL(n_way=3, length=7, hidden=8, filters=8, embed_norm=embed_norm)
    assert isinstance(model.embed_norm, torch.nn.LayerNorm) == embed_norm
    ep = EpisodeSampler(pool(), 3, 2, 2, seed=0).sample(0, 2)
    logits = snail.query_logits(model, ep)
    assert logits.shape == (2, 6, 3)
    # replacing the other queries leaves a query's logits unchanged: queries are separate sequences, and the
    # embedding normalises each image on its own
    ref = logits
    other = ep._replace(query_x=torch.cat([ep.query_x[:, :1], torch.rand_like(ep.query_x[:, 1:])], dim=1))
    torch.testing.assert_close(snail.query_logits(model, other)[:, 0], ref[:, 0])


def test_snail_spread_labels_is_a_per_task_injection_into_the_label_space() -> None:
    ep = EpisodeSampler(pool(), 3, 2, 4, seed=0).sample(0, 64)
    out = snail.spread_labels(ep, 20, torch.Generator().manual_seed(0))
    assert torch.equal(out.support_x, ep.support_x) and torch.equal(out.query_x, ep.query_x)
    maps = set()
    for t in range(64):
        # one label per class, the same in support and queries, distinct classes apart, all within 0..19
        mapping = {int(a): int(b) for a, b in zip(ep.support_y[t], out.support_y[t], strict=True)}
        assert len(mapping) == 3 and len(set(mapping.values())) == 3 and max(mapping.values()) < 20
        assert [mapping[int(a)] for a in ep.query_y[t]] == out.query_y[t].tolist()
        maps.add(tuple(sorted(mapping.items())))
    assert len(maps) > 50  # drawn per task: 64 tasks, 6840 possible maps
    assert {v for m in maps for _, v in m} == set(range(20))  # every slot gets used


def test_snail_trains_on_fewer_ways_than_it_tests(
    omniglot_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spread = []  # (train ways, label space) of every training batch the loss spreads
    real = snail.spread_labels
    monkeypatch.setattr(
        snail, "spread_labels", lambda ep, n, g: spread.append((ep.n_way, n)) or real(ep, n, g)
    )
    spec = {
        "algo": "snail", "snail": {"hidden": 8, "tc_filters": 8},
        "task": {"dataset": "omniglot", "ways": 4, "train_ways": 2, "shots": 1, "queries": 2},
        "train": {"steps": 2, "meta_batch": 2, "eval_every": 2, "eval_episodes": 4, "checkpoint_every": 2,
                  "device": "cpu"},
        "eval": {"episodes": 4, "batch": 2},
    }  # fmt: skip
    learner = algorithm("snail").build(run_config_from_dict(spec), omniglot_root, torch.device("cpu"))
    result = fit(learner, run_config_from_dict(spec).train, tmp_path)
    assert result.step == 2 and 0 <= result.metrics["val/acc"] <= 1
    assert spread == [(2, 4), (2, 4)]  # every training step's 2-way labels go into the 4-label space
    spec["task"] = {**spec["task"], "train_ways": 5}
    with pytest.raises(ConfigError, match=r"task\.train_ways"):
        algorithm("snail").build(run_config_from_dict(spec), omniglot_root, torch.device("cpu"))


def test_snail_label_head_init_reads_each_labels_value_from_the_last_attention() -> None:
    """Logit j at init = scale * <last attention's read, value of one-hot label j> / ||that value||^2."""
    torch.manual_seed(0)
    n, scale = 6, 5.0
    model = snail.SNAIL(n, 7, hidden=8, filters=8, label_head_init=scale)
    reads = []
    last = model.body[-1]
    last.register_forward_hook(lambda mod, inp, out: reads.append(out[:, -last.value.out_features :]))
    z, labels = torch.randn(3, 7, model.encoder.embedding_dim), torch.randint(0, n, (3, 7))
    logits = model(z, F.one_hot(labels, n).float())  # (B, L, N)
    u = last.value.weight[:, model.encoder.embedding_dim : model.encoder.embedding_dim + n]  # (V, N)
    expected = reads[0].transpose(1, 2) @ (u / u.pow(2).sum(0)) * scale
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("name", ["mann", "snail"])
def test_build_runs_a_few_steps_on_omniglot(name: str, omniglot_root: Path, tmp_path: Path) -> None:
    extra = {"mann": {"hidden": 16, "encoder": "pixels"}, "snail": {"hidden": 8, "tc_filters": 8}}[name]
    run = run_config_from_dict({
        "algo": name, name: extra,
        "task": {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2},
        "train": {"steps": 3, "meta_batch": 2, "eval_every": 3, "eval_episodes": 4, "checkpoint_every": 3,
                  "device": "cpu"},
        "eval": {"episodes": 4, "batch": 2},
    })  # fmt: skip
    learner = algorithm(name).build(run, omniglot_root, torch.device("cpu"))
    result = fit(learner, run.train, tmp_path)
    assert result.step == 3 and 0 <= result.metrics["val/acc"] <= 1


@pytest.mark.slow
def test_mann_learns_5way_above_chance(omniglot_root: Path, tmp_path: Path) -> None:
    run = run_config_from_dict({
        "algo": "mann", "mann": {"hidden": 64, "encoder": "conv4", "mode": "offset"},
        "task": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 4},
        "train": {"steps": 300, "meta_batch": 8, "lr": 0.002, "eval_every": 1000, "eval_episodes": 10,
                  "checkpoint_every": 1000, "device": "cpu"},
        "eval": {"episodes": 100, "batch": 25},
    })  # fmt: skip
    torch.manual_seed(0)
    learner = algorithm("mann").build(run, omniglot_root, torch.device("cpu"))
    fit(learner, run.train, tmp_path)
    metrics = learner.evaluate("test", 100)
    print(
        f"measured: mann acc_inst1 {metrics['test/acc_inst1']:.3f} acc_inst3 {metrics['test/acc_inst3']:.3f}"
    )
    # a first sighting is a guess (20%); later sightings must be recognised far better than chance
    assert metrics["test/acc_inst1"] < 0.35
    assert metrics["test/acc_inst3"] > 0.5, metrics


@pytest.mark.slow
def test_snail_learns_5way_1shot_above_chance(omniglot_root: Path, tmp_path: Path) -> None:
    run = run_config_from_dict({
        "algo": "snail", "snail": {"hidden": 32, "tc_filters": 32},
        "task": {"dataset": "omniglot", "ways": 5, "shots": 1, "queries": 5},
        "train": {"steps": 200, "meta_batch": 4, "lr": 0.001, "eval_every": 1000, "eval_episodes": 10,
                  "checkpoint_every": 1000, "device": "cpu"},
        "eval": {"episodes": 100, "batch": 25},
    })  # fmt: skip
    torch.manual_seed(0)
    learner = algorithm("snail").build(run, omniglot_root, torch.device("cpu"))
    fit(learner, run.train, tmp_path)
    acc = learner.evaluate("test", 100)["test/acc"]
    print(f"measured: snail acc {acc:.3f}")
    assert acc > 0.6
