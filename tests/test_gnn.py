"""GNN few-shot learner (Garcia & Bruna, ICLR 2018) on synthetic 16x16 episodes: shapes, the learned adjacency,
permutation equivariance, query independence, gradient flow, reproducibility, exact resume and config errors."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metalab.data.episodes import Episode, EpisodeSampler
from metalab.data.tasks import TaskConfig
from metalab.errors import ConfigError
from metalab.experiment import algorithm, run_config_from_dict
from metalab.meta import episodic, gnn
from metalab.meta.episodic import cross_entropy
from metalab.models import set_batchnorm_mode
from metalab.train.evaluate import PARTS
from metalab.train.loop import CHECKPOINT, fit
from metalab.utils import seed_everything

SIZE = 16  # the smallest image side Conv-4 takes: a 1x1 final map, so the embedding is `hidden`-d
HIDDEN = 8


def tiny_config(**changes: object) -> gnn.Config:
    fields = {
        "hidden": HIDDEN,
        "layers": 2,
        "node_features": 6,
        "edge_ratios": (2.0, 1.0),
        "edge_dropout": 0.0,
    }
    return gnn.Config(**{**fields, **changes})


def tiny_model(n_way: int, batchnorm: str = "inductive", seed: int = 0, **changes: object) -> gnn.GNN:
    torch.manual_seed(seed)
    model = gnn.GNN(n_way, tiny_config(batchnorm=batchnorm, **changes), image_size=SIZE)
    set_batchnorm_mode(model, batchnorm)
    return model


def toy_episode(n: int = 3, k: int = 2, q: int = 2, tasks: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, n * k, 1, SIZE, SIZE, generator=g)
    qx = torch.rand(tasks, n * q, 1, SIZE, SIZE, generator=g)
    sy = torch.arange(n).repeat_interleave(k).expand(tasks, -1)
    qy = torch.arange(n).repeat_interleave(q).expand(tasks, -1)
    return Episode(sx, sy, qx, qy, n, k, q)


def warm_up(model: gnn.GNN, ep: Episode) -> gnn.GNN:
    """A few training-mode forwards, so the running statistics are no longer the initial (0, 1), then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            gnn.episode_logits(model, ep)
    return model.eval()


@pytest.mark.parametrize(("mode", "graphs", "nodes"), [("per_query", 2 * 6, 6 + 1), ("episode", 2, 6 + 6)])
def test_shapes_and_node_features(mode: str, graphs: int, nodes: int) -> None:
    model = tiny_model(3, graph=mode)
    ep = toy_episode(n=3, k=2, q=2)
    assert gnn.episode_logits(model, ep).shape == (2, 6, 3)
    z = torch.randn(2, 12, HIDDEN)
    x = gnn.graph_nodes(z[:, :6], ep.support_y, z[:, 6:], 3, mode)
    assert x.shape == (graphs, nodes, HIDDEN + 3)
    if mode == "per_query":  # graph t*M + m: task t's support, then its query m
        torch.testing.assert_close(x[1 * 6 + 4, :6, :HIDDEN], z[1, :6])
        torch.testing.assert_close(x[1 * 6 + 4, 6, :HIDDEN], z[1, 6 + 4])
    support_labels, query_labels = x[:, :6, HIDDEN:], x[:, 6:, HIDDEN:]
    torch.testing.assert_close(
        support_labels, F.one_hot(ep.support_y[0], 3).float().expand_as(support_labels)
    )
    torch.testing.assert_close(
        query_labels, torch.full_like(query_labels, 1 / 3)
    )  # the paper's uniform label


def all_ordered_pairs(adjacency: gnn.Adjacency, x: torch.Tensor) -> torch.Tensor:
    """The adjacency computed the direct way: the MLP on every ordered pair ``i != j``, scores masked, softmax."""
    n = x.shape[1]
    off = ~torch.eye(n, dtype=torch.bool)
    h = (x[:, :, None] - x[:, None, :]).abs()[:, off]  # (B, n(n-1), F)
    for linear, bn in zip(adjacency.linears, adjacency.norms, strict=True):
        h = F.leaky_relu(gnn.norm_last(bn, linear(h)))
    scores = torch.full((x.shape[0], n, n), -torch.inf)
    scores[:, off] = adjacency.out(h).squeeze(-1)
    return scores.softmax(-1)


@pytest.mark.parametrize("training", [True, False])
def test_adjacency_is_row_stochastic_without_self_edges(training: bool) -> None:
    torch.manual_seed(0)
    adjacency = gnn.Adjacency(5, (7, 4))
    set_batchnorm_mode(adjacency, "inductive")
    x = torch.randn(3, 6, 5)
    adjacency(x)  # move the running statistics off their initial values
    adjacency.train(training)
    a = adjacency(x)
    assert a.shape == (3, 6, 6) and (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 6))
    assert torch.equal(a.diagonal(dim1=1, dim2=2), torch.zeros(3, 6))
    # one MLP pass per unordered pair gives what every ordered pair would (BatchNorm statistics included)
    torch.testing.assert_close(a, all_ordered_pairs(adjacency, x))
    assert not torch.allclose(a, torch.full_like(a, 0.2))  # learned weights, not a uniform average


