"""A run's whole config (``algo``, ``seed``, ``task`` or ``env``, ``train``, ``eval`` and the algorithm's own
section), read from YAML with ``--set`` overrides, and the run directory it trains in.

YAML layout (see ``configs/``)::

    algo: maml            # which algorithm; its hyperparameters go in the section of the same name
    seed: 0
    task: {dataset: omniglot, ways: 5, shots: 1, queries: 15}
    train: {steps: 20000, meta_batch: 32, lr: 0.001}
    eval: {episodes: 600}
    maml: {inner_lr: 0.4, inner_steps: 1}

RL algorithms (``RL_ALGORITHMS``) learn in an environment: they take an ``env`` section instead of ``task``::

    algo: dqn
    env: {id: metalab/BitFlip-v0, n: 10}
    dqn: {her: future, her_k: 4}
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from metalab.config import (
    MAX_SEED,
    dump_yaml,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    require,
    require_between,
    show,
    to_dict,
)
from metalab.data.tasks import TaskConfig
from metalab.data.text import TextTaskConfig
from metalab.envs.config import BITFLIP_ID, EnvConfig
from metalab.errors import ConfigError
from metalab.train.evaluate import EvalConfig
from metalab.train.loop import TrainConfig
from metalab.utils import atomic_path

# The algorithms a YAML file can name. Each module defines `Config` (its section) and
# `build(run, data_root, device) -> Learner`. Python users import the modules directly.
ALGORITHMS = {
    "maml": "metalab.meta.maml",
    "mr_maml": "metalab.meta.mr_maml",
    "metasgd": "metalab.meta.metasgd",
    "anil": "metalab.meta.anil",
    "mamlpp": "metalab.meta.mamlpp",
    "reptile": "metalab.meta.reptile",
    "cavia": "metalab.meta.cavia",
    "imaml": "metalab.meta.imaml",
    "pretrain": "metalab.meta.pretrain",
    "transfer": "metalab.meta.transfer",
    "neural_process": "metalab.meta.neural_process",
    "bmaml": "metalab.meta.bmaml",
    "versa": "metalab.meta.versa",
    "protonet": "metalab.meta.protonet",
    "matching": "metalab.meta.matching",
    "relation": "metalab.meta.relation",
    "gnn": "metalab.meta.gnn",
    "imp": "metalab.meta.imp",
    "siamese": "metalab.meta.siamese",
    "mann": "metalab.meta.mann",
    "snail": "metalab.meta.snail",
    "dqn": "metalab.rl.dqn",
    "reinforce": "metalab.rl.reinforce",
    "pearl": "metalab.rl.pearl",
    "maml_rl": "metalab.rl.maml_rl",
    "rl2": "metalab.rl.rl2",
    "dream": "metalab.rl.dream",
    "mbrl": "metalab.rl.mbrl",
    "mt_mbrl": "metalab.rl.multitask_mbrl",
    "sac": "metalab.rl.sac",
}
RL_ALGORITHMS = frozenset({"dqn", "reinforce", "pearl", "rl2", "dream", "mbrl", "mt_mbrl", "sac", "maml_rl"})
"""Algorithms configured by an ``env`` section; the others by a ``task`` section."""
SECTIONS = ("algo", "seed", "task", "env", "train", "eval")
TEXT_ALGORITHMS = frozenset({"protonet", "maml"})
"""Algorithms that take ``task.dataset: smlmt`` (text tasks, :class:`~metalab.data.text.TextTaskConfig`)."""
DATASETS = ("omniglot", "sinusoid", "smlmt")
CONFIG_NAME = "config.yaml"


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved resolved as ``config.yaml`` in the run directory."""

    algo: str
    params: Any
    """The algorithm's ``Config`` instance (its YAML section is named after ``algo``)."""
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        selected = self.train.keep_best or ""
        if (
            selected.startswith("val/")
            and self.algo not in RL_ALGORITHMS
            and self.task.train_part == "trainval"
        ):
            raise ConfigError(
                "train.keep_best",
                f"{selected!r} reads the val classes, which task.train_part: trainval trains on; train on "
                f"'train' to select on val",
            )

    @property
    def label(self) -> str:
        """What the run learns, for its directory name: the env for RL (``bitflip10``), else the task."""
        return self.env.name if self.algo in RL_ALGORITHMS else self.task.name

    def to_yaml_dict(self) -> dict[str, Any]:
        problem = "env" if self.algo in RL_ALGORITHMS else "task"  # only the section the algorithm reads
        return {
            "algo": self.algo,
            "seed": self.seed,
            problem: to_dict(getattr(self, problem)),
            "train": to_dict(self.train),
            "eval": to_dict(self.eval),
            self.algo: to_dict(self.params),
        }


