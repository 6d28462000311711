"""The one way files are replaced atomically: write a temporary file beside the target,
fsync it, rename it over the target. A killed writer never leaves a half-written file where a
reader (or a resumed run) would take it for a complete one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on success it replaces `path`.

        with atomic_path(out / "x.json") as tmp:
            tmp.write_text(text)

    The parent folder is created. On an exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
