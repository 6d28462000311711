"""What a base model folder must hold, read from its files alone, and their fingerprint.

transformers and diffusers load several wrong folders without an error: a model folder with
no tokenizer files gives a 2-token tokenizer, a text encoder without `text_projection` gets a
random projection. These checks read file names and safetensors headers only, so the loaders
(pipeline/base/loaders.py) run them before `from_pretrained`; the checks of loaded models are
in pipeline/base/checks.py. The fingerprint of the files a base model loads is what DVC stages
and saved deprojectors compare to tell base models apart.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from pipeline.core.errors import (
    DeprojectorError,
    read_json,
    read_torch,
    safetensors_names,
    special_kind,
)


class BaseModelError(DeprojectorError, RuntimeError):
    """A base model could not be built or loaded; the message says what to do."""


CLIP_CHECKPOINT = "openai/clip-vit-large-patch14"  # the CLIP SD 1.x's text encoder was cut from
# What from_pretrained reads by default (transformers, diffusers), safetensors first; each
# may be sharded with a NAME.index.json beside it.
WEIGHT_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)
SKIPPED_SD_PARTS = {"safety_checker"}  # loaded with safety_checker=None
# Files over this size are fingerprinted by size + first and last MiB (a multi-GB checkpoint
# would take minutes to hash in full on every `dvc repro`); a file in the Hugging Face cache
# by its blob name, which is the etag: the sha256 of the content for LFS weight files.
FULL_HASH_LIMIT = 64 * 2**20
EDGE = 2**20
REDOWNLOAD = "download the model again (an interrupted download leaves files incomplete)"


# --- static checks of a CLIP folder (cheap: file names and safetensors headers) -------------


def _named(folder: Path, name: str) -> str:
    """Name base.clip beside the folder where they differ (builtin, a hub snapshot)."""
    return "" if str(folder) == name else f" (base.clip = {name!r})"


def has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def check_json_files(folder: Path) -> None:
    """Every JSON file of the folder (config, tokenizer, index) parses: transformers' own
    error for a cut one names neither the file nor the cause."""
    for path in sorted(folder.glob("*.json")):
        read_json(path, BaseModelError, REDOWNLOAD, expect=object)


def check_tokenizer_files(folder: Path, name: str) -> None:
    refuse_special_files(folder)
    check_json_files(folder)
    if not has_tokenizer_files(folder):
        raise BaseModelError(
            f"base.clip: the folder {str(folder)!r}{_named(folder, name)} has no tokenizer "
            f"files: a CLIP tokenizer needs tokenizer.json, or vocab.json and merges.txt "
            f"(with tokenizer_config.json and special_tokens_map.json). Without them "
            f"transformers makes a 2-token tokenizer that maps every character to one id. "
            f"Put the tokenizer files of the checkpoint beside config.json "
            f"(`hf download {CLIP_CHECKPOINT} --local-dir DIR` has them)."
        )


def weight_files(folder: Path) -> list[Path]:
    """The weight files `from_pretrained` reads from `folder` (safetensors preferred)."""
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index, BaseModelError, REDOWNLOAD).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise BaseModelError(
                    f'{index}: expected a "weight_map" object of tensor name '
                    f"to file name, found {type(weight_map).__name__}; "
                    f"{REDOWNLOAD}"
                )
            shards = [folder / shard for shard in sorted(set(weight_map.values()))]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise BaseModelError(
                    f"{index}: names {', '.join(missing)}, not in the folder; {REDOWNLOAD}"
                )
            return shards
        if (folder / name).is_file():
            return [folder / name]
    return []


def weight_names(folder: Path) -> set[str]:
    """Tensor names in the checkpoint of `folder`, read from headers / the index only."""
    names: set[str] = set()
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            names.update(safetensors_names(path, BaseModelError, REDOWNLOAD))
            continue
        names.update(read_torch(path, BaseModelError, REDOWNLOAD, map_location="cpu", mmap=True))
    return names


def check_text_projection(folder: Path, name: str) -> None:
    files = weight_files(folder)
    if not files:
        raise BaseModelError(
            f"base.clip: the folder {str(folder)!r}{_named(folder, name)} has no weights "
            f"({', '.join(WEIGHT_NAMES[::2])} or their .index.json)"
        )
    if not any(n.endswith("text_projection.weight") for n in weight_names(folder)):
        raise BaseModelError(
            f"base.clip: {name!r} has no text_projection weights (in "
            f"{', '.join(f.name for f in files)}), so transformers would initialise the "
            f"projection at random. It is a CLIP text encoder without projection, like Stable "
            f"Diffusion's text_encoder folder: set base.clip to the full CLIP checkpoint it was "
            f"cut from ({CLIP_CHECKPOINT} for SD 1.x, or a local copy of it)."
        )


def refuse_special_files(folder: Path, depth: int = 0) -> None:
    """Every entry of `folder` (and of its subfolders, `depth` levels down) is a folder or a
    regular file: a FIFO would block a loader forever and a link to /dev/zero never ends, so
    they are refused by kind before anything reads them."""
    for entry in sorted(folder.iterdir()):
        kind = special_kind(entry)
        if kind:
            raise BaseModelError(
                f"{entry}: is {kind}, not a regular file; refused without "
                f"reading it (a model folder holds files and folders only)"
            )
        if depth > 0 and entry.is_dir():
            refuse_special_files(entry, depth - 1)


def check_pickle_free(files: list[Path]) -> None:
    """Each PyTorch `.bin` of `files` reads as data (pipeline.core.errors.read_torch): one that
    needs pickle is refused naming it, before a loader opens it."""
    for path in files:
        if path.suffix == ".bin":
            read_torch(path, BaseModelError, REDOWNLOAD, map_location="cpu", mmap=True)


def check_sd_folder(folder: Path) -> None:
    """The static checks of a local Stable Diffusion folder: no special files, weights that
    read as data."""
    refuse_special_files(folder, depth=1)
    check_pickle_free(sd_files(folder))


def check_clip_folder(folder: Path, name: str) -> None:
    """The static checks, run before transformers gets a chance to load a wrong folder.

    The projection first: SD's text_encoder folder lacks tokenizer files too, and "no
    projection, use the CLIP it was cut from" is the advice that fixes both."""
    refuse_special_files(folder)
    check_text_projection(folder, name)
    check_tokenizer_files(folder, name)


