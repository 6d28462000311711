"""Base models: the CLIP text tower (with projection) and a Stable Diffusion 1.x pipeline.

`builtin` names the embedded world trained offline by the `world` stage (pipeline/world/) in
the ordinary transformers/diffusers folder layouts of models/world/; everything downstream
loads it through the same `from_pretrained` calls that load `openai/clip-vit-large-patch14`
and `stable-diffusion-v1-5/stable-diffusion-v1-5`.
"""

from __future__ import annotations

import pickle
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from pipeline.base.files import (
    BaseModelError,
    check_clip_folder,
    check_sd_folder,
    check_tokenizer_files,
    clip_fingerprint,
    source_folder,
)
from pipeline.core.conventions import BUILTIN, MAX_LENGTH
from pipeline.world.config import WORLD_DIR, locate


def resolve(name: str, kind: str, base_dir: Path = WORLD_DIR) -> str:
    """Map a `base.clip` / `base.sd` value to what `from_pretrained` receives."""
    return str(locate(base_dir) / kind) if name == BUILTIN else name


# --- loading ---------------------------------------------------------------------------


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One quick connection attempt; the hub client's own retries take minutes offline."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' weight-loading report and progress bar off while a base model loads.

    Reading one tower of a CLIPModel folder (the text tower for prompts, the vision tower for
    images) makes transformers list every weight of the other tower as UNEXPECTED (49 lines
    for the world's CLIP), although that is how a base CLIP is read; what must be there is
    checked by pipeline.base.files / checks. Errors still raise and error-level messages still
    print; the caller's verbosity and progress-bar setting are restored (transformers' logging
    API: set_verbosity, disable_progress_bar)."""
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def load_or_explain(load, source: str, kind: str):
    """`load(source)`; offline, only from the local Hugging Face cache, failing fast; without
    transformers' loading report (quiet_loading)."""
    offline = not Path(source).exists() and not _hub_reachable()
    try:
        with quiet_loading():
            return load(source, local_files_only=True) if offline else load(source)
    except pickle.UnpicklingError as err:  # torch's weights_only refusal, in a hub snapshot
        raise BaseModelError(
            f"base.{kind}: {source!r} holds a weight file only pickle could load, and "
            f"unpickling can run code; refused, nothing in it ran. Use its .safetensors "
            f"weights"
        ) from err
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise BaseModelError(f"base.{kind}: cannot load the folder {source!r}: {err}") from err
        why = (
            "the Hugging Face Hub is not reachable (offline) and it is not in the local cache"
            if offline
            else f"could not be fetched from the Hugging Face Hub: {err}"
        )
        raise BaseModelError(
            f"base.{kind}: {source!r} is not a local folder and {why}.\n"
            f"On a machine with network run `hf download {shlex.quote(source)} --local-dir "
            f"DIR`, "
            f"then set base.{kind} to DIR in params.yaml (or use `builtin`)."
        ) from err


def base_source(name: str, kind: str, base_dir: Path = WORLD_DIR) -> str:
    """What `from_pretrained` gets for base.KIND; the builtin folders must have been built."""
    source = resolve(name, kind, base_dir)
    if name == BUILTIN and not Path(source).is_dir():
        raise BaseModelError(
            f"base.{kind}: builtin: {source} does not exist yet. The builtin base models are "
            f"built by the world stage: run `deprojector world` (or `dvc repro world`) first."
        )
    return source


@dataclass
class ClipText:
    """The CLIP tokenizer and text model with projection, as loaded for extraction.

    clip_skip: which layer's states condition SD (pipeline.base.clip_encode; diffusers'
    count: 0 the last layer, 1 the penultimate; at most the text model's layers - 1).
    Raises BaseModelError for a clip_skip the model does not have."""

    tokenizer: CLIPTokenizer
    model: CLIPTextModelWithProjection
    clip_skip: int = 0

    def __post_init__(self) -> None:
        layers = self.model.config.num_hidden_layers
        if isinstance(self.clip_skip, bool) or not 0 <= self.clip_skip < layers:
            raise BaseModelError(
                f"clip_skip must be an integer in [0, {layers - 1}] for this CLIP "
                f"({layers} layers; 0 = the last layer, 1 = the penultimate), "
                f"got {self.clip_skip!r}"
            )
        # A private copy of the Rust tokenizer without padding or truncation, for fast
        # batch encoding (pipeline.base.clip_encode.token_ids).
        self.raw_tokenizer = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self.raw_tokenizer.no_padding()
        self.raw_tokenizer.no_truncation()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def projection_size(self) -> int:
        return self.model.config.projection_dim

    @cached_property
    def fingerprint(self) -> str:
        """Of the files this CLIP loaded (pipeline.base.files.clip_fingerprint)."""
        return clip_fingerprint(source_folder(self.model.name_or_path, "config.json"))


def load_tokenizer(name: str, base_dir: Path = WORLD_DIR) -> CLIPTokenizer:
    source = base_source(name, "clip", base_dir)
    if Path(source).is_dir():  # transformers would make a 2-token tokenizer of a bare folder
        check_tokenizer_files(Path(source), name)
    tokenizer = load_or_explain(CLIPTokenizer.from_pretrained, source, "clip")
    tokenizer.model_max_length = min(tokenizer.model_max_length, MAX_LENGTH)
    return tokenizer


def load_clip(
    name: str, device: str = "cpu", base_dir: Path = WORLD_DIR, clip_skip: int = 0
) -> ClipText:
    """Tokenizer + text model with projection; a folder without either fails, naming it.
    clip_skip: the layer whose states it encodes (ClipText)."""
    source = base_source(name, "clip", base_dir)
    if Path(source).is_dir():
        check_clip_folder(Path(source), name)
    tokenizer = load_tokenizer(name, base_dir)
    model = load_or_explain(CLIPTextModelWithProjection.from_pretrained, source, "clip")
    if not Path(source).is_dir():  # a hub id: check the snapshot it was loaded from
        check_clip_folder(source_folder(source, "config.json"), name)
    return ClipText(tokenizer, model.to(device).eval(), clip_skip)


def load_sd_pipeline(
    name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, base_dir: Path = WORLD_DIR
):
    """The diffusers StableDiffusionPipeline named by `base.sd` (safety checker off)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" would cut in

    def load(source: str, **kwargs):
        return StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False, **kwargs
        )

    source = base_source(name, "sd", base_dir)
    if Path(source).is_dir():
        check_sd_folder(Path(source))
    pipe = load_or_explain(load, source, "sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
