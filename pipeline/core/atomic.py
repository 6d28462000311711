"""The one way files are replaced atomically: write a temporary file beside the target,
fsync it, rename it over the target. A killed writer never leaves a half-written file where a
reader (or a resumed run) would take it for a complete one.

Every output the project writes (pictures, JSON, statistics, weights, checkpoints, shards)
goes through `atomic_path` or one of the writers below. A write the system refuses (a full
disk, a read-only or unwritable folder) becomes one OutputError naming the path and the
reason; the previous file is untouched and no temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import DeprojectorError

# The errors a write gets from the system rather than from a bug: no space, no quota, a file
# too large, a read-only file system, no permission.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
_ADVICE = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EFBIG: "write to a file system that takes larger files",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission to write there: write elsewhere",
    errno.EPERM: "no permission to write there: write elsewhere",
}


class OutputError(DeprojectorError):
    """An output could not be written (disk full, read-only, no permission)."""


def is_write_refusal(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def write_error(path: str | Path, err: OSError) -> OutputError:
    """The one line for a refused write: the path, the system's reason, what to do."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    advice = _ADVICE.get(err.errno, "write elsewhere") if err.errno else "write elsewhere"
    return OutputError(f"{path}: cannot write it ({reason}); {advice}. Nothing was replaced")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on success it replaces `path`.

        with atomic_path(out / "x.json") as tmp:
            tmp.write_text(text)

    The parent folder is created. On an exception the temporary file is removed; a write the
    system refuses (is_write_refusal) is raised as OutputError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if is_write_refusal(err):
            raise write_error(path.parent, err) from err
        raise
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and is_write_refusal(err):
            raise write_error(path, err) from err
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of `path` that writers killed outright (SIGKILL: no
    cleanup ran) left behind: those whose process no longer exists."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_tensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file. Serialised in memory and written by Python, so a full disk is an
    OSError like any other (safetensors' own writer reports it as its own error type)."""
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata=metadata))


def save_torch(path: str | Path, state: Any) -> None:
    """A torch.save file (a checkpoint), serialised in memory for the same reason."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer())


def save_image(image, path: str | Path) -> None:
    """A PIL image in the format its suffix names (.png, .jpg, ...)."""
    from PIL import Image

    path = Path(path)
    kind = Image.registered_extensions().get(path.suffix.lower())
    if kind is None or kind not in Image.SAVE:
        raise OutputError(f"{path}: unknown picture format {path.suffix!r}; use .png or .jpg")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        image.save(handle, format=kind)
