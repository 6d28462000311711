"""Checks that `base.clip` / `base.sd` are what the pipeline needs, and their fingerprint.

transformers and diffusers load several wrong folders without an error: a model folder with
no tokenizer files gives a 2-token tokenizer, a text encoder without `text_projection` gets
a random projection, a config whose `eos_token_id` misses the tokenizer's EOS pools position
0 for every prompt, and a UNet of another cross-attention width fails only deep inside
generation. The `base` stage runs every check here and records a fingerprint of the files it
loaded in models/base.json, so downstream stages rerun exactly when the weights change.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.base_models import BASE_DIR, BaseModelError, ClipText, load_clip, load_sd_pipeline
from pipeline.errors import read_json, safetensors_names

CLIP_CHECKPOINT = "openai/clip-vit-large-patch14"  # the CLIP SD 1.x's text encoder was cut from
MIN_CLIP_VOCAB = 2 * 256 + 2  # the 256 bytes, the same with `</w>`, BOS and EOS
# What from_pretrained reads by default (transformers, diffusers), safetensors first; each
# may be sharded with a NAME.index.json beside it.
WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors",
                "pytorch_model.bin", "diffusion_pytorch_model.bin")
SKIPPED_SD_PARTS = {"safety_checker"}  # loaded with safety_checker=None
PROBE_PROMPTS = ("a red circle on a white background", "two dogs playing in the snow")
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
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def check_json_files(folder: Path) -> None:
    """Every JSON file of the folder (config, tokenizer, index) parses: transformers' own
    error for a cut one names neither the file nor the cause."""
    for path in sorted(folder.glob("*.json")):
        read_json(path, BaseModelError, REDOWNLOAD, expect=object)


def check_tokenizer_files(folder: Path, name: str) -> None:
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
                    isinstance(v, str) for v in weight_map.values()):
                raise BaseModelError(f"{index}: expected a \"weight_map\" object of tensor name "
                                     f"to file name, found {type(weight_map).__name__}; "
                                     f"{REDOWNLOAD}")
            shards = [folder / shard for shard in sorted(set(weight_map.values()))]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if missing:
                raise BaseModelError(f"{index}: names {', '.join(missing)}, not in the folder; "
                                     f"{REDOWNLOAD}")
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
        try:
            names.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
            raise BaseModelError(f"{path}: incomplete or corrupt PyTorch checkpoint ({err}); "
                                 f"{REDOWNLOAD}") from err
    return names


def check_text_projection(folder: Path, name: str) -> None:
    files = weight_files(folder)
    if not files:
        raise BaseModelError(
            f"base.clip: the folder {str(folder)!r}{_named(folder, name)} has no weights "
            f"({', '.join(WEIGHT_NAMES[::2])} or their .index.json)")
    if not any(n.endswith("text_projection.weight") for n in weight_names(folder)):
        raise BaseModelError(
            f"base.clip: {name!r} has no text_projection weights (in "
            f"{', '.join(f.name for f in files)}), so transformers would initialise the "
            f"projection at random. It is a CLIP text encoder without projection, like Stable "
            f"Diffusion's text_encoder folder: set base.clip to the full CLIP checkpoint it was "
            f"cut from ({CLIP_CHECKPOINT} for SD 1.x, or a local copy of it)."
        )


def check_clip_folder(folder: Path, name: str) -> None:
    """The static checks, run before transformers gets a chance to load a wrong folder.

    The projection first: SD's text_encoder folder lacks tokenizer files too, and "no
    projection, use the CLIP it was cut from" is the advice that fixes both."""
    check_text_projection(folder, name)
    check_tokenizer_files(folder, name)


# --- checks of the loaded models ----------------------------------------------------------

def check_tokenizer(clip: ClipText, name: str) -> None:
    tokenizer, config = clip.tokenizer, clip.model.config
    if len(tokenizer) < MIN_CLIP_VOCAB:
        raise BaseModelError(
            f"base.clip: the tokenizer of {name!r} has {len(tokenizer)} tokens, not a CLIP BPE "
            f"vocabulary (at least {MIN_CLIP_VOCAB}: the 256 bytes, the same with </w>, "
            f"<|startoftext|> and <|endoftext|>); its tokenizer files are missing or broken")
    if len(tokenizer) > config.vocab_size:
        raise BaseModelError(
            f"base.clip: the tokenizer of {name!r} has {len(tokenizer)} tokens but the text "
            f"model's embedding table only {config.vocab_size} (config.json vocab_size): "
            f"tokenizer and weights come from different checkpoints")


