"""Typed sections of a YAML params file: the one reader and checker params.py and the world use.

`read_params_file` parses params.yaml as DVC does (YAML 1.2 floats, no duplicate keys) with
errors that name the file, line and column; `section` turns one mapping into a frozen
dataclass, every key checked by name and type; `check` states one condition on a value.
Every failure is a ParamsError naming the key (`train.lr`, `models.NAME.vicinity`).
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from pipeline.core.errors import DeprojectorError


class ParamsError(DeprojectorError, ValueError):
    """A value in params.yaml is missing, of the wrong type or out of range."""


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a params section: a dataclass


def section(cls: type[T], raw: Any, name: str) -> T:
    """The dataclass `cls` from the mapping `raw` of section `name` (None: the defaults)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ParamsError(f"params: `{name}` must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ParamsError(f"params: unknown key `{name}.{key}` (known: {', '.join(known)})")
    values = {}
    for key, value in raw.items():
        expected = type(getattr(cls(), key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ParamsError(f"params: `{name}.{key}` must be {expected.__name__}, got {value!r}")
        # No setting is infinite or NaN (`.inf`, `.nan` are valid YAML floats): a learning
        # rate of .inf trains NaN, a guidance scale of .inf draws black.
        check(
            expected is not float or math.isfinite(value), f"{name}.{key}", "a finite number", value
        )
        values[key] = value
    return cls(**values)


def check(condition: bool, key: str, expected: str, value: Any) -> None:
    """Raise ParamsError "`key` must be EXPECTED, got VALUE" unless `condition`."""
    if not condition:
        raise ParamsError(f"params: `{key}` must be {expected}, got {value!r}")


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with YAML 1.2's float syntax.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `1e-06` (what
    `dvc exp run -S train.lr=0.000001` writes), `1e-4`, `1E5` and `+.5` stay strings. DVC
    itself reads params.yaml as YAML 1.2, where all of them are floats; so do we. Integers,
    booleans and everything else resolve as before.
    """


_FLOAT = re.compile(
    r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
  | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN)
)$""",
    re.VERBOSE,
)
FLOAT_TAG = "tag:yaml.org,2002:float"
ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver(FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _unique_mapping(loader: ParamsLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: PyYAML keeps the last of two equal keys silently (a
    run listed twice under `models:` would merge); YAML forbids it and DVC refuses it."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        if isinstance(key, (str, int, float, bool)):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


ParamsLoader.add_constructor("tag:yaml.org,2002:map", _unique_mapping)


def load_yaml(text: str):
    """Parse params YAML (ParamsLoader: floats as YAML 1.2 and DVC read them)."""
    return yaml.load(text, Loader=ParamsLoader)  # safe: a SafeLoader subclass


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a params YAML file; errors name the file (and line, column)."""
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, expected a params YAML file")
    if not path.exists():
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ParamsError(
            f"{path}:{line}: not valid UTF-8 (byte offset {err.start}: "
            f"{data[err.start : err.start + 1]!r}); save it as UTF-8"
        ) from err
    try:
        raw = load_yaml(text) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        what = ", ".join(part for part in (err.context, err.problem) if part)
        raise ParamsError(f"{path}{where}: not valid YAML ({what})") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_section(path: str | Path, name: str, cls: type[T]) -> T:
    """One section of a params file, typed and checked by key (the others are not read)."""
    raw = read_params_file(path)
    try:
        return section(cls, raw.get(name), name)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from err