@pytest.mark.parametrize("mode", ["per_query", "episode"])
@pytest.mark.parametrize("training", [False, True])
def test_support_order_does_not_change_query_logits(mode: str, training: bool) -> None:
    ep = toy_episode(n=3, k=2, q=2, tasks=2)
    model = warm_up(tiny_model(3, graph=mode), ep).train(training)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = ep._replace(support_x=ep.support_x[:, order], support_y=ep.support_y[:, order])
    before, after = gnn.episode_logits(model, ep), gnn.episode_logits(model, shuffled)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # the support's labels matter: the same order with its labels left behind is another episode
    mislabelled = ep._replace(support_x=ep.support_x[:, order])
    assert not torch.allclose(gnn.episode_logits(model, mislabelled), before, rtol=1e-3, atol=1e-4)


def permute_label_weights(model: gnn.GNN, perm: torch.Tensor) -> None:
    """Rewire ``model`` so that label ``perm[c]`` plays the part label ``c`` played: every weight reading a label
    feature (edge MLPs' first layers; graph convolutions, on ``x`` and on ``A x``) and the logits' outputs."""
    d, n = model.encoder.embedding_dim, len(perm)
    src, dst = torch.arange(n), perm

    def move_columns(weight: torch.Tensor, offset: int) -> None:
        weight[:, offset + dst] = weight[:, offset + src].clone()

    with torch.no_grad():
        graph = model.graph
        for adjacency in [*graph.adjacencies, graph.last_adjacency]:
            move_columns(adjacency.linears[0].weight, d)
        for conv in [*graph.convs, graph.last_conv]:
            half = conv.linear.weight.shape[1] // 2
            move_columns(conv.linear.weight, d)
            move_columns(conv.linear.weight, half + d)
        last = graph.last_conv
        for t in (
            last.linear.weight,
            last.norm.weight,
            last.norm.bias,
            last.norm.running_mean,
            last.norm.running_var,
        ):
            t[dst] = t[src].clone()  # output channel c is logit c


def test_relabelling_classes_permutes_the_logit_columns() -> None:
    """Label c renamed perm[c]: with the label-reading weights rewired the same way, logit column perm[c] is
    the old column c. Without rewiring it is not: like the paper's, the network has no symmetry tying the label
    dimensions, so equivariance to relabelling is learned, not built in."""
    ep = toy_episode(n=4, k=2, q=2, tasks=2)
    model = warm_up(tiny_model(4), ep)
    perm = torch.tensor([2, 0, 3, 1])
    relabelled = ep._replace(support_y=perm[ep.support_y], query_y=perm[ep.query_y])
    before = gnn.episode_logits(model, ep)
    plain = gnn.episode_logits(model, relabelled)
    assert not torch.allclose(plain[..., perm], before, rtol=1e-3, atol=1e-4)
    permute_label_weights(model, perm)
    torch.testing.assert_close(gnn.episode_logits(model, relabelled)[..., perm], before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("mode", "batchnorm", "independent"),
    [("per_query", "inductive", True), ("episode", "inductive", False), ("per_query", "transductive", False)],
)
def test_one_query_per_graph_ignores_the_other_queries(mode: str, batchnorm: str, independent: bool) -> None:
    """At evaluation a query's logits depend on the other queries only through an episode graph or
    transductive BatchNorm; with one graph per query and inductive BatchNorm they do not."""
    ep = toy_episode(n=3, k=1, q=3, tasks=2)
    model = warm_up(tiny_model(3, batchnorm, graph=mode), ep)
    others = ep.query_x.clone()
    others[:, 1:] = torch.rand_like(others[:, 1:])  # every query but the first of each task replaced
    before = gnn.episode_logits(model, ep)[:, 0]
    after = gnn.episode_logits(model, ep._replace(query_x=others))[:, 0]
    if independent:
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    else:
        assert not torch.allclose(after, before, rtol=1e-3, atol=1e-4)


def test_evaluation_chunks_give_the_same_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = toy_episode(n=3, k=2, q=3, tasks=2)
    model = warm_up(tiny_model(3), ep)
    whole = gnn.episode_logits(model, ep)
    monkeypatch.setattr(gnn, "EVAL_EDGES", 2 * 7 * 7)  # two graphs of 7 nodes per forward
    torch.testing.assert_close(gnn.episode_logits(model, ep), whole)


def test_gradients_reach_every_parameter_and_the_encoder() -> None:
    model = tiny_model(3, edge_dropout=0.3)
    model.train()
    ep = toy_episode()
    cross_entropy(gnn.episode_logits(model, ep), ep).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    first_conv = model.encoder.features[0][0].weight.grad
    assert first_conv.norm() > 1e-4 * model.encoder.features[0][0].weight.norm()


