"""Property-based tests of config input: every bad key, value or file ends in one line on stderr and exit 2.

Generated inputs drive ``metalab.cli.main`` in-process (``train`` from a file with ``--set`` overrides,
``train --resume`` and ``eval`` of a run directory) and the loading functions directly. Each case is first
validated with the loading functions: a case that happens to be valid is not run (no training starts); a bad
one must make the CLI print one ``metalab: error: ...`` line, exit 2, and leave the runs directory (or run
directory) as it was. About 1,300 cases per run, plus the explicit inputs that once ended in a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import yaml
from conftest import REPO
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import metalab.cli as cli
from metalab.cli import main
from metalab.config import INT_LIMIT, MAX_YAML_BYTES, parse_overrides
from metalab.data.tasks import TaskConfig
from metalab.envs.config import EnvConfig
from metalab.errors import ConfigError
from metalab.experiment import (
    ALGORITHMS,
    CONFIG_NAME,
    RL_ALGORITHMS,
    algorithm,
    load_run_config,
    load_run_dir_config,
    run_config_from_dict,
)
from metalab.train.evaluate import EvalConfig
from metalab.train.loop import TrainConfig

CONFIGS = {name: REPO / "configs" / name for name in ("maml_sinusoid.yaml", "dqn_her_bitflip.yaml")}
FAST = settings(
    deadline=None,  # the machine is shared: time per example varies
    database=None,  # no .hypothesis folder in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------------------ helpers


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """The files under ``folder`` with their contents (None: no folder)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(argv: list[str], watched: Path) -> str:
    """Run the CLI on a bad input: one ``metalab: error:`` line, exit 2, ``watched`` unchanged. The line."""
    before = snapshot(watched)
    rc, out, err = run_main(argv)
    assert rc == 2, (rc, err)
    assert out == ""
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert len(err.splitlines()) == 1, err  # no other line separator (\r, \x85, \u2028 ...) either
    assert err.startswith("metalab: error: ")
    assert snapshot(watched) == before
    return err.rstrip("\n")


def config_error(check: typing.Callable[[], object]) -> ConfigError | None:
    """The ConfigError ``check()`` raises, or None when the input is valid (any other exception fails)."""
    try:
        check()
    except ConfigError as e:
        return e
    return None


def leaf_keys(prefix: str, cls: type) -> dict[str, Any]:
    """Dotted key -> annotation of every field of dataclass ``cls`` (nested dataclasses flattened)."""
    keys: dict[str, Any] = {}
    for name, tp in get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.update(leaf_keys(f"{prefix}{name}.", tp))
        else:
            keys[f"{prefix}{name}"] = tp
    return keys


def config_keys(path: Path) -> dict[str, Any]:
    """Every settable dotted key of the config at ``path`` with its annotation."""
    run = load_run_config(path)
    rl = run.algo in RL_ALGORITHMS
    keys = {"seed": int}
    for section, cls in (
        (run.algo, algorithm(run.algo).Config),
        ("env", EnvConfig) if rl else ("task", TaskConfig),
        ("train", TrainConfig),
        ("eval", EvalConfig),
    ):
        keys.update(leaf_keys(f"{section}.", cls))
    return keys


KEYS = {name: config_keys(path) for name, path in CONFIGS.items()}
CONFIG_TEXTS = {
    name: "".join(line for line in path.read_text().splitlines(True) if not line.lstrip().startswith("#"))
    for name, path in CONFIGS.items()
}
"""The configs without their comments (an edit of a comment would leave them valid)."""
SECTIONS = ("task", "env", "train", "eval", *ALGORITHMS)


