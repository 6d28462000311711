"""A model folder as the Hugging Face Hub serves it: a repository id resolved to a local
snapshot (huggingface_hub's cache), the files that travel with the weights, one-commit uploads.

A deprojector folder holds config.json (diffusers' ConfigMixin layout), model.safetensors, the
base CLIP's modality-gap statistics (modality_gap.safetensors, for image prompts) and README.md,
its model card (pipeline/models/card.py).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from pipeline.core.names import CARD_FILE, GAP_FILE

# Files of a folder that save_pretrained copies along with the weights it writes itself.
COMPANIONS = (GAP_FILE, CARD_FILE)


@dataclass(frozen=True)
class HubOptions:
    """How `from_pretrained` reaches a Hub repository (huggingface_hub.snapshot_download's
    keywords): revision (branch, tag or commit), cache_dir (default: the HF cache),
    local_files_only (also with HF_HUB_OFFLINE=1), token, subfolder (a deprojector inside the
    repository)."""

    revision: str | None = None
    cache_dir: str | Path | None = None
    local_files_only: bool = False
    token: str | bool | None = None
    subfolder: str = ""


def resolve_folder(name_or_path: str | Path, hub: HubOptions = HubOptions()) -> Path:
    """The local folder of a model: `name_or_path` itself when it is a folder, or names one
    (its parent folder exists, e.g. models/NAME in a project, or it is no Hub id: the loader
    then names the missing file); else the snapshot of the Hub repository `owner/name`,
    downloaded into the cache on first use.

    Raises FileNotFoundError when neither the folder nor the repository (or, offline, its
    cached snapshot) exists."""
    path = Path(name_or_path)
    if path.is_dir() or (path.parent.is_dir() and path.parent != Path(".")):
        return path / hub.subfolder
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        return path / hub.subfolder
    missing = f"no deprojector in {name_or_path}: no such folder, and the Hub repository"
    try:
        snapshot = snapshot_download(
            str(name_or_path),
            revision=hub.revision,
            cache_dir=hub.cache_dir,
            local_files_only=hub.local_files_only,
            token=hub.token,
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{missing} of that id is not in the Hugging Face cache (offline: HF_HUB_OFFLINE "
            "or local_files_only); give a folder, or download it once online"
        ) from err
    except Exception as err:  # huggingface_hub's HTTP errors: not found, gated, no network
        raise FileNotFoundError(
            f"{missing} of that id could not be fetched ({type(err).__name__}: {err})"
        ) from err
    return Path(snapshot) / hub.subfolder


def copy_companions(source: Path, target: Path) -> None:
    """Copy COMPANIONS that `source` (a loaded model's folder) has into `target` (nothing when
    they are the same folder or `source` is not a folder)."""
    if not source.is_dir() or source.resolve() == target.resolve():
        return
    for name in COMPANIONS:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def upload_operations(folder: Path) -> list[CommitOperationAdd]:
    """One Hub commit operation per file of `folder` (its path in the repository relative
    to `folder`), in path order: what push_to_hub sends."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in files
    ]


def push_folder(
    write_folder: Callable[[Path], None],
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
) -> str:
    """`write_folder` into a temporary directory and upload it to the Hub repository
    `repo_id` (created if missing) in one commit (huggingface_hub's create_commit with
    `upload_operations`); the commit's URL."""
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp))
        commit = api.create_commit(
            repo_id=repo,
            operations=upload_operations(Path(tmp)),
            commit_message=commit_message or "Upload deprojector",
            create_pr=create_pr,
        )
    return str(commit.commit_url)