def check_pooling(clip: ClipText, name: str) -> None:
    """pooled("") == hidden("")[1], pooled at EOS for real prompts, and prompts pool apart."""
    from pipeline.clip_encode import encode_texts

    texts = ["", *PROBE_PROMPTS]
    out = encode_texts(clip, texts)
    eos = out.n_tokens.long() - 1
    at_eos = out.hidden[torch.arange(len(texts)), eos]
    same_for_all = torch.allclose(out.pooled[1], out.pooled[2], rtol=0, atol=1e-6)
    if same_for_all or not torch.allclose(out.pooled, at_eos, rtol=1e-4, atol=1e-4):
        config_eos = clip.model.config.eos_token_id
        tokenizer_eos = clip.tokenizer.eos_token_id
        symptom = ("two different prompts pool to the same vector" if same_for_all else
                   'pooled("") is not the last hidden state at position 1, the EOS of ""')
        raise BaseModelError(
            f"base.clip: {name!r} does not pool at the end-of-text token ({symptom}): its "
            f"config.json has eos_token_id = {config_eos}, the tokenizer's <|endoftext|> is id "
            f"{tokenizer_eos}. Set \"eos_token_id\": {tokenizer_eos} (and bos_token_id / "
            f"pad_token_id to the tokenizer's) in the text config of {name!r}."
        )


def check_cross_attention(unet_width: int, clip_width: int, sd: str = "base.sd",
                          clip: str = "base.clip") -> None:
    """The UNet cross-attends to conditioning of its own width: the CLIP's hidden size."""
    if unet_width != clip_width:
        raise BaseModelError(
            f"base.sd {sd!r} does not fit base.clip {clip!r}: its UNet cross-attends to "
            f"{unet_width}-wide conditioning (unet/config.json cross_attention_dim), but the CLIP "
            f"text model's hidden states are {clip_width} wide (hidden_size). Name the CLIP the "
            f"SD pipeline was trained with ({CLIP_CHECKPOINT}, 768 wide, for SD 1.x) or an SD "
            f"pipeline of this CLIP's width."
        )


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
    parts = [k for k, v in read_json(index, BaseModelError, REDOWNLOAD).items()
             if isinstance(v, list) and v[0] is not None and k not in SKIPPED_SD_PARTS]
    return [index, *(f for part in sorted(parts) if (folder / part).is_dir()
                     for f in loaded_files(folder / part))]


def fingerprint(folders: dict[str, tuple[Path, list[Path]]]) -> dict:
    """{"fingerprint": sha256 over the relative paths and digests, "files": {path: digest}}."""
    files = {f"{key}/{path.relative_to(root).as_posix()}": file_digest(path)
             for key, (root, paths) in folders.items() for path in paths}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, "files": dict(sorted(files.items()))}


# --- where the files are, and the whole check -----------------------------------------------

def source_folder(source: str, marker: str) -> Path:
    """A local folder, or the Hugging Face cache snapshot a hub id was loaded from."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, marker)
    if not isinstance(cached, str):
        raise BaseModelError(f"{source!r}: loaded, but {marker} is not in the local Hugging "
                             f"Face cache, so its files cannot be fingerprinted")
    return Path(cached).parent


@dataclass
class BaseReport:
    clip: str
    sd: str
    hidden_size: int
    projection_size: int
    fingerprint: dict

    def as_json(self) -> dict:
        return {"clip": self.clip, "sd": self.sd, "hidden_size": self.hidden_size,
                "projection_size": self.projection_size, **self.fingerprint}


def check_base(clip_name: str, sd_name: str, base_dir: Path = BASE_DIR) -> BaseReport:
    """Load base.clip and base.sd, run every check, fingerprint the files they came from."""
    clip = load_clip(clip_name, base_dir=base_dir)  # runs check_clip_folder
    check_tokenizer(clip, clip_name)
    check_pooling(clip, clip_name)
    pipe = load_sd_pipeline(sd_name, base_dir=base_dir)
    check_cross_attention(pipe.unet.config.cross_attention_dim, clip.hidden_size,
                          sd_name, clip_name)
    clip_dir = source_folder(clip.model.name_or_path, "config.json")
    sd_dir = source_folder(pipe.name_or_path or sd_name, "model_index.json")
    prints = fingerprint({"clip": (clip_dir, loaded_files(clip_dir)),
                          "sd": (sd_dir, sd_files(sd_dir))})
    return BaseReport(clip_name, sd_name, clip.hidden_size, clip.projection_size, prints)


def check_deprojector_fits(model, clip: ClipText) -> None:
    """A deprojector trained on a base model of other widths fails, giving both widths."""
    try:
        model.check_base(clip.hidden_size, clip.projection_size)
    except ValueError as err:
        raise BaseModelError(f"{err}; retrain it or set base.clip to its base model") from err