def render(value: Any) -> str:
    """``value`` as the text of a ``--set`` value (flow-style YAML)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()


# ---------------------------------------------------------------------------------------- strategies

WRONG_KIND = st.one_of(
    st.text(max_size=12),
    st.lists(st.integers(-5, 5), min_size=1, max_size=3),
    st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), st.integers(0, 9), min_size=1, max_size=2),
)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
BAD_INT = st.one_of(
    st.integers(max_value=-1),  # every int field of these configs is >= 0
    st.integers(min_value=INT_LIMIT + 1, max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True),  # never an integer, not even 2.0
    st.booleans(),
    WRONG_KIND,
)
BAD_FLOAT = st.one_of(
    NON_FINITE,
    st.floats(max_value=-1e-6, allow_infinity=False),  # every float field of these configs is >= 0
    st.integers(min_value=10**309, max_value=10**400),  # beyond the float range
    st.booleans(),
    WRONG_KIND,
)
BAD_ANY = st.one_of(st.integers(), st.floats(), st.booleans(), WRONG_KIND)


def bad_values(tp: Any) -> st.SearchStrategy[Any]:
    """Values that annotation ``tp`` (of the keys of these configs) refuses, or almost always does."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in get_args(tp) if a is not type(None))  # null is fine: give a bad non-null
    if tp is int:
        return BAD_INT
    if tp is float:
        return BAD_FLOAT
    if tp is bool:
        return st.one_of(st.integers(), st.floats(), WRONG_KIND)
    if get_origin(tp) is Literal:
        return st.one_of(
            st.text(max_size=12).filter(lambda s: s not in get_args(tp)), st.integers(), WRONG_KIND
        )
    if get_origin(tp) is tuple:
        return st.one_of(
            st.lists(BAD_INT, min_size=1, max_size=3),
            st.lists(st.integers(1, 8), min_size=17, max_size=20),  # too many layers
            st.lists(st.integers(10**5, 10**13), min_size=1, max_size=2),  # too wide
            st.integers(),
            st.floats(),
        )
    return st.one_of(
        st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=3)
    )


@st.composite
def bad_override(draw: st.DrawFn, config: str) -> str:
    """One ``key=value`` item that is (almost always) invalid for ``config``."""
    keys = KEYS[config]
    kind = draw(st.sampled_from(["value", "value", "value", "section", "unknown", "raw", "nested"]))
    if kind == "value":  # a known key, a bad value
        key = draw(st.sampled_from(sorted(keys)))
        return f"{key}={render(draw(bad_values(keys[key])))}"
    if kind == "section":  # a section replaced by a scalar or a list
        return f"{draw(st.sampled_from(SECTIONS))}={render(draw(BAD_ANY))}"
    if kind == "unknown":  # a key beside or below a known one
        key = draw(st.sampled_from(sorted(keys)))
        extra = draw(st.text("abcdefghij_", min_size=1, max_size=5))
        key = draw(st.sampled_from([f"{key}{extra}", f"{key}.{extra}", f"{extra}.{key}"]))
        return f"{key}={render(draw(BAD_ANY))}"
    if kind == "nested":  # a known key, a YAML value too deep, too large or self-referencing
        key = draw(st.sampled_from(sorted(keys)))
        depth = draw(st.integers(33, 3000))
        return draw(
            st.sampled_from([f"{key}={'[' * depth}{']' * depth}", f"{key}=&a [*a]", f"{key}=1{'0' * depth}"])
        )
    return draw(st.text(max_size=40))  # anything at all: no '=', odd keys, odd characters


def mutate(text: str, draw: st.DrawFn) -> str:
    """``text`` with one random edit: an insertion, a deletion, or a line replaced."""
    lines = text.splitlines()
    how = draw(st.sampled_from(["insert", "delete", "line", "value"]))
    if how == "insert":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.text(min_size=1, max_size=20)) + text[at:]
    if how == "delete":
        at = draw(st.integers(0, len(text) - 1))
        return text[:at] + text[at + draw(st.integers(1, 40)) :]
    i = draw(st.integers(0, len(lines) - 1))
    if how == "line":
        lines[i] = draw(st.text(max_size=30))
    else:  # keep the key of a `key: value` line, give it a bad value
        key = lines[i].split(":", 1)[0]
        lines[i] = f"{key}: {render(draw(BAD_ANY))}"
    return "\n".join(lines) + "\n"