def algorithm(name: str) -> ModuleType:
    """The module implementing algorithm ``name``."""
    if name not in ALGORITHMS:
        raise ConfigError(
            "algo", f"unknown algorithm {name!r}; choose one of {', '.join(sorted(ALGORITHMS))}"
        )
    return importlib.import_module(ALGORITHMS[name])


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a whole config mapping; every error names its dotted key.

    A section (``train``, ``maml``, ...) must be a mapping; an empty one (YAML ``train:``) means all defaults.
    Beyond each section's own bounds, the sizes that only several sections fix together are checked:
    examples per few-shot batch and a DQN replay buffer's memory on BitFlip.
    """
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping of config keys, got {show(data)}")
    if "algo" not in data:
        raise ConfigError("algo", f"required key is missing; choose one of {', '.join(sorted(ALGORITHMS))}")
    name = data["algo"]
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise ConfigError(
            "algo", f"unknown algorithm {show(name)}; choose one of {', '.join(sorted(ALGORITHMS))}"
        )
    module = algorithm(name)
    unused = "task" if name in RL_ALGORITHMS else "env"
    valid = (*(s for s in SECTIONS if s != unused), name)
    for key in data:
        if key not in valid:
            if key in ALGORITHMS:
                hint = f"; the {key} section only applies with algo: {key}"
            elif key == unused:
                hint = f"; {name} takes {'an env' if unused == 'task' else 'a task'} section, not {unused}"
            else:
                hint = ""
            raise ConfigError(str(key), f"unknown key (valid: {', '.join(valid)}){hint}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", f"expected a non-negative integer, got {show(seed)}")
    require_between(seed, "seed", 0, MAX_SEED)

    def section(key: str, cls: type) -> Any:
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                key, f"is a section: expected a mapping of {cls.__name__} keys, got {show(value)}"
            )
        try:
            return from_dict(cls, value or {})
        except ConfigError as e:
            raise e.within(key) from None

    run = RunConfig(
        algo=name,
        params=section(name, module.Config),
        seed=seed,
        task=section("task", _task_class(name, data.get("task"))),
        env=section("env", EnvConfig),
        train=section("train", TrainConfig),
        eval=section("eval", EvalConfig),
    )
    if name in RL_ALGORITHMS:
        _check_replay_memory(run)
    else:
        _check_batch_examples(run)
    return run


def _task_class(algo: str, task: Any) -> type:
    """The dataclass of a ``task`` section: :class:`~metalab.data.text.TextTaskConfig` for ``dataset: smlmt``
    (with :data:`TEXT_ALGORITHMS` only), else :class:`~metalab.data.tasks.TaskConfig`."""
    dataset = task.get("dataset") if isinstance(task, dict) else None
    if isinstance(dataset, str) and dataset not in DATASETS:
        raise ConfigError(
            "task.dataset", f"must be one of {', '.join(map(repr, DATASETS))}, got {show(dataset)}"
        )
    if dataset != "smlmt":
        return TaskConfig
    require(
        algo in TEXT_ALGORITHMS,
        "task.dataset",
        f"smlmt text tasks are implemented for {', '.join(sorted(TEXT_ALGORITHMS))}, not {algo}",
    )
    return TextTaskConfig


MAX_BATCH_EXAMPLES = 100_000
"""Most examples (ways x (shots + queries) per task, times the tasks) in one few-shot batch."""
MAX_REPLAY_BYTES = 32 * 2**30
"""Largest replay buffer a config may ask for, where its row size follows from the config (DQN on BitFlip)."""


def _check_batch_examples(run: RunConfig) -> None:
    """The examples of one training batch (``train.meta_batch`` tasks) and of one evaluation batch
    (``eval.batch`` episodes) are within :data:`MAX_BATCH_EXAMPLES`."""
    task = run.task
    train_task = (task.train_ways or task.ways) * (task.shots + (task.train_queries or task.queries))
    eval_task = task.ways * (task.shots + task.queries)
    for key, tasks, per_task in (
        ("train.meta_batch", run.train.meta_batch, train_task),
        ("eval.batch", run.eval.batch, eval_task),
    ):
        require(
            tasks * per_task <= MAX_BATCH_EXAMPLES,
            key,
            f"{tasks} tasks of {per_task} examples (ways x (shots + queries)) make a batch of "
            f"{tasks * per_task} examples, over the limit of {MAX_BATCH_EXAMPLES}",
        )


def _check_replay_memory(run: RunConfig) -> None:
    """A DQN replay buffer on BitFlip fits in :data:`MAX_REPLAY_BYTES` (elsewhere the per-field bounds hold)."""
    if run.algo != "dqn" or run.env.id != BITFLIP_ID:
        return
    bits = run.env.n or 10
    row = (
        20 * bits + 13
    )  # float32 obs, achieved, desired, next obs, next achieved; int64 action; reward; flag
    need = run.params.buffer_size * row
    require(
        need <= MAX_REPLAY_BYTES,
        "dqn.buffer_size",
        f"{run.params.buffer_size} transitions of {bits} bits need {need / 2**30:.1f} GiB, over the limit of "
        f"{MAX_REPLAY_BYTES // 2**30} GiB; lower dqn.buffer_size or env.n",
    )


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config and apply ``key=value`` overrides (``train.lr=3e-4``)."""
    return run_config_from_dict(merge(read_yaml(path), parse_overrides(overrides)))


def new_run_dir(run: RunConfig, base: Path) -> Path:
    """``<base>/<algo>-<task or env>-s<seed>-<YYYYmmdd-HHMMSS>``, created, with the resolved config written in it.

    The directory is claimed with an exclusive ``mkdir``: a second process asking in the same second takes the
    next free name (``-2``, ``-3``, ...) instead of sharing or failing. ``config.yaml`` is written atomically.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{run.algo}-{run.label}-s{run.seed}-{stamp}"
    base.mkdir(parents=True, exist_ok=True)
    suffix = 1
    while True:
        path = base / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            path.mkdir()
            break
        except FileExistsError:
            suffix += 1
    write_run_config(run, path)
    return path


def write_run_config(run: RunConfig, run_dir: Path) -> Path:
    """Write ``run`` resolved to ``run_dir/config.yaml`` atomically (a crash leaves the previous file whole)."""
    path = run_dir / CONFIG_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(dump_yaml(run.to_yaml_dict()))
    return path


def load_run_dir_config(run_dir: Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise ConfigError("", f"{run_dir} is not a run directory (no {CONFIG_NAME})")
    return run_config_from_dict(read_yaml(path))
