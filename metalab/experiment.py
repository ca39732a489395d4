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

import yaml

from metalab.config import from_dict, merge, parse_overrides, read_yaml, to_dict
from metalab.data.tasks import TaskConfig
from metalab.envs.config import EnvConfig
from metalab.errors import ConfigError
from metalab.train.evaluate import EvalConfig
from metalab.train.loop import TrainConfig

# The algorithms a YAML file can name. Each module defines `Config` (its section) and
# `build(run, data_root, device) -> Learner`. Python users import the modules directly.
ALGORITHMS = {
    "maml": "metalab.meta.maml",
    "metasgd": "metalab.meta.metasgd",
    "anil": "metalab.meta.anil",
    "mamlpp": "metalab.meta.mamlpp",
    "reptile": "metalab.meta.reptile",
    "cavia": "metalab.meta.cavia",
    "imaml": "metalab.meta.imaml",
    "pretrain": "metalab.meta.pretrain",
    "protonet": "metalab.meta.protonet",
    "matching": "metalab.meta.matching",
    "relation": "metalab.meta.relation",
    "siamese": "metalab.meta.siamese",
    "mann": "metalab.meta.mann",
    "snail": "metalab.meta.snail",
    "dqn": "metalab.rl.dqn",
    "reinforce": "metalab.rl.reinforce",
    "pearl": "metalab.rl.pearl",
    "rl2": "metalab.rl.rl2",
    "dream": "metalab.rl.dream",
}
RL_ALGORITHMS = frozenset({"dqn", "reinforce", "pearl", "rl2", "dream"})
"""Algorithms configured by an ``env`` section; the others by a ``task`` section."""
SECTIONS = ("algo", "seed", "task", "env", "train", "eval")
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
    """Validate a whole config mapping; every error names its dotted key."""
    if "algo" not in data:
        raise ConfigError("algo", f"required key is missing; choose one of {', '.join(sorted(ALGORITHMS))}")
    name = data["algo"]
    if not isinstance(name, str):
        raise ConfigError("algo", f"expected an algorithm name, got {name!r}")
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
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", f"expected a non-negative integer, got {seed!r}")

    def section(key: str, cls: type) -> Any:
        try:
            return from_dict(cls, data.get(key) or {})
        except ConfigError as e:
            raise e.within(key) from None

    return RunConfig(
        algo=name,
        params=section(name, module.Config),
        seed=seed,
        task=section("task", TaskConfig),
        env=section("env", EnvConfig),
        train=section("train", TrainConfig),
        eval=section("eval", EvalConfig),
    )


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config and apply ``key=value`` overrides (``train.lr=3e-4``)."""
    return run_config_from_dict(merge(read_yaml(path), parse_overrides(overrides)))


def new_run_dir(run: RunConfig, base: Path) -> Path:
    """``<base>/<algo>-<task or env>-s<seed>-<YYYYmmdd-HHMMSS>``, created, with the resolved config written in it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{run.algo}-{run.label}-s{run.seed}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{run.algo}-{run.label}-s{run.seed}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    (path / CONFIG_NAME).write_text(yaml.safe_dump(run.to_yaml_dict(), sort_keys=False))
    return path


def load_run_dir_config(run_dir: Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise ConfigError("", f"{run_dir} is not a run directory (no {CONFIG_NAME})")
    return run_config_from_dict(read_yaml(path))
