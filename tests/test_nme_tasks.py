"""Non-mutually-exclusive task samplers (``task.label_assignment``): labels a fixed function of the class, the
NME sinusoid task readable from its inputs, evaluation kept mutually exclusive, and the default unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalab.data import omniglot
from metalab.data import tasks as tasks_module
from metalab.data.episodes import PROBE_OFFSET, EpisodeSampler, SupportSwapped, generator_for, label_groups
from metalab.data.sinusoid import (
    AMPLITUDE,
    NME_AMPLITUDE,
    NME_FEATURES,
    NME_TASKS,
    PHASE,
    X_RANGE,
    SinusoidTasks,
    with_task_code,
)
from metalab.data.tasks import TaskConfig, make_sampler
from metalab.errors import ConfigError
from metalab.experiment import run_config_from_dict

CLASSES, PER_CLASS = 23, 6  # 23 = 4 groups of 5 and 3 left over


def id_pool(classes: int = CLASSES) -> torch.Tensor:
    """``(classes, PER_CLASS, 1, 1, 2)`` uint8 images whose pixels record their class and sample number."""
    pool = torch.zeros(classes, PER_CLASS, 1, 1, 2, dtype=torch.uint8)
    pool[..., 0] = torch.arange(classes, dtype=torch.uint8)[:, None, None, None]
    pool[..., 1] = torch.arange(PER_CLASS, dtype=torch.uint8)[None, :, None, None]
    return pool


def class_ids(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 0, 0, 0] * 255).round().long()


def class_to_labels(sampler: EpisodeSampler, batches: int, tasks: int) -> dict[int, set[int]]:
    """Every label each class was given over ``batches`` batches of ``tasks`` episodes (support and query)."""
    seen: dict[int, set[int]] = {}
    for index in range(batches):
        ep = sampler.sample(index, tasks)
        for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
            for c, label in zip(class_ids(x).flatten().tolist(), y.flatten().tolist(), strict=True):
                seen.setdefault(c, set()).add(label)
    return seen


def reference_episode(pool: torch.Tensor, n: int, k: int, q: int, seed: int, index: int, tasks: int):
    """The sampler's draw as written before label assignments existed (shuffled labels)."""
    g = generator_for(seed, index)
    n_classes, per_class = pool.shape[:2]
    classes = torch.multinomial(torch.ones(tasks, n_classes), n, replacement=False, generator=g)
    picks = torch.rand(tasks, n, per_class, generator=g).argsort(-1)[..., : k + q]
    images = pool[classes[..., None], picks].float().div_(255.0)
    support_x = images[:, :, :k].reshape(tasks, n * k, *images.shape[3:])
    query_x = images[:, :, k:].reshape(tasks, n * q, *images.shape[3:])
    return support_x, query_x


# ------------------------------------------------------------------------------------------ Omniglot-like


def test_shuffled_is_the_default_and_draws_what_it_always_did() -> None:
    pool = id_pool()
    for index in (0, 7):
        plain = EpisodeSampler(pool, 5, 2, 3, seed=4).sample(index, 6)
        named = EpisodeSampler(pool, 5, 2, 3, seed=4, label_assignment="shuffled").sample(index, 6)
        support_x, query_x = reference_episode(pool, 5, 2, 3, 4, index, 6)
        for ep in (plain, named):
            assert torch.equal(ep.support_x, support_x) and torch.equal(ep.query_x, query_x)
            assert torch.equal(ep.support_y, plain.support_y) and torch.equal(ep.query_y, plain.query_y)


def test_shuffled_labels_are_not_a_function_of_the_class() -> None:
    seen = class_to_labels(EpisodeSampler(id_pool(), 5, 1, 2, seed=0), batches=5, tasks=10)
    assert max(len(labels) for labels in seen.values()) > 1  # what the NME tests below rule out