def test_adam_steps_fit_a_fixed_episode() -> None:
    """Training on one episode drives its query accuracy to 1: the loss points the right way."""
    model = tiny_model(3)
    ep = toy_episode(n=3, k=2, q=2, tasks=1, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = cross_entropy(gnn.episode_logits(model, ep), ep)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]
    assert episodic.accuracy(gnn.episode_logits(model, ep), ep).item() == 1.0


def run_spec(**gnn_section: object) -> dict:
    return {
        "algo": "gnn",
        "seed": 3,
        "task": {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2, "image_size": SIZE},
        "train": {
            "steps": 6,
            "meta_batch": 2,
            "lr": 0.003,
            "log_every": 1,
            "eval_every": 3,
            "eval_episodes": 4,
            "checkpoint_every": 2,
            "device": "cpu",
        },
        "eval": {"episodes": 4, "batch": 2},
        "gnn": {"hidden": HIDDEN, "node_features": 6, "edge_ratios": [2.0, 1.0], **gnn_section},
    }


@pytest.fixture
def synthetic_omniglot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``build`` draws its episodes from random 16x16 "characters" instead of Omniglot."""
    pool = torch.randint(0, 256, (10, 6, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    pool = pool.to(torch.uint8)

    def sampler(cfg: TaskConfig, part: str, seed: int, root: Path) -> EpisodeSampler:
        return EpisodeSampler(
            pool, cfg.train_ways or cfg.ways, cfg.shots, cfg.train_queries or cfg.queries, seed
        )

    def eval_samplers(cfg: TaskConfig, seed: int, root: Path) -> dict[str, EpisodeSampler]:
        return {
            part: EpisodeSampler(pool, cfg.ways, cfg.shots, cfg.queries, seed + i)
            for i, part in enumerate(PARTS)
        }

    monkeypatch.setattr(episodic, "make_sampler", sampler)
    monkeypatch.setattr(episodic, "EvalSamplers", eval_samplers)


def train(tmp_path: Path, spec: dict) -> dict[str, torch.Tensor]:
    run = run_config_from_dict(spec)
    seed_everything(run.seed)
    learner = gnn.build(run, tmp_path, torch.device("cpu"))
    fit(learner, run.train, tmp_path)
    return learner.model.state_dict()


@pytest.mark.usefixtures("synthetic_omniglot")
def test_seeded_runs_are_bit_reproducible(tmp_path: Path) -> None:
    spec = run_spec(edge_dropout=0.3)
    first, second = train(tmp_path / "a", spec), train(tmp_path / "b", spec)
    other = train(tmp_path / "c", {**spec, "seed": 4})
    assert all(torch.equal(v, second[k]) for k, v in first.items())
    assert not all(torch.equal(v, other[k]) for k, v in first.items())


@pytest.mark.usefixtures("synthetic_omniglot")
def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Ctrl-C after step 3 (dropout on, so the restored RNG matters), resume in a fresh learner: same weights
    and running statistics as never stopping."""
    run = run_config_from_dict(run_spec(edge_dropout=0.3))
    reference = train(tmp_path / "ref", run_spec(edge_dropout=0.3))

    seed_everything(run.seed)
    interrupted = gnn.build(run, tmp_path, torch.device("cpu"))
    inner = interrupted.loss

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(step)

    interrupted.loss = loss
    result = fit(interrupted, run.train, tmp_path / "run")
    assert result.interrupted and result.step == 4 and (tmp_path / "run" / CHECKPOINT).is_file()

    seed_everything(123)  # the resume must not depend on the process's RNG
    resumed = gnn.build(run, tmp_path, torch.device("cpu"))
    torch.manual_seed(123)
    out = fit(resumed, run.train, tmp_path / "run", resume=True)
    assert (out.step, out.interrupted) == (6, False)
    state = resumed.model.state_dict()
    assert any("running_mean" in k for k in state)
    for k, v in reference.items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"graph": "all"}, "gnn.graph"),
        ({"edge_ratios": [2.0, -1.0]}, "gnn.edge_ratios[1]"),
        ({"edge_ratios": []}, "gnn.edge_ratios"),
        ({"layers": -1}, "gnn.layers"),
        ({"node_features": 0}, "gnn.node_features"),
        ({"edge_dropout": 1.0}, "gnn.edge_dropout"),
        ({"batchnorm": "episode"}, "gnn.batchnorm"),
        ({"hiden": 64}, "gnn.hiden"),
    ],
)
def test_config_errors_name_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        run_config_from_dict(run_spec(**section))
    assert err.value.key == key and f"'{key}'" in str(err.value)


def test_train_ways_must_equal_ways(tmp_path: Path) -> None:
    spec = run_spec()
    spec["task"]["train_ways"] = 5
    with pytest.raises(ConfigError) as err:
        gnn.build(run_config_from_dict(spec), tmp_path, torch.device("cpu"))
    assert err.value.key == "task.train_ways"


def test_registered_as_gnn() -> None:
    assert algorithm("gnn") is gnn
