"""Config loading: strict keys and types, errors that name the dotted key, overrides, shipped configs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_SINUSOID

from metalab.config import (
    INT_LIMIT,
    MAX_YAML_BYTES,
    allow_inf,
    dump_yaml,
    from_dict,
    load_yaml,
    parse_overrides,
    read_yaml,
    to_dict,
)
from metalab.data.tasks import TaskConfig
from metalab.errors import ConfigError
from metalab.experiment import MAX_BATCH_EXAMPLES, load_run_config, run_config_from_dict
from metalab.meta import maml, protonet
from metalab.train.loop import TrainConfig

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def config_error(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        run_config_from_dict(data)
    return info.value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path: Path) -> None:
    run = load_run_config(path)
    raw = yaml.safe_load(path.read_text())
    assert run.algo == raw["algo"]
    assert run.train.steps == raw.get("train", {}).get("steps", run.train.steps)
    assert run.seed == raw.get("seed", 0)
    # The resolved dict (what a run directory saves) reads back to the same config.
    again = run_config_from_dict(yaml.safe_load(yaml.safe_dump(run.to_yaml_dict())))
    assert again == run


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"maml_sinusoid.yaml", "maml_omniglot_5w1s.yaml", "protonet_omniglot_5w1s.yaml"} <= names


def test_values_are_typed_and_sections_built() -> None:
    run = run_config_from_dict(TINY_SINUSOID)
    assert isinstance(run.params, maml.Config)
    assert run.params.mlp_hidden == (16, 16)  # YAML list -> tuple
    assert isinstance(run.task, TaskConfig) and run.task.dataset == "sinusoid"
    assert run.train.steps == 20 and run.train.checkpoint_every == 5
    assert run.eval.episodes == 8


def test_int_is_accepted_for_float_and_becomes_float() -> None:
    cfg = from_dict(TrainConfig, {"lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_unknown_key_names_dotted_key_with_suggestion() -> None:
    err = config_error({"algo": "maml", "train": {"lrr": 0.1}})
    assert err.key == "train.lrr"
    assert "train.lrr" in str(err)
    assert "did you mean 'lr'" in str(err)


def test_unknown_nested_algorithm_key() -> None:
    err = config_error({"algo": "maml", "maml": {"inner_steps": 1, "inner_lrr": 0.1}})
    assert err.key == "maml.inner_lrr"
    assert "did you mean 'inner_lr'" in str(err)


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    err = config_error({"algo": "maml", "eval": {"zzzzzz": 1}})
    assert err.key == "eval.zzzzzz"
    assert "episodes" in str(err) and "batch" in str(err) and "seed" in str(err)


def test_unknown_top_level_section() -> None:
    err = config_error({"algo": "maml", "trian": {"steps": 3}})
    assert err.key == "trian"
    assert "unknown key" in str(err)


def test_other_algorithms_section_is_rejected() -> None:
    err = config_error({"algo": "maml", "protonet": {"hidden": 8}})
    assert err.key == "protonet"
    assert "algo: protonet" in str(err)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"train": {"steps": 2.5}}, "train.steps"),
        ({"train": {"steps": True}}, "train.steps"),  # a bool is not an integer
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"maml": {"first_order": "yes"}}, "maml.first_order"),
        ({"maml": {"mlp_hidden": 40}}, "maml.mlp_hidden"),
        ({"maml": {"mlp_hidden": [40, "x"]}}, "maml.mlp_hidden[1]"),
        ({"task": {"train_ways": "ten"}}, "task.train_ways"),
        ({"train": 5}, "train"),
    ],
)
def test_wrong_type_names_key(data: dict, key: str) -> None:
    err = config_error({"algo": "maml", **data})
    assert err.key == key
    assert f"'{key}'" in str(err)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"checkpoint_every": 0}}, "train.checkpoint_every"),
        ({"train": {"grad_clip": -1.0}}, "train.grad_clip"),
        ({"maml": {"inner_lr": 0}}, "maml.inner_lr"),
        ({"task": {"ways": 0}}, "task.ways"),
        ({"task": {"shots": 10, "queries": 15}}, "task.queries"),  # 25 > 20 drawings per character
        ({"task": {"dataset": "sinusoid", "ways": 5}}, "task.ways"),
        ({"task": {"train_ways": 0}}, "task.train_ways"),
        ({"eval": {"episodes": 0}}, "eval.episodes"),
        ({"seed": -1}, "seed"),
        ({"algo": "dream", "dream": {"decoder_input": "lstm"}}, "dream.decoder_input"),
        ({"algo": "dream", "dream": {"reward_folds": 1}}, "dream.reward_folds"),
    ],
)
def test_bad_value_names_key(data: dict, key: str) -> None:
    err = config_error({"algo": "maml", **data})
    assert err.key == key
    assert f"'{key}'" in str(err)


def test_literal_choice_lists_valid_values() -> None:
    err = config_error({"algo": "maml", "train": {"lr_schedule": "linear"}})
    assert err.key == "train.lr_schedule"
    assert "'constant'" in str(err) and "'cosine'" in str(err)


def test_unknown_algorithm() -> None:
    err = config_error({"algo": "leo"})
    assert err.key == "algo"
    assert "'leo'" in str(err) and "maml" in str(err) and "protonet" in str(err)


def test_missing_algorithm() -> None:
    err = config_error({"seed": 0})
    assert err.key == "algo"


def test_protonet_section() -> None:
    run = run_config_from_dict({"algo": "protonet", "protonet": {"hidden": 8}})
    assert isinstance(run.params, protonet.Config) and run.params.hidden == 8
    assert config_error({"algo": "protonet", "protonet": {"hidden": 0}}).key == "protonet.hidden"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as info:
        load_run_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("algo: maml\ntrain:\n  steps: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        read_yaml(path)
    assert "bad.yaml" in str(info.value) and "line" in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- algo\n- maml\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(path)


def test_empty_yaml_is_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert read_yaml(path) == {}


def test_parse_overrides_nests_and_parses_yaml_scalars() -> None:
    out = parse_overrides(
        [
            "train.lr=0.01",
            "task.ways=20",
            "maml.first_order=true",
            "maml.mlp_hidden=[8, 8]",
            "task.split=lake",
            "task.data_root=null",
        ]
    )
    assert out == {
        "train": {"lr": 0.01},
        "task": {"ways": 20, "split": "lake", "data_root": None},
        "maml": {"first_order": True, "mlp_hidden": [8, 8]},
    }


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=3", ".lr=1"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError):
        parse_overrides([item])


def test_override_both_value_and_section() -> None:
    with pytest.raises(ConfigError, match="both"):
        parse_overrides(["train=3", "train.lr=0.1"])


def test_overrides_apply_on_top_of_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(TINY_SINUSOID))
    run = load_run_config(path, ["train.steps=7", "maml.inner_lr=0.5", "eval.batch=2"])
    assert (run.train.steps, run.params.inner_lr, run.eval.batch) == (7, 0.5, 2)
    assert run.train.lr == TINY_SINUSOID["train"]["lr"]  # untouched keys keep the file's value
    with pytest.raises(ConfigError) as info:
        load_run_config(path, ["train.lrr=0.1"])
    assert info.value.key == "train.lrr"


def test_to_dict_is_plain_yaml() -> None:
    run = run_config_from_dict(TINY_SINUSOID)
    dumped = yaml.safe_dump(to_dict(run.params))  # safe_dump refuses tuples: they must become lists
    assert yaml.safe_load(dumped)["mlp_hidden"] == [16, 16]


def test_config_is_frozen() -> None:
    run = run_config_from_dict(TINY_SINUSOID)
    with pytest.raises(AttributeError):
        run.train.lr = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------- YAML 1.2 numbers, limits, bounds


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3e-4", 3e-4),
        ("1E5", 1e5),
        ("1.0e5", 1e5),
        ("-2.5e+3", -2500.0),
        (".5", 0.5),
        ("1.", 1.0),
        ("1_000", 1000),
        ("017", 17),  # YAML 1.2: decimal, not octal
        ("0o17", 15),
        ("0x1F", 31),
        ("-.inf", float("-inf")),
        ("1:30", "1:30"),  # YAML 1.1's base 60 is gone
        ("1e", "1e"),
        ("e5", "e5"),
        (".", "."),
    ],
)
def test_yaml_numbers_follow_yaml_1_2(text: str, value: object) -> None:
    assert load_yaml(text) == value
    assert type(load_yaml(text)) is type(value)


def test_scientific_notation_in_overrides_and_files(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(TINY_SINUSOID).replace("lr: 0.01", "lr: 1e-2"))
    assert load_run_config(path).train.lr == 0.01
    run = load_run_config(path, ["train.lr=3e-4", "maml.inner_lr=5E-1"])
    assert (run.train.lr, run.params.inner_lr) == (3e-4, 0.5)


def test_dump_yaml_quotes_strings_that_read_as_numbers() -> None:
    data = {"keep_best": "3e-4", "lr": 3e-4, "n": "017", "inf": float("inf")}
    assert load_yaml(dump_yaml(data)) == data


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_non_finite_float_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="must be a finite number") as info:
        load_run_config(REPO / "configs" / "maml_sinusoid.yaml", [f"train.lr={value}"])
    assert info.value.key == "train.lr"
    with pytest.raises(ConfigError, match="too large for a number"):
        from_dict(TrainConfig, {"lr": 10**400})  # an int beyond the float range


def test_a_field_may_allow_infinity() -> None:
    @dataclasses.dataclass(frozen=True)
    class Limits:
        budget: float = dataclasses.field(default=math.inf, metadata=allow_inf())
        rate: float = 1.0

    assert from_dict(Limits, {"budget": math.inf}).budget == math.inf
    with pytest.raises(ConfigError, match="finite") as info:
        from_dict(Limits, {"budget": math.nan})  # NaN never
    assert info.value.key == "budget"
    assert config_error_of(Limits, {"rate": -math.inf}).key == "rate"


def config_error_of(cls: type, data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    return info.value


def test_every_integer_has_a_backstop_limit() -> None:
    err = config_error({"algo": "maml", "train": {"log_every": INT_LIMIT + 1}})
    assert err.key == "train.log_every" and str(INT_LIMIT) in str(err)
    err = config_error({"algo": "maml", "maml": {"inner_steps": 10**5000}})  # too long to print
    assert err.key == "maml.inner_steps" and "digits" in str(err) and len(str(err)) < 200


@pytest.mark.parametrize(
    "data",
    [{"train": 0}, {"train": [1]}, {"maml": False}, {"eval": "fast"}, {"task": 1.5}],
    ids=["train=0", "train=[1]", "maml=false", "eval=str", "task=float"],
)
def test_a_section_cannot_be_a_scalar(data: dict) -> None:
    err = config_error({"algo": "maml", **data})
    assert err.key == next(iter(data)) and "section" in str(err)


def test_an_empty_section_means_defaults() -> None:
    assert run_config_from_dict({"algo": "maml", "train": None}).train == TrainConfig()


@pytest.mark.parametrize(
    ("data", "key", "bound"),
    [
        ({"seed": 2**32}, "seed", "<= 4294967295"),
        ({"seed": -1}, "seed", ">= 0"),
        ({"eval": {"seed": -1}}, "eval.seed", ">= 0"),
        ({"eval": {"seed": 2**32}}, "eval.seed", "<= 4294967295"),
        ({"eval": {"episodes": 10**12}}, "eval.episodes", "<= 1000000"),
        ({"eval": {"batch": 10**5}}, "eval.batch", "<= 4096"),
        ({"train": {"steps": 10**10}}, "train.steps", "<= 1000000000"),
        ({"train": {"meta_batch": 10**5}}, "train.meta_batch", "<= 10000"),
        ({"train": {"eval_episodes": 10**7}}, "train.eval_episodes", "<= 1000000"),
        ({"task": {"dataset": "sinusoid", "ways": 1, "shots": 10**9}}, "task.shots", "<= 10000"),
        ({"task": {"ways": 10**6}}, "task.ways", "<= 6492"),
        ({"task": {"image_size": 1000}}, "task.image_size", "<= 105"),
        ({"maml": {"mlp_hidden": [10**10]}}, "maml.mlp_hidden[0]", "<= 16384"),
        ({"maml": {"mlp_hidden": [8] * 17}}, "maml.mlp_hidden", "at most 16"),
        ({"maml": {"mlp_hidden": [16384] * 3}}, "maml.mlp_hidden", "weights"),
        ({"maml": {"hidden": 5000}}, "maml.hidden", "<= 1024"),
        ({"maml": {"inner_steps": 10**4}}, "maml.inner_steps", "<= 1000"),
        ({"algo": "dqn", "dqn": {"hidden": [10**10]}}, "dqn.hidden[0]", "<= 16384"),
        ({"algo": "dqn", "dqn": {"buffer_size": 10**13}}, "dqn.buffer_size", "<= 10000000"),
        ({"algo": "dqn", "env": {"n": 10**9}}, "env.n", "<= 1024"),
        ({"algo": "dqn", "env": {"max_episode_steps": 10**9}}, "env.max_episode_steps", "<= 100000"),
        ({"algo": "rl2", "rl2": {"buffer_size": 10**8}}, "rl2.buffer_size", "<= 1000000"),
        ({"algo": "pearl", "pearl": {"buffer_size": 10**8}}, "pearl.buffer_size", "<= 1000000"),
        ({"algo": "pearl", "pearl": {"sac": {"hidden": [10**6]}}}, "pearl.sac.hidden[0]", "<= 16384"),
        ({"algo": "mann", "mann": {"hidden": 10**5}}, "mann.hidden", "<= 4096"),
    ],
)
def test_upper_and_lower_bounds_name_the_key_and_bound(data: dict, key: str, bound: str) -> None:
    err = config_error({"algo": "maml", **data})
    assert err.key == key
    assert f"must be {bound}" in str(err) or bound in str(err)


def test_examples_per_batch_are_bounded() -> None:
    task = {"dataset": "sinusoid", "ways": 1, "shots": 5000, "queries": 5000}
    err = config_error({"algo": "maml", "task": task, "train": {"meta_batch": 100}})
    assert err.key == "train.meta_batch" and str(MAX_BATCH_EXAMPLES) in str(err)
    err = config_error({"algo": "maml", "task": task, "train": {"meta_batch": 1}, "eval": {"batch": 100}})
    assert err.key == "eval.batch"


def test_dqn_replay_buffer_memory_is_bounded_on_bitflip() -> None:
    err = config_error({"algo": "dqn", "env": {"n": 1024}, "dqn": {"buffer_size": 5_000_000}})
    assert err.key == "dqn.buffer_size" and "GiB" in str(err)
    run_config_from_dict({"algo": "dqn", "env": {"n": 50}, "dqn": {"buffer_size": 1_000_000}})


def test_read_yaml_refuses_non_utf8_oversized_and_deep_files(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    for content, fragment in [
        (b"algo: maml\n\xff\n", "not UTF-8"),
        (b"algo: maml\n" + b"#" * MAX_YAML_BYTES, "larger than"),
        (b"train: " + b"[" * 5000 + b"]" * 5000, "nests deeper than"),
        (b"a: &a {b: *a}\n", "contains itself"),
        (b"a: \x07\n", "not valid YAML at character"),
        (b"a: !!int 123456789012345678901234567890123456789012345\n", "too long"),
        (b"a: !!bool maybe\n", "cannot be read"),
    ]:
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=fragment) as info:
            read_yaml(path)
        assert "\n" not in str(info.value)
    path.write_bytes("\ufeffalgo: maml\n".encode())  # a byte-order mark is fine
    assert read_yaml(path) == {"algo": "maml"}


def test_override_values_have_the_same_limits() -> None:
    with pytest.raises(ConfigError, match="nests deeper") as info:
        parse_overrides(["train.steps=" + "[" * 100])
    assert info.value.key == "train.steps"
    assert parse_overrides(["train.keep_best=[unclosed"]) == {"train": {"keep_best": "[unclosed"}}