@pytest.mark.parametrize("assignment", ["fixed", "fixed_labels"])
def test_nme_labels_are_a_fixed_function_of_the_class(assignment: str) -> None:
    n = 5
    seen = class_to_labels(EpisodeSampler(id_pool(), n, 1, 2, seed=3, label_assignment=assignment), 8, 10)
    assert all(len(labels) == 1 for labels in seen.values()), seen
    assert len(seen) == (CLASSES // n) * n  # every grouped class drawn, the 3 left over never
    # The function is the data set's, not the sampler seed's: another seed labels every class alike.
    other = class_to_labels(EpisodeSampler(id_pool(), n, 1, 2, seed=9, label_assignment=assignment), 8, 10)
    assert other == seen


def test_fixed_tasks_are_fixed_groups() -> None:
    n = 5
    sampler = EpisodeSampler(id_pool(), n, 1, 1, seed=1, label_assignment="fixed")
    groups = {tuple(g) for g in label_groups(CLASSES, n).T.tolist()}  # the classes of task j, label order
    ep = sampler.sample(0, 40)
    drawn = {tuple(row) for row in class_ids(ep.support_x).tolist()}  # 1 shot: one image per label
    assert drawn == groups  # 40 tasks reach all 4 groups, and nothing else
    # fixed_labels draws one class per label set: far more distinct tasks.
    ep = EpisodeSampler(id_pool(), n, 1, 1, seed=1, label_assignment="fixed_labels").sample(0, 40)
    assert len({tuple(row) for row in class_ids(ep.support_x).tolist()}) > len(groups)


@pytest.mark.parametrize("assignment", ["fixed", "fixed_labels"])
def test_nme_episodes_keep_their_shape_and_distinct_examples(assignment: str) -> None:
    n, k, q = 4, 2, 3
    ep = EpisodeSampler(id_pool(), n, k, q, seed=2, label_assignment=assignment).sample(5, 3)
    assert ep.support_x.shape == (3, n * k, 1, 1, 2) and ep.query_x.shape == (3, n * q, 1, 1, 2)
    assert torch.equal(ep.support_y[0], torch.arange(n).repeat_interleave(k))
    s_cls, q_cls = class_ids(ep.support_x), class_ids(ep.query_x)
    for t in range(3):
        assert len(set(s_cls[t].tolist())) == n  # N distinct classes per task
        assert torch.equal(q_cls[t].reshape(n, q)[:, 0], s_cls[t].reshape(n, k)[:, 0])
        samples = (torch.cat([ep.support_x[t], ep.query_x[t]]) * 255).round().long()[:, 0, 0, 1]
        assert len(set(zip(torch.cat([s_cls[t], q_cls[t]]).tolist(), samples.tolist(), strict=True))) == n * (
            k + q
        )
    again = EpisodeSampler(id_pool(), n, k, q, seed=2, label_assignment=assignment).sample(5, 3)
    assert torch.equal(again.support_x, ep.support_x)  # still a pure function of (seed, index)


def test_unknown_assignment_is_refused() -> None:
    with pytest.raises(ValueError, match="label_assignment"):
        EpisodeSampler(id_pool(), 5, 1, 1, label_assignment="sorted")  # type: ignore[arg-type]


@pytest.fixture
def fake_omniglot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make_sampler`` on Omniglot without the data: each part is an id pool of its own size."""
    sizes = {"train": 23, "trainval": 27, "val": 11, "test": 13}
    monkeypatch.setattr(omniglot, "load", lambda root, size=28: None)
    monkeypatch.setattr(
        tasks_module.omniglot,
        "split_classes",
        lambda data, root, split, part: omniglot.ClassSplit(id_pool(sizes[part]), []),
    )


@pytest.mark.usefixtures("fake_omniglot")
def test_make_sampler_fixes_training_labels_only() -> None:
    cfg = TaskConfig(ways=5, shots=1, queries=2, label_assignment="fixed")
    train = make_sampler(cfg, "train", 0, Path("."))
    assert train.label_assignment == "fixed" and train.pool.shape[0] == 23
    assert all(len(v) == 1 for v in class_to_labels(train, 4, 10).values())
    for part in ("val", "test"):  # evaluation stays mutually exclusive, on the held-out classes
        sampler = make_sampler(cfg, part, 0, Path("."))
        assert sampler.label_assignment == "shuffled"
        assert max(len(v) for v in class_to_labels(sampler, 4, 10).values()) > 1
    trainval = make_sampler(
        TaskConfig(ways=5, queries=2, train_part="trainval", label_assignment="fixed_labels"),
        "train",
        0,
        Path("."),
    )
    assert trainval.label_assignment == "fixed_labels" and trainval.pool.shape[0] == 27


@pytest.mark.usefixtures("fake_omniglot")
def test_make_sampler_default_matches_the_plain_sampler() -> None:
    for part in ("train", "val", "test"):
        made = make_sampler(TaskConfig(ways=5, shots=1, queries=2), part, 3, Path("."))
        plain = EpisodeSampler(made.pool, 5, 1, 2, seed=made.seed)
        assert made.label_assignment == "shuffled"
        assert torch.equal(made.sample(2, 4).support_x, plain.sample(2, 4).support_x)


# ---------------------------------------------------------------------------------------------- sinusoid


def test_nme_sinusoid_task_is_recoverable_from_the_inputs() -> None:
    sampler = SinusoidTasks(5, 7, seed=1, family="nme_train")
    amplitudes = torch.linspace(*NME_AMPLITUDE, NME_TASKS)
    for index in (0, 1):
        ep = sampler.sample(index, 64)
        assert ep.support_x.shape == (64, 5, NME_FEATURES) and ep.query_x.shape == (64, 7, NME_FEATURES)
        x = torch.cat([ep.support_x, ep.query_x], 1)  # (T, K+Q, 21)
        y = torch.cat([ep.support_y, ep.query_y], 1)
        code = SinusoidTasks.task_codes(x)  # (T, K+Q)
        assert (code == code[:, :1]).all()  # one task per episode, on every point
        assert torch.equal(x[..., 1:].sum(-1), torch.ones(64, 12))  # a one-hot
        # The target is a fixed function of the input: the code's training amplitude times sin(x).
        torch.testing.assert_close(y[..., 0], amplitudes[code] * torch.sin(x[..., 0]))
        amplitude, phase = sampler.functions(index, 64)
        torch.testing.assert_close(amplitude, amplitudes[code[:, 0]])
        assert torch.equal(phase, torch.zeros(64))
    assert len(set(SinusoidTasks.task_codes(sampler.sample(2, 200).support_x[:, 0]).tolist())) == NME_TASKS


def test_nme_sinusoid_evaluation_tasks_are_new_functions() -> None:
    sampler = SinusoidTasks(5, 5, seed=2, family="nme_eval")
    ep = sampler.sample(0, 300)
    amplitude, _ = sampler.functions(0, 300)
    code = SinusoidTasks.task_codes(ep.support_x[:, 0])
    assert 0 <= int(code.min()) and int(code.max()) < NME_TASKS  # a training task's code ...
    torch.testing.assert_close(ep.support_y[..., 0], amplitude[:, None] * torch.sin(ep.support_x[..., 0]))
    training = torch.linspace(*NME_AMPLITUDE, NME_TASKS)
    assert (amplitude[:, None] - training).abs().min(-1).values.max() > 0.05  # ... on another function
    assert NME_AMPLITUDE[0] <= float(amplitude.min()) and float(amplitude.max()) <= NME_AMPLITUDE[1]
    x = ep.support_x[..., 0]
    assert X_RANGE[0] <= float(x.min()) and float(x.max()) <= X_RANGE[1]


def test_sinusoid_default_is_unchanged() -> None:
    for made in (
        SinusoidTasks(4, 3, seed=5),
        make_sampler(TaskConfig(dataset="sinusoid", ways=1, shots=4, queries=3), "train", 5, Path(".")),
    ):
        ep = made.sample(3, 6)
        g = generator_for(5, 3)  # MAML's family as written before the NME family existed
        a = torch.rand(6, 1, 1, generator=g) * (AMPLITUDE[1] - AMPLITUDE[0]) + AMPLITUDE[0]
        p = torch.rand(6, 1, 1, generator=g) * (PHASE[1] - PHASE[0]) + PHASE[0]
        x = torch.rand(6, 7, 1, generator=g) * (X_RANGE[1] - X_RANGE[0]) + X_RANGE[0]
        assert torch.equal(ep.support_x, x[:, :4]) and torch.equal(ep.query_y, (a * torch.sin(x - p))[:, 4:])


def test_make_sampler_sinusoid_parts() -> None:
    cfg = TaskConfig(dataset="sinusoid", ways=1, shots=3, queries=3, label_assignment="fixed")
    assert make_sampler(cfg, "train", 0, Path(".")).family == "nme_train"
    assert make_sampler(cfg, "test", 0, Path(".")).family == "nme_eval"
    assert make_sampler(cfg, "val", 0, Path(".")).family == "nme_eval"
    assert cfg.input_features == NME_FEATURES and TaskConfig(dataset="sinusoid", ways=1).input_features == 1


def test_with_task_code_appends_the_support_code() -> None:
    ep = SinusoidTasks(3, 3, seed=0, family="nme_train").sample(0, 1)
    grid = torch.linspace(-5, 5, 9)[:, None]  # (9, 1)
    coded = with_task_code(grid, ep.support_x[0])
    assert coded.shape == (9, NME_FEATURES)
    assert torch.equal(
        SinusoidTasks.task_codes(coded), SinusoidTasks.task_codes(ep.support_x[0, :1]).expand(9)
    )
    assert with_task_code(grid, grid) is grid  # plain inputs stay plain
    assert with_task_code(coded, ep.support_x[0]) is coded


# -------------------------------------------------------------------------------------------- the config


def test_task_names_mark_nme_runs() -> None:
    assert TaskConfig(dataset="sinusoid", ways=1, shots=10).name == "sinusoid-10s"
    assert (
        TaskConfig(dataset="sinusoid", ways=1, shots=10, label_assignment="fixed").name == "sinusoid-nme-10s"
    )
    assert TaskConfig(ways=20).name == "omniglot-20w1s"
    assert TaskConfig(ways=20, label_assignment="fixed_labels").name == "omniglot-20w1s-nme"


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"label_assignment": "sorted"}, "must be one of"),
        ({"label_assignment": 1}, "must be one of"),
        (
            {"dataset": "sinusoid", "ways": 1, "label_assignment": "fixed_labels"},
            "fixed_labels is for classification",
        ),
    ],
)
def test_bad_label_assignment_names_the_key(task: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_config_from_dict({"algo": "maml", "task": task})
    assert info.value.key == "task.label_assignment"
    assert message in str(info.value)


@pytest.mark.parametrize("algo", ["maml", "cavia"])
def test_the_maml_family_runs_on_nme_sinusoid_tasks(algo: str, tmp_path: Path) -> None:
    """The networks take the task code as input (21 numbers), and the figure queries them with it."""
    from metalab.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / f"{algo}_sinusoid.yaml"
    sets = [
        "task.label_assignment=fixed",
        "train.steps=2",
        "train.eval_every=2",
        "eval.episodes=4",
        "train.device=cpu",
    ]
    assert main(["train", str(config), "--runs-dir", str(tmp_path), *(f"--set={s}" for s in sets)]) == 0
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith(f"{algo}-sinusoid-nme-") and (run_dir / "sinusoid_fits.png").is_file()


def test_probe_swaps_the_support_set_for_another_tasks_and_keeps_the_queries() -> None:
    base = EpisodeSampler(id_pool(200), 5, 2, 3, seed=7, label_assignment="fixed")  # 40 fixed tasks
    probe = SupportSwapped(base)
    ep, swapped, lender = base.sample(3, 6), probe.sample(3, 6), base.sample(3 + PROBE_OFFSET, 6)
    assert torch.equal(swapped.query_x, ep.query_x) and torch.equal(swapped.query_y, ep.query_y)
    assert torch.equal(swapped.support_x, lender.support_x)
    # Other tasks' classes: a probe's support image is rarely from one of its own query classes.
    own = class_ids(ep.query_x)
    shared = (class_ids(swapped.support_x)[:, :, None] == own[:, None, :]).any(-1).float().mean()
    assert shared < 0.2
    assert torch.equal(probe.sample(3, 6).support_x, swapped.support_x)  # a pure function of the index


def test_train_and_probe_evaluations_draw_training_tasks_from_their_own_stream() -> None:
    cfg = TaskConfig(dataset="sinusoid", ways=1, shots=5, queries=5, label_assignment="fixed")
    training = make_sampler(cfg, "train", 0, Path("."))
    evals = tasks_module.EvalSamplers(cfg, 0, Path("."))
    train, probe = evals["train"], evals["probe"]
    assert isinstance(probe, SupportSwapped) and evals["probe"] is probe  # built once
    assert train.family == "nme_train" and evals["test"].family == "nme_eval"
    assert not torch.equal(train.sample(0, 4).support_x, training.sample(0, 4).support_x)
    assert torch.equal(probe.sample(0, 4).query_y, train.sample(0, 4).query_y)
    with pytest.raises(ValueError, match="unknown evaluation part"):
        tasks_module.eval_sampler(cfg, "trainval", 0, Path("."))
