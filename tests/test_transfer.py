"""Transfer baselines (Chen et al., ICLR 2019; algo: transfer): the test heads against hand computations, query
labels never read, the pretraining batch sampler, a training step, runs on synthetic data and config errors."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metalab.config import read_yaml
from metalab.data import omniglot
from metalab.data.episodes import ClassBatchSampler, Episode, EpisodeSampler
from metalab.data.tasks import TaskConfig, make_batch_sampler
from metalab.errors import ConfigError
from metalab.experiment import algorithm, load_run_config, run_config_from_dict
from metalab.meta import transfer
from metalab.models import set_batchnorm_mode
from metalab.train.evaluate import PARTS
from metalab.train.loop import fit
from metalab.utils import seed_everything

SIZE = 16  # the smallest image side Conv-4 takes: a 1x1 final map, so the embedding is `hidden`-d
HIDDEN = 8
REPO = Path(__file__).resolve().parents[1]


def toy_episode(n: int = 3, k: int = 2, q: int = 2, tasks: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, n * k, 1, SIZE, SIZE, generator=g)
    qx = torch.rand(tasks, n * q, 1, SIZE, SIZE, generator=g)
    sy = torch.arange(n).repeat_interleave(k).expand(tasks, -1)
    qy = torch.arange(n).repeat_interleave(q).expand(tasks, -1)
    return Episode(sx, sy, qx, qy, n, k, q)


def tiny_model(cfg: transfer.Config, classes: int = 6, seed: int = 0) -> transfer.TransferNet:
    """A tiny pretrained-looking network: random weights, running statistics moved off (0, 1), eval mode."""
    torch.manual_seed(seed)
    model = transfer.TransferNet(classes, cfg, image_size=SIZE)
    set_batchnorm_mode(model, cfg.batchnorm)
    with torch.no_grad():
        model(torch.rand(12, 1, SIZE, SIZE))
    return model.eval()


# ------------------------------------------------------------------------------------------ test heads


def test_prototype_head_is_the_nearest_mean_by_hand() -> None:
    support = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 4.0]])  # class means (0, 1) and (4, 2)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.0, -1.0]])
    euclidean = transfer.prototype_logits(support, labels, query, 2, transfer.Config(), scale=5.0)
    torch.testing.assert_close(euclidean, -torch.tensor([[1.0, 10.0], [13.0, 2.0], [4.0, 25.0]]))
    cosine = transfer.prototype_logits(support, labels, query, 2, transfer.Config(metric="cosine"), scale=5.0)
    s5 = 5**0.5
    expected = 5.0 * torch.tensor(
        [
            [1 / 2**0.5, 6 / (2**0.5 * 2 * s5)],  # (1, 1) against (0, 1) and (4, 2)
            [3 / (3 * 2**0.5), 18 / (3 * 2**0.5 * 2 * s5)],
            [-1.0, -2 / (2 * s5)],
        ]
    )
    torch.testing.assert_close(cosine, expected)
    assert euclidean.argmax(-1).tolist() == [0, 1, 0]


def test_cosine_logits_are_scale_times_cosine() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    logits = transfer.cosine_logits(x, w, 3.5)
    by_hand = torch.tensor(
        [[3.5 * float(a @ b) / float(a.norm() * b.norm()) for b in w] for a in x]
    )  # (7, 4), one dot product at a time
    torch.testing.assert_close(logits, by_hand)
    assert logits.abs().max() <= 3.5 + 1e-6
    # only directions count: rescaled features and class weights give the same logits
    torch.testing.assert_close(transfer.cosine_logits(4 * x, w * torch.rand(4, 1, generator=g), 3.5), logits)
    head = transfer.CosineHead(5, 4, scale=3.5)
    with torch.no_grad():
        head.weight.copy_(w)
    torch.testing.assert_close(head(x), logits)


@pytest.mark.parametrize("learn", [True, False])
def test_pretraining_cosine_scale_is_learned_or_fixed(learn: bool) -> None:
    head = transfer.CosineHead(5, 4, scale=10.0, learn_scale=learn)
    F.cross_entropy(head(torch.randn(6, 5)), torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    assert (head.scale.grad is not None) == learn and head.weight.grad is not None
    assert head.scale.item() == 10.0


def test_sgd_is_torch_sgd_with_momentum_and_weight_decay() -> None:
    """The pure update equals torch.optim.SGD's (momentum, no dampening, weight decay in the gradient)."""
    cfg = transfer.Config(
        finetune_steps=7, finetune_lr=0.05, finetune_momentum=0.9, finetune_weight_decay=0.01
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 4, (10,), generator=g)
    start = {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(4, generator=g)}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(x @ p["weight"].T + p["bias"], y)

    fitted = transfer.sgd(loss, start, cfg)
    params = {k: v.clone().requires_grad_() for k, v in start.items()}
    opt = torch.optim.SGD(params.values(), lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(7):
        opt.zero_grad()
        loss(params).backward()
        opt.step()
    for k in start:
        torch.testing.assert_close(fitted[k], params[k].detach())
        assert not torch.equal(fitted[k], start[k])  # moved, and the start was not changed in place


def test_fitted_heads_before_and_after_fitting() -> None:
    """0 steps: the linear head is zero (uniform logits), the cosine head is the cosine nearest-prototype
    classifier. Fitted on a separable support set, each head classifies that support set correctly."""
    support = torch.tensor([[2.0, 0.1], [1.5, -0.2], [-0.1, 1.0], [0.2, 2.0], [-1.0, -1.2], [-2.0, -0.9]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    query = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    zero = transfer.Config(test_head="linear", finetune_steps=0)
    assert torch.equal(transfer.support_head_logits(support, labels, query, 3, zero, 1.0), torch.zeros(5, 3))
    cos0 = transfer.Config(test_head="cosine", finetune_steps=0)
    proto = transfer.Config(test_head="prototype", metric="cosine")
    torch.testing.assert_close(
        transfer.support_head_logits(support, labels, query, 3, cos0, 7.0),
        transfer.support_head_logits(support, labels, query, 3, proto, 7.0),
    )
    for kind, scale, fraction in (("linear", 10.0, 0.01), ("cosine", 2.0, 0.95)):
        cfg = transfer.Config(test_head=kind, finetune_steps=50)
        params = transfer.fit_head(support, labels, 3, cfg, scale)
        logits = transfer.head_logits(support, params, kind, scale)
        assert logits.argmax(-1).tolist() == labels.tolist(), kind
        start = transfer.initial_head(support, labels, 3, kind)
        before = F.cross_entropy(transfer.head_logits(support, start, kind, scale), labels)
        # from zero (log 3) the linear head fits the support; the cosine head starts near its best already
        assert F.cross_entropy(logits, labels) < fraction * before, kind


# ------------------------------------------------------------------------------- query labels unread


def test_head_fitting_has_no_access_to_the_queries() -> None:
    assert list(inspect.signature(transfer.fit_head).parameters) == [
        "support",
        "support_y",
        "n_way",
        "cfg",
        "scale",
    ]
    assert "query_y" not in inspect.signature(transfer.support_head_logits).parameters


def poisoned(ep: Episode, seed: int = 5) -> Episode:
    """The same episode with its query labels replaced: permuted within each task, and some out of range."""
    g = torch.Generator().manual_seed(seed)
    y = torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in ep.query_y])
    y[:, 0] = 10**6  # a label no head could index without failing
    return ep._replace(query_y=y)


@pytest.mark.parametrize(
    "section",
    [
        {"test_head": "prototype"},
        {"test_head": "linear", "finetune_steps": 5},
        {"test_head": "cosine", "finetune_steps": 5, "train_head": "cosine"},
        {"test_head": "linear", "finetune_steps": 3, "finetune_backbone": True},
        {"test_head": "cosine", "finetune_steps": 3, "finetune_backbone": True, "batchnorm": "transductive"},
    ],
)
def test_query_labels_do_not_change_the_predictions(section: dict) -> None:
    cfg = transfer.Config(hidden=HIDDEN, **section)
    model = tiny_model(cfg)
    ep = toy_episode(n=3, k=2, q=3)
    with torch.no_grad():  # as the evaluation calls it
        before = transfer.episode_logits(model, cfg, ep)
        after = transfer.episode_logits(model, cfg, poisoned(ep))
    assert before.shape == (2, 9, 3) and torch.isfinite(before).all()
    assert torch.equal(before, after)
    # the support labels do matter: the same support images relabelled give other logits
    relabelled = ep._replace(support_y=ep.support_y.flip(-1))
    with torch.no_grad():
        assert not torch.allclose(transfer.episode_logits(model, cfg, relabelled), before)


def test_finetuning_the_backbone_leaves_the_model_as_it_was() -> None:
    cfg = transfer.Config(hidden=HIDDEN, test_head="linear", finetune_steps=5, finetune_backbone=True)
    model = tiny_model(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ep = toy_episode(n=3, k=2, q=2)
    with torch.no_grad():
        tuned = transfer.episode_logits(model, cfg, ep)
        frozen = transfer.episode_logits(
            model, transfer.Config(hidden=HIDDEN, test_head="linear", finetune_steps=5), ep
        )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not torch.allclose(tuned, frozen)  # the encoder did move


# ---------------------------------------------------------------------------------- pretraining batches


def test_batch_sampler_is_reproducible_and_draws_pool_images_with_their_class() -> None:
    pool = torch.randint(
        0, 256, (7, 4, 1, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    sampler = ClassBatchSampler(pool, seed=3)
    batch = sampler.sample(11, 50)
    assert batch.x.shape == (50, 1, 5, 5) and batch.y.dtype == torch.int64
    assert torch.equal(batch.x, ClassBatchSampler(pool, seed=3).sample(11, 50).x)  # same (seed, index)
    assert torch.equal(batch.y, ClassBatchSampler(pool, seed=3).sample(11, 50).y)
    assert not torch.equal(batch.y, sampler.sample(12, 50).y)
    assert not torch.equal(batch.y, ClassBatchSampler(pool, seed=4).sample(11, 50).y)
    for x, y in zip(batch.x, batch.y, strict=True):  # every image is one of its class's drawings
        assert any(torch.equal(x, pool[y, j].float() / 255) for j in range(4))
    counts = torch.bincount(torch.cat([sampler.sample(i, 100).y for i in range(40)]), minlength=7)
    assert counts.numel() == 7 and counts.min() > 400  # 4000 draws, about 571 per class: all classes drawn


def test_batch_sampler_covers_exactly_the_train_part(omniglot_root: Path, omniglot_data) -> None:
    sampler = make_batch_sampler(TaskConfig(), 0, omniglot_root)
    train = omniglot.split_classes(omniglot_data, omniglot_root, "vinyals", "train")
    assert sampler.classes == 4112 == len(train.classes)  # 1028 characters x 4 rotations
    assert torch.equal(sampler.pool, train.images)  # class c is line c of train.txt, nothing of val or test
    assert make_batch_sampler(TaskConfig(train_part="trainval"), 0, omniglot_root).classes == 4800
    with pytest.raises(ConfigError) as err:
        make_batch_sampler(TaskConfig(dataset="sinusoid", ways=1), 0, omniglot_root)
    assert err.value.key == "task.dataset"


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_training_steps_lower_the_loss_on_a_batch(head: str) -> None:
    cfg = transfer.Config(hidden=HIDDEN, train_head=head)
    torch.manual_seed(0)
    model = transfer.TransferNet(5, cfg, image_size=SIZE)
    pool = torch.randint(
        0, 256, (5, 6, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    batch = ClassBatchSampler(pool, seed=0).sample(0, 30)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        loss, logits = transfer.pretrain_loss(model, batch)
        assert logits.shape == (30, 5)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------------- runs


def run_spec(**section: object) -> dict:
    return {
        "algo": "transfer",
        "seed": 3,
        "task": {"dataset": "omniglot", "ways": 3, "shots": 1, "queries": 2, "image_size": SIZE},
        "train": {
            "steps": 6,
            "meta_batch": 1,
            "lr": 0.003,
            "log_every": 1,
            "eval_every": 3,
            "eval_episodes": 4,
            "checkpoint_every": 2,
            "device": "cpu",
        },
        "eval": {"episodes": 4, "batch": 2},
        "transfer": {"hidden": HIDDEN, "batch_size": 16, "finetune_steps": 3, **section},
    }


POOL = torch.randint(
    0, 256, (10, 6, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
)


@pytest.fixture
def synthetic_omniglot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``transfer.build`` pretrains on 6 random 16x16 "classes" and evaluates on 4 others."""

    def batches(cfg: TaskConfig, seed: int, root: Path) -> ClassBatchSampler:
        return ClassBatchSampler(POOL[:6], seed)

    def eval_samplers(cfg: TaskConfig, seed: int, root: Path) -> dict[str, EpisodeSampler]:
        return {
            part: EpisodeSampler(POOL[6:], cfg.ways, cfg.shots, cfg.queries, seed + i)
            for i, part in enumerate(PARTS)
        }

    monkeypatch.setattr(transfer, "make_batch_sampler", batches)
    monkeypatch.setattr(transfer, "EvalSamplers", eval_samplers)


def train(tmp_path: Path, spec: dict) -> transfer.TransferNet:
    run = run_config_from_dict(spec)
    seed_everything(run.seed)
    learner = transfer.build(run, tmp_path, torch.device("cpu"))
    result = fit(learner, run.train, tmp_path)
    assert result.step == 6 and {"val/acc", "val/acc_ci95", "val/nll", "val/ece"} <= set(result.metrics)
    return learner.model


@pytest.mark.usefixtures("synthetic_omniglot")
def test_seeded_runs_are_bit_reproducible_and_pretrain_every_class(tmp_path: Path) -> None:
    spec = run_spec(train_head="cosine", test_head="cosine")
    first, second = train(tmp_path / "a", spec), train(tmp_path / "b", spec)
    other = train(tmp_path / "c", {**spec, "seed": 4})
    assert first.head.weight.shape == (6, HIDDEN)  # one class vector per training class
    assert first.head.scale.item() != 10.0  # learned
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert not all(torch.equal(v, c[k]) for k, v in a.items())
    logged = {line.split(",")[1] for line in (tmp_path / "a" / "metrics.csv").read_text().splitlines()[1:]}
    assert {"train/acc", "train/scale", "val/acc"} <= logged


@pytest.mark.usefixtures("synthetic_omniglot")
def test_evaluation_never_reads_query_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the learner's evaluate (the shared episodic path): the same predictions with poisoned query
    labels, only the accuracy differs."""
    seen: list[torch.Tensor] = []
    inner = transfer.episode_logits

    def recorded(model: transfer.TransferNet, cfg: transfer.Config, ep: Episode) -> torch.Tensor:
        seen.append(inner(model, cfg, ep))
        return seen[-1]

    monkeypatch.setattr(transfer, "episode_logits", recorded)
    run = run_config_from_dict(run_spec(test_head="linear"))
    seed_everything(run.seed)
    learner = transfer.build(run, tmp_path, torch.device("cpu"))
    learner.model.eval()
    clean = learner.evaluate("test", 4)
    predictions = list(seen)
    seen.clear()
    base = EpisodeSampler(POOL[6:], 3, 1, 2, run.eval.seed + 1)  # the fixture's test sampler

    class Poisoned:
        def sample(self, index: int, tasks: int) -> Episode:
            ep = base.sample(index, tasks)
            return ep._replace(query_y=(ep.query_y + 1) % ep.n_way)  # every query label wrong

    monkeypatch.setattr(transfer, "EvalSamplers", lambda *a: {"val": base, "test": Poisoned()})
    relearner = transfer.build(run, tmp_path, torch.device("cpu"))
    relearner.model.load_state_dict(learner.model.state_dict())
    relearner.model.eval()
    wrong = relearner.evaluate("test", 4)
    assert len(seen) == len(predictions) == 2  # 4 episodes in batches of 2
    assert all(torch.equal(a, b) for a, b in zip(predictions, seen, strict=True))
    # each accuracy is that of the same predictions against its own labels
    labels = torch.cat([base.sample(i, 2).query_y for i in range(2)])  # (4, N*Q)
    guesses = torch.cat(predictions).argmax(-1)
    assert clean["test/acc"] == pytest.approx((guesses == labels).float().mean().item())
    assert wrong["test/acc"] == pytest.approx((guesses == (labels + 1) % 3).float().mean().item())


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"train_head": "prototype"}, "transfer.train_head"),
        ({"test_head": "knn"}, "transfer.test_head"),
        ({"metric": "manhattan"}, "transfer.metric"),
        ({"batch_size": 0}, "transfer.batch_size"),
        ({"scale": 0.0}, "transfer.scale"),
        ({"finetune_steps": -1}, "transfer.finetune_steps"),
        ({"finetune_lr": 0.0}, "transfer.finetune_lr"),
        ({"finetune_momentum": 1.0}, "transfer.finetune_momentum"),
        ({"finetune_weight_decay": -0.1}, "transfer.finetune_weight_decay"),
        ({"finetune_backbone": True, "test_head": "prototype"}, "transfer.finetune_backbone"),
        ({"learn_scale": "yes"}, "transfer.learn_scale"),
        ({"batchnorm": "episode"}, "transfer.batchnorm"),
        ({"finetune_step": 10}, "transfer.finetune_step"),
    ],
)
def test_config_errors_name_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        run_config_from_dict(run_spec(**section))
    assert err.value.key == key and f"'{key}'" in str(err.value)


@pytest.mark.parametrize(
    ("task", "key"),
    [
        ({"construction": "augmented"}, "task.construction"),
        ({"label_assignment": "fixed"}, "task.label_assignment"),
    ],
)
def test_tasks_without_class_labels_are_refused(tmp_path: Path, task: dict, key: str) -> None:
    spec = run_spec()
    spec["task"] |= task
    with pytest.raises(ConfigError) as err:
        transfer.build(run_config_from_dict(spec), tmp_path, torch.device("cpu"))
    assert err.value.key == key


FAMILIES = {
    "transfer_proto": ("linear", "prototype"),
    "transfer_finetune": ("linear", "linear"),
    "baselinepp": ("cosine", "cosine"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_configs_differ_only_in_the_cell(family: str) -> None:
    """One pretrained network can serve the four cells (the benchmark trains once): their configs differ only
    in task.ways and task.shots, and set the family's heads."""
    cells = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}
    first = read_yaml(REPO / "configs" / f"{family}_omniglot_5w1s.yaml")
    for cell, (ways, shots) in cells.items():
        path = REPO / "configs" / f"{family}_omniglot_{cell}.yaml"
        run = load_run_config(path)
        assert run.algo == "transfer" and (run.task.ways, run.task.shots) == (ways, shots)
        assert (run.params.train_head, run.params.test_head) == FAMILIES[family]
        raw = read_yaml(path)
        raw["task"] |= {"ways": 5, "shots": 1}
        assert raw == first


def test_registered_as_transfer() -> None:
    assert algorithm("transfer") is transfer
