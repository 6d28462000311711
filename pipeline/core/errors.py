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


def read_json(
    path: str | Path, error: type[Exception] = DeprojectorError, hint: str = "", expect: type = dict
) -> Any:
    """The parsed content of a JSON file, which must be an `expect` (a JSON object by default).

    A missing file, a folder, bytes that are not UTF-8, invalid or truncated JSON and a value
    of another type raise `error` naming the file (and line and column); `hint` says what to
    do about it."""
    import json

    path = regular_file(path, error, "JSON", hint)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        found = err.object[err.start : err.start + 1]
        raise error(
            f"{path}: not UTF-8 text (byte offset {err.start} is {found!r}); the file "
            f"is corrupt{_advice(hint)}"
        ) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(
            f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}); "
            f"the file is incomplete or corrupt{_advice(hint)}"
        ) from err
    if not isinstance(data, expect):
        expected = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise error(f"{path}: expected {expected}, found a {type(data).__name__}{_advice(hint)}")
    return data


def read_safetensors(
    path: str | Path, error: type[Exception] = DeprojectorError, hint: str = ""
) -> dict:
    """The tensors of a safetensors file (torch, on the CPU); a missing, truncated or corrupt
    file raises `error` naming it and what safetensors found wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _existing_file(path, error, "safetensors", hint)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise error(
            f"{path}: incomplete or corrupt safetensors file ({err}){_advice(hint)}"
        ) from err


def safetensors_names(
    path: str | Path, error: type[Exception] = DeprojectorError, hint: str = ""
) -> list[str]:
    """The tensor names in a safetensors file's header (the data is not read)."""
    from safetensors import SafetensorError, safe_open

    path = _existing_file(path, error, "safetensors", hint)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise error(
            f"{path}: incomplete or corrupt safetensors file ({err}){_advice(hint)}"
        ) from err


def _existing_file(path: str | Path, error: type[Exception], kind: str, hint: str) -> Path:
    return regular_file(path, error, kind, hint)


_SPECIAL_KINDS = (
    ("S_ISFIFO", "a FIFO (named pipe)"),
    ("S_ISCHR", "a character device"),
    ("S_ISBLK", "a block device"),
    ("S_ISSOCK", "a socket"),
)


def special_kind(path: str | Path) -> str:
    """What `path` is when it exists and is neither a regular file nor a folder (a link is
    followed: a link to /dev/zero is a character device); "" otherwise."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    return next((name for test, name in _SPECIAL_KINDS if getattr(stat, test)(mode)), "")


def regular_file(
    path: str | Path, error: type[Exception] = DeprojectorError, kind: str = "", hint: str = ""
) -> Path:
    """`path` if it is a regular file (or a link to one); refused by kind before anything
    reads it: a FIFO blocks a reader forever, /dev/zero never ends, so neither is read."""
    path = Path(path)
    what = f"a {kind} file" if kind else "a regular file"
    if path.is_dir():
        raise error(f"{path}: is a folder, expected {what}{_advice(hint)}")
    special = special_kind(path)
    if special:
        raise error(
            f"{path}: is {special}, not a regular file; refused without reading it{_advice(hint)}"
        )
    if not path.is_file():
        raise error(f"{path}: missing{_advice(hint)}")
    return path


class UnsafeFileError(DeprojectorError):
    """A file that only unpickling could read: unpickling runs whatever code the file names,
    so the project refuses it (everything it loads is read as data)."""


def read_torch(
    path: str | Path, error: type[Exception] = DeprojectorError, hint: str = "", **kwargs
) -> Any:
    """The content of a torch.save file, read as data (`weights_only=True`: tensors,
    numbers, strings and containers of them). A file that needs pickle for anything else is
    refused (UnsafeFileError naming it): nothing in it runs. A cut or corrupt file raises
    `error` naming it."""
    import pickle
    import zipfile

    import torch

    path = regular_file(path, error, "PyTorch", hint)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" in text.lower() or "unsupported" in text.lower():
            found = next(
                (
                    line.strip().rstrip(".")
                    for line in text.splitlines()
                    if "unsupported" in line.lower()
                ),
                "",
            )
            found = f" ({found[:120]})" if found else ""
            raise UnsafeFileError(
                f"{path}: holds Python objects only pickle could load{found}, and unpickling "
                f"can run code; refused, nothing in it ran. Delete it, or replace it with a "
                f"file the project wrote"
            ) from err
        detail = " ".join(text.split())
        raise error(
            f"{path}: incomplete or corrupt PyTorch checkpoint ({detail}){_advice(hint)}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        detail = " ".join(str(err).split())
        raise error(
            f"{path}: incomplete or corrupt PyTorch checkpoint ({detail}){_advice(hint)}"
        ) from err
