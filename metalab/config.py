"""Typed configs: frozen dataclasses read from YAML, overridden by ``key=value`` strings, checked strictly.

Every field of a config dataclass has a type annotation; values are checked against it when a config is built
from a dict. Unknown keys and bad values raise :class:`~metalab.errors.ConfigError` naming the dotted key, with
the closest valid key suggested for typos. Range checks live in each dataclass's ``__post_init__`` and use
:func:`require` / :func:`require_between`, so the error names the key (and the bound) there too.

Every field is checked against a few limits beyond its type: a float must be finite unless its field allows
infinity (``field(metadata=allow_inf())``), and an integer must lie within :data:`INT_LIMIT`; fields that size
memory (widths, batches, buffers) have tighter bounds of their own.

YAML is read as YAML 1.2 numbers (``3e-4`` and ``1e5`` are floats, ``0o17`` is octal, ``017`` is 17), with
limits on the size and nesting of a document: see :func:`load_yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from metalab.errors import ConfigError

T = TypeVar("T")

INT_LIMIT = 10**12
"""Backstop on every integer setting: no count, size or step number of a run comes near it."""
MAX_SEED = 2**32 - 1
"""Largest seed (NumPy's legacy seeding takes ``[0, 2**32 - 1]``)."""
MAX_STEPS = 10**9
"""Most training steps (or other step counts of a run): beyond it a run would not end."""
MAX_EPISODES = 1_000_000
"""Most episodes of one evaluation."""
MAX_TASKS = 10_000
"""Most tasks in one meta-batch or evaluation batch."""
MAX_BATCH = 65_536
"""Most items (transitions, sequences) in one minibatch."""
MAX_INNER_STEPS = 1_000
"""Most unrolled inner-loop (or other iterative) steps per task."""
MAX_FILTERS = 1_024
"""Most filters of a convolution layer."""
MAX_UNITS = 4_096
"""Largest recurrent state or embedding (LSTM/GRU width, latent and context sizes)."""
MAX_WIDTH = 16_384
"""Largest width of a fully connected layer."""
MAX_LAYERS = 16
"""Most hidden layers of an MLP."""
MAX_WEIGHTS = 100_000_000
"""Most weights between the hidden layers of an MLP (400 MB in float32)."""
MAX_YAML_BYTES = 1 << 20
"""Largest config file (or ``--set`` value) read: configs are a few KB."""
MAX_YAML_DEPTH = 32
"""Deepest nesting of a YAML document, counting the values at the leaves (a config needs 5)."""
MAX_YAML_VALUES = 100_000
"""Most values a YAML document may hold once its aliases are expanded (a guard against alias bombs)."""
MAX_INT_DIGITS = 40
"""Longest integer literal read from YAML (far beyond :data:`INT_LIMIT`, far below Python's 4300)."""
ALLOW_INF = "metalab.allow_inf"
"""Field metadata key of :func:`allow_inf`."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition`` holds. For ``__post_init__`` range checks."""
    if not condition:
        raise ConfigError(key, message)


def require_between(value: float, key: str, low: float, high: float, why: str = "") -> None:
    """Raise ``ConfigError(key, ...)`` naming the bound crossed unless ``low <= value <= high``.

    ``why`` (e.g. ``" or null"``, ``" (drawings per character)"``) follows the bound in the message.
    """
    if value < low:
        raise ConfigError(key, f"must be >= {low}{why}, got {show(value)}")
    if value > high:
        raise ConfigError(key, f"must be <= {high}{why}, got {show(value)}")


def require_widths(widths: tuple[int, ...], key: str, max_width: int = MAX_WIDTH) -> None:
    """Check the hidden widths of an MLP: each in ``[1, max_width]``, at most :data:`MAX_LAYERS` layers and
    :data:`MAX_WEIGHTS` weights between them."""
    require(
        len(widths) <= MAX_LAYERS, key, f"must list at most {MAX_LAYERS} hidden layers, got {len(widths)}"
    )
    for i, width in enumerate(widths):
        require_between(width, f"{key}[{i}]", 1, max_width)
    weights = sum(a * b for a, b in itertools.pairwise(widths))
    require(
        weights <= MAX_WEIGHTS, key, f"hidden layers of {weights} weights exceed the limit of {MAX_WEIGHTS}"
    )


def allow_inf() -> dict[str, bool]:
    """Metadata for a float field that accepts ``.inf`` / ``-.inf``: ``x: float = field(metadata=allow_inf())``.
    Other float fields refuse non-finite values; NaN is refused everywhere."""
    return {ALLOW_INF: True}


class _ShortRepr(reprlib.Repr):
    """``repr`` cut to a readable length, safe on integers too long for ``str``."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 60
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()


def show(value: Any) -> str:
    """A value as error messages quote it: its ``repr``, shortened."""
    return _SHORT.repr(value)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str, inf_ok: bool = False) -> Any:
    """Check ``value`` against annotation ``tp`` and convert the few lossless cases (int -> float, list -> tuple).

    Integers must lie within :data:`INT_LIMIT`; floats must be finite (``inf_ok``: infinite allowed).
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, inf_ok)
            except _OutOfRange:  # the right type, a bad value: say why
                raise
            except ConfigError as e:
                if e.key != key:  # the right type, a bad item
                    raise
                errors.append(e.message)
        raise ConfigError(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {show(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {show(value)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", inf_ok) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]", inf_ok) for i, (v, a) in enumerate(zip(args, value, strict=True))
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {show(value)}")
        try:
            return from_dict(tp, value)
        except ConfigError as e:
            raise e.within(key) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {show(value)}")
        return value
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key, inf_ok)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {show(value)}")
        return value
    raise TypeError(
        f"config field {key!r} has an unsupported annotation {tp!r}"
    )  # a bug in metalab, not input


class _OutOfRange(ConfigError):
    """A value of the right type beyond the limits every field of its type has."""


def _coerce_int(value: Any, key: str) -> int:
    """``value`` if it is an integer (not a bool). :func:`_check_int_limit` bounds it after the field's own
    bounds (``__post_init__``), which name a tighter range where there is one."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {show(value)}")
    return value


def _check_int_limit(value: Any, key: str) -> None:
    """Raise unless every integer in ``value`` (an int, or a tuple of them) lies within :data:`INT_LIMIT`."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_int_limit(item, f"{key}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        raise ConfigError(
            key,
            f"must be in [-{INT_LIMIT}, {INT_LIMIT}] (the limit of any integer setting), got {show(value)}",
        )


def _coerce_float(value: Any, key: str, inf_ok: bool) -> float:
    """``value`` as a float if it is a finite number (or an infinite one where ``inf_ok``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"expected a number, got {show(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        raise _OutOfRange(key, f"is too large for a number, got {show(value)}") from None
    if math.isnan(number) or (math.isinf(number) and not inf_ok):
        raise _OutOfRange(key, f"must be a finite number, got {show(value)}")
    return number


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys and ill-typed values by name."""
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping for {cls.__name__}, got {show(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(str(key), f"unknown key{hint}")
    kwargs = {k: _coerce(v, hints[k], k, bool(fields[k].metadata.get(ALLOW_INF))) for k, v in data.items()}
    try:
        config = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [n for n in names if n not in data and _is_required(cls, n)]
        raise ConfigError(missing[0] if missing else "", f"required key is missing ({e})") from None
    for k, v in kwargs.items():
        _check_int_limit(v, k)
    return config


def _is_required(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
"""YAML 1.2 floats (a dot or an exponent, the exponent's sign optional), plus YAML 1.1's ``_`` separators."""
_INT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+)$")
"""YAML 1.2 integers (decimal, ``0x`` hex, ``0o`` octal), plus YAML 1.1's ``0b`` binary and ``_`` separators."""


class YamlLimitError(yaml.YAMLError):
    """A YAML document beyond :data:`MAX_YAML_DEPTH` or :data:`MAX_YAML_VALUES`, or one that contains itself."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer (``017`` is 17, ``0o17`` is 15), refusing literals of over MAX_INT_DIGITS digits."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.removeprefix("+"))
    if len(digits) > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(digits)} digits is too long", node.start_mark
        )
    base = {"0x": 16, "0o": 8, "0b": 2}.get(digits[:2].lower(), 10)
    try:
        return sign * int(digits[2:] if base != 10 else digits, base)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"{show(text)} is not an integer", node.start_mark
        ) from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers and limits on depth, size and self-reference."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Compose as PyYAML does, stopping before the nesting gets deep (composition recurses)."""
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise YamlLimitError(f"nests deeper than {MAX_YAML_DEPTH} levels (line {line})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self) -> Any:
        """The document's value, once its expanded size is known to be within the limits."""
        node = self.get_single_node()
        if node is None:
            return None
        _measure(node, 1, {}, set())
        try:
            return self.construct_document(node)
        except yaml.YAMLError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:  # a bad explicit tag
            raise yaml.constructor.ConstructorError(
                None, None, f"a value cannot be read ({type(e).__name__}: {e})", node.start_mark
            ) from None


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))
_Loader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_Loader.add_constructor(_INT_TAG, _construct_int)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper quoting the strings that :func:`load_yaml` would read as numbers (``"1e5"``)."""


_Dumper.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


def _measure(
    node: yaml.Node, level: int, seen: dict[int, tuple[int, int]], open_: set[int]
) -> tuple[int, int]:
    """``(values, height)`` of ``node`` with aliases expanded; raises :class:`YamlLimitError` past the limits.

    Shared (aliased) nodes are measured once; recursion stays within :data:`MAX_YAML_DEPTH` frames.
    """
    if isinstance(node, yaml.ScalarNode):
        size, height = 1, 1
    elif id(node) in seen:
        size, height = seen[id(node)]
    else:
        if id(node) in open_:
            raise YamlLimitError("contains itself through an alias")
        if level > MAX_YAML_DEPTH:
            raise YamlLimitError(f"nests deeper than {MAX_YAML_DEPTH} levels once its aliases are expanded")
        open_.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
        size, height = 1, 1
        for child in children:
            child_size, child_height = _measure(child, level + 1, seen, open_)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_YAML_VALUES:
                raise YamlLimitError(
                    f"holds more than {MAX_YAML_VALUES} values once its aliases are expanded"
                )
        open_.discard(id(node))
        seen[id(node)] = (size, height)
    if level + height - 1 > MAX_YAML_DEPTH:
        raise YamlLimitError(f"nests deeper than {MAX_YAML_DEPTH} levels once its aliases are expanded")
    return size, height


def load_yaml(text: str) -> Any:
    """Parse one YAML document with YAML 1.2 numbers (``3e-4``, ``1e5``, ``.inf``, ``0o17``).

    Raises :class:`YamlLimitError` for a document longer than :data:`MAX_YAML_BYTES` characters, nested
    deeper than :data:`MAX_YAML_DEPTH`, holding more than :data:`MAX_YAML_VALUES` values with its aliases
    expanded, or containing itself; other ``yaml.YAMLError`` for invalid YAML.
    """
    if len(text) > MAX_YAML_BYTES:
        raise YamlLimitError(f"is longer than {MAX_YAML_BYTES} characters")
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def dump_yaml(data: Any) -> str:
    """``data`` as YAML that :func:`load_yaml` reads back the same (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong with a YAML document, on one line, with its line number when PyYAML knows it."""
    if isinstance(e, YamlLimitError):
        return str(e)
    if isinstance(e, yaml.reader.ReaderError):
        return f"is not valid YAML at character {e.position}: {e.reason} ({show(e.character)})"
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"is not valid YAML{where}: {getattr(e, 'problem', None) or e}"


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "task.ways=20"]`` -> nested dict. Values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key=value (e.g. train.lr=0.001)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(key, "override key is empty or malformed")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except YamlLimitError as e:
            raise ConfigError(key, f"value {e}") from None
        except yaml.YAMLError:  # not YAML: the text itself (a string field may take it)
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``updates`` into a copy of ``base``."""
    out = dict(base)
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a UTF-8 file of at most :data:`MAX_YAML_BYTES`, turning a missing, oversized,
    non-UTF-8 or invalid file into a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "", f"config file not found: {path}" if not path.exists() else f"{path} is not a file"
        )
    with path.open("rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError("", f"{path} is larger than {MAX_YAML_BYTES} bytes: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path} {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping of config keys, not {type(data).__name__}")
    return data