YAML_TREES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def bad_file(draw: st.DrawFn) -> bytes:
    """The bytes of a config file that is (almost always) invalid."""
    kind = draw(st.sampled_from(["mutated", "mutated", "tree", "text", "bytes", "encoding", "bomb"]))
    if kind == "mutated":  # a shipped config with one edit
        return mutate(CONFIG_TEXTS[draw(st.sampled_from(sorted(CONFIG_TEXTS)))], draw).encode()
    if kind == "tree":  # any YAML document
        return yaml.safe_dump(draw(YAML_TREES)).encode()
    if kind == "text":  # any text: control characters, tabs, odd indentation
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "bytes":  # binary
        return draw(st.binary(max_size=400))
    if kind == "encoding":  # a config saved in an encoding other than UTF-8
        text = CONFIGS["maml_sinusoid.yaml"].read_text() + "# é ü ß\n"
        return text.encode(draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252"])))
    n = draw(st.integers(2, 12))  # an alias bomb: each list holds the previous one n times
    lines = ["algo: maml", "a0: &a0 [x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * n)}]" for i in range(1, 8)
    ]
    return ("\n".join(lines) + "\n").encode()


# --------------------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for generated files; runs would go to ``workdir/runs``, which must never appear."""
    return tmp_path_factory.mktemp("fuzz")


@settings(FAST, max_examples=600)
@given(data=st.data())
def test_bad_overrides_end_in_one_line(workdir: Path, data: st.DataObject) -> None:
    config = data.draw(st.sampled_from(sorted(CONFIGS)), label="config")
    items = data.draw(st.lists(bad_override(config), min_size=1, max_size=3), label="overrides")
    runs = workdir / "runs"
    if config_error(lambda: load_run_config(CONFIGS[config], items)) is None:
        event("valid by chance: not run")
        return
    argv = ["train", str(CONFIGS[config]), *(f"--set={item}" for item in items), "--runs-dir", str(runs)]
    assert_user_error(argv, runs)
    assert not runs.exists()


@settings(FAST, max_examples=400)
@given(content=bad_file(), how=st.sampled_from(["train", "resume", "eval"]))
def test_bad_files_end_in_one_line(workdir: Path, content: bytes, how: str) -> None:
    runs = workdir / "runs"
    if how == "train":
        path = workdir / "case.yaml"
        path.write_bytes(content)
        if config_error(lambda: load_run_config(path)) is None:
            event("valid by chance: not run")
            return
        assert_user_error(["train", str(path), "--runs-dir", str(runs)], runs)
        assert not runs.exists()
        return
    run_dir = workdir / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / CONFIG_NAME).write_bytes(content)
    if config_error(lambda: load_run_dir_config(run_dir)) is None:
        event("valid by chance: not run")
        return
    argv = (
        ["train", "--resume", str(run_dir), "--runs-dir", str(runs)]
        if how == "resume"
        else ["eval", str(run_dir)]
    )
    assert_user_error(argv, run_dir)
    assert not runs.exists()


@settings(FAST, max_examples=300)
@given(
    algo=st.sampled_from(["maml", "dqn", "protonet", "pearl"]),
    tree=st.dictionaries(st.sampled_from(["algo", "seed", *SECTIONS, "x"]), YAML_TREES, max_size=5),
    items=st.lists(st.text(max_size=30), max_size=3),
)
def test_loading_functions_raise_only_config_errors(
    algo: str, tree: dict[str, Any], items: list[str]
) -> None:
    """Any mapping and any ``--set`` strings: a RunConfig or a ConfigError, never another exception."""
    data = {"algo": algo, **tree}
    for check in (lambda: run_config_from_dict(data), lambda: parse_overrides(items)):
        error = config_error(check)  # any exception but a ConfigError fails the test
        assert error is None or error.message


# ------------------------------------------------------------------------------- explicit examples

