"""The project's expected errors: one base class, so the CLI prints one line for any of them.

Each subclass is a kind of bad input or missing prerequisite; its message names the file,
line, key or value and says what was expected. Anything else is a bug and keeps its traceback.

The readers below are the one way the project opens a JSON or safetensors file it did not
just write: a missing, truncated or corrupt file becomes the caller's error class with a
message naming the file (and the line for JSON), never a library's traceback. They import
nothing at module level, so any module may use them (pipeline/models/ included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DeprojectorError(Exception):
    """An expected failure with a message for the user (no traceback)."""


def _advice(hint: str) -> str:
    return f"; {hint}" if hint else ""


def read_json(path: str | Path, error: type[Exception] = DeprojectorError, hint: str = "",
              expect: type = dict) -> Any:
    """The parsed content of a JSON file, which must be an `expect` (a JSON object by default).

    A missing file, a folder, bytes that are not UTF-8, invalid or truncated JSON and a value
    of another type raise `error` naming the file (and line and column); `hint` says what to
    do about it."""
    import json

    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, expected a JSON file{_advice(hint)}")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise error(f"{path}: missing{_advice(hint)}") from err
    except UnicodeDecodeError as err:
        found = err.object[err.start:err.start + 1]
        raise error(f"{path}: not UTF-8 text (byte offset {err.start} is {found!r}); the file "
                    f"is corrupt{_advice(hint)}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}); "
                    f"the file is incomplete or corrupt{_advice(hint)}") from err
    if not isinstance(data, expect):
        expected = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise error(f"{path}: expected {expected}, found a {type(data).__name__}"
                    f"{_advice(hint)}")
    return data


def read_safetensors(path: str | Path, error: type[Exception] = DeprojectorError,
                     hint: str = "") -> dict:
    """The tensors of a safetensors file (torch, on the CPU); a missing, truncated or corrupt
    file raises `error` naming it and what safetensors found wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _existing_file(path, error, "safetensors", hint)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise error(f"{path}: incomplete or corrupt safetensors file ({err}){_advice(hint)}") \
            from err


def safetensors_names(path: str | Path, error: type[Exception] = DeprojectorError,
                      hint: str = "") -> list[str]:
    """The tensor names in a safetensors file's header (the data is not read)."""
    from safetensors import SafetensorError, safe_open

    path = _existing_file(path, error, "safetensors", hint)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise error(f"{path}: incomplete or corrupt safetensors file ({err}){_advice(hint)}") \
            from err


def _existing_file(path: str | Path, error: type[Exception], kind: str, hint: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder, expected a {kind} file{_advice(hint)}")
    if not path.is_file():
        raise error(f"{path}: missing{_advice(hint)}")
    return path