# --- fingerprint ----------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    real = path.resolve()
    if real.parent.name == "blobs":  # Hugging Face cache: the blob is named by its etag
        return f"etag:{real.name}"
    size = real.stat().st_size
    digest = hashlib.sha256()
    with real.open("rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(EDGE), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        digest.update(str(size).encode())
        digest.update(handle.read(EDGE))
        handle.seek(size - EDGE)
        digest.update(handle.read(EDGE))
    return f"size+edges:{digest.hexdigest()}"


def loaded_files(folder: Path) -> list[Path]:
    """Configs, tokenizer files and weights that `from_pretrained` reads from `folder`."""
    small = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".txt")]
    return sorted(set(small) | set(weight_files(folder)))


def sd_files(folder: Path) -> list[Path]:
    """model_index.json and the files of every component the pipeline loads."""
    index = folder / "model_index.json"
    parts = [
        k
        for k, v in read_json(index, BaseModelError, REDOWNLOAD).items()
        if isinstance(v, list) and v[0] is not None and k not in SKIPPED_SD_PARTS
    ]
    return [
        index,
        *(
            f
            for part in sorted(parts)
            if (folder / part).is_dir()
            for f in loaded_files(folder / part)
        ),
    ]


def fingerprint(folders: dict[str, tuple[Path, list[Path]]]) -> dict:
    """{"fingerprint": sha256 over the relative paths and digests, "files": {path: digest}}."""
    files = {
        f"{key}/{path.relative_to(root).as_posix()}": file_digest(path)
        for key, (root, paths) in folders.items()
        for path in paths
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, "files": dict(sorted(files.items()))}


# --- where the files are ---------------------------------------------------------------------


def source_folder(source: str, marker: str) -> Path:
    """A local folder, or the Hugging Face cache snapshot a hub id was loaded from."""
    if Path(source).is_dir():
        return Path(source)
    cached = try_to_load_from_cache(source, marker)
    if not isinstance(cached, str):
        raise BaseModelError(
            f"{source!r}: loaded, but {marker} is not in the local Hugging "
            f"Face cache, so its files cannot be fingerprinted"
        )
    return Path(cached).parent


def clip_fingerprint(folder: Path) -> str:
    """The fingerprint of the files a CLIP folder loads: what a saved deprojector records of
    its base, to refuse another CLIP of the same width."""
    return fingerprint({"clip": (folder, loaded_files(folder))})["fingerprint"]
