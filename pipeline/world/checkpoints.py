"""Reading and writing the checkpoints of the world's training loop (pipeline/world/loop.py).

Apart from the loop so that a change to how files are read or written is not a change to what
trains a part: this module is not among the code a part's fingerprint covers (build.CODE)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.atomic import save_torch
from pipeline.core.errors import read_torch

CHECKPOINT_KEYS = ("modules", "optimizer", "step", "losses")


class _CorruptCheckpoint(Exception):
    pass


def save_atomic(state: dict, path: Path) -> None:
    """`state` to `path` under a temporary name, renamed when complete."""
    save_torch(path, state)


def read_checkpoint(path: Path) -> dict | None:
    """A checkpoint of train_steps, or None where the file is cut short or corrupt; read as
    data (pipeline.core.errors.read_torch): one that needs pickle is refused, naming it."""
    try:
        state = read_torch(path, _CorruptCheckpoint)
    except _CorruptCheckpoint:
        return None
    return state if isinstance(state, dict) and all(k in state for k in CHECKPOINT_KEYS) else None