DEEP = b"algo: maml\ntrain: " + b"[" * 5000 + b"]" * 5000 + b"\n"
SINUSOID = CONFIGS["maml_sinusoid.yaml"]
BITFLIP = CONFIGS["dqn_her_bitflip.yaml"]
MAML_FALSE = SINUSOID.read_bytes() + b"\nmaml: false\n"
LISTED = [
    # (config file or file content, overrides, a fragment of the error line)
    (SINUSOID, ["eval.seed=-1"], "'eval.seed': must be >= 0"),
    (SINUSOID, ["seed=10000000000000000000000000000"], "'seed': must be <= 4294967295"),
    (SINUSOID, ["task.shots=1000000000"], "'task.shots': must be <= 10000"),
    (BITFLIP, ["dqn.hidden=[10000000000]"], "'dqn.hidden[0]': must be <= 16384"),
    (BITFLIP, ["env.n=1000000000"], "'env.n': must be <= 1024"),
    (BITFLIP, ["dqn.buffer_size=10000000000000"], "'dqn.buffer_size': must be <= 10000000"),
    (BITFLIP, ["env.n=1024", "dqn.buffer_size=5000000"], "GiB"),
    (SINUSOID, ["train.lr=.inf"], "'train.lr': must be a finite number"),
    (SINUSOID, ["train.lr=.nan"], "'train.lr': must be a finite number"),
    (SINUSOID, ["train.lr=1e400"], "'train.lr': must be a finite number"),
    (SINUSOID, ["train=0"], "'train': is a section"),
    (SINUSOID, ["maml=[1, 2]"], "'maml': is a section"),
    (SINUSOID, ["eval.episodes=1000000000000"], "'eval.episodes': must be <= 1000000"),
    (SINUSOID, ["train.log_every=10000000000000"], "the limit of any integer setting"),
    (SINUSOID, ["train.meta_batch=10000", "task.shots=1000"], "'train.meta_batch'"),
    (
        SINUSOID,
        ["maml.mlp_hidden=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]"],
        "hidden layers",
    ),
    (SINUSOID, [f"train.steps={'[' * 5000}{']' * 5000}"], "'train.steps': value nests deeper"),
    (SINUSOID, ["train.steps=1" + "0" * 5000], "'train.steps'"),
    (SINUSOID, ["train.steps=&a [*a]"], "contains itself"),
    (SINUSOID, ["tra\nin\u2028.lr=1"], "unknown key"),  # line breaks in a key are escaped
    (SINUSOID, ["\udcff.lr=1"], "unknown key"),  # an undecodable argv byte (a lone surrogate)
    (b"algo: maml\n\xff\xfe: 1\n", [], "is not UTF-8 text"),
    (bytes(range(256)) * 4, [], "is not UTF-8 text"),
    (b"algo: maml\x00\n", [], "is not valid YAML"),
    (DEEP, [], "nests deeper than 32 levels"),
    (MAML_FALSE, [], "'maml': is a section"),
    (b"algo: maml\ntrain: {lr: .inf}\n", [], "'train.lr': must be a finite number"),
    (b"a: &a [*a]\nalgo: maml\n", [], "contains itself"),
    (b"algo: maml\n" + b"x" * MAX_YAML_BYTES, [], f"larger than {MAX_YAML_BYTES} bytes"),
    (
        b"algo: maml\nb0: &b0 [x]\n"  # an alias bomb: 9**8 values once expanded
        + b"".join(b"b%d: &b%d [%s]\n" % (i, i, b", ".join([b"*b%d" % (i - 1)] * 9)) for i in range(1, 9)),
        [],
        "more than 100000 values once its aliases are expanded",
    ),
]


@pytest.mark.parametrize(("source", "overrides", "fragment"), LISTED, ids=range(len(LISTED)))
def test_listed_inputs_end_in_one_line(
    tmp_path: Path, source: Path | bytes, overrides: list[str], fragment: str
) -> None:
    path = source if isinstance(source, Path) else tmp_path / "case.yaml"
    if isinstance(source, bytes):
        path.write_bytes(source)
    runs = tmp_path / "runs"
    argv = ["train", str(path), *(f"--set={item}" for item in overrides), "--runs-dir", str(runs)]
    line = assert_user_error(argv, runs)
    assert fragment in line
    assert not runs.exists()


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    line = assert_user_error(["train", str(tmp_path), "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert "is not a file" in line


# ------------------------------------------------------------------------ main's last line of defence


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 4 TB"),
    ],
    ids=["MemoryError", "torch-cpu-allocator"],
)
def test_main_reports_allocation_failure_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException
) -> None:
    def fail(_: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_plot", fail)
    line = assert_user_error(["plot", str(tmp_path)], tmp_path)
    assert "out of memory" in line


def test_main_lets_other_runtime_errors_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A RuntimeError that is not an allocation failure is a bug: its traceback must show."""

    def fail(_: object) -> int:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "_plot", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_main(["plot", str(tmp_path)])
