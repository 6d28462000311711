"""Checks that `base.clip` / `base.sd` are what the pipeline needs, and their fingerprint.

transformers and diffusers load several wrong folders without an error: a model folder with
no tokenizer files gives a 2-token tokenizer, a text encoder without `text_projection` gets
a random projection, a config whose `eos_token_id` misses the tokenizer's EOS pools position
0 for every prompt, and a UNet of another cross-attention width fails only deep inside
generation. The `base` stage runs every check here and records a fingerprint of the files it
loaded in models/base.json, so downstream stages rerun exactly when the weights change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.base.clip_encode import encode_texts
from pipeline.base.files import (
    CLIP_CHECKPOINT,
    BaseModelError,
    fingerprint,
    loaded_files,
    sd_files,
    source_folder,
)
from pipeline.base.loaders import ClipText, load_clip, load_sd_pipeline
from pipeline.world.config import WORLD_DIR

MIN_CLIP_VOCAB = 2 * 256 + 2  # the 256 bytes, the same with `</w>`, BOS and EOS
PROBE_PROMPTS = ("a red circle on a white background", "two dogs playing in the snow")


# --- checks of the loaded models ----------------------------------------------------------


def check_tokenizer(clip: ClipText, name: str) -> None:
    tokenizer, config = clip.tokenizer, clip.model.config
    if len(tokenizer) < MIN_CLIP_VOCAB:
        raise BaseModelError(
            f"base.clip: the tokenizer of {name!r} has {len(tokenizer)} tokens, not a CLIP BPE "
            f"vocabulary (at least {MIN_CLIP_VOCAB}: the 256 bytes, the same with </w>, "
            f"<|startoftext|> and <|endoftext|>); its tokenizer files are missing or broken"
        )
    if len(tokenizer) > config.vocab_size:
        raise BaseModelError(
            f"base.clip: the tokenizer of {name!r} has {len(tokenizer)} tokens but the text "
            f"model's embedding table only {config.vocab_size} (config.json vocab_size): "
            f"tokenizer and weights come from different checkpoints"
        )


def check_pooling(clip: ClipText, name: str) -> None:
    """pooled("") == hidden("")[1], pooled at EOS for real prompts, and prompts pool apart."""
    texts = ["", *PROBE_PROMPTS]
    out = encode_texts(clip, texts)
    eos = out.n_tokens.long() - 1
    at_eos = out.hidden[torch.arange(len(texts)), eos]
    same_for_all = torch.allclose(out.pooled[1], out.pooled[2], rtol=0, atol=1e-6)
    if same_for_all or not torch.allclose(out.pooled, at_eos, rtol=1e-4, atol=1e-4):
        config_eos = clip.model.config.eos_token_id
        tokenizer_eos = clip.tokenizer.eos_token_id
        symptom = (
            "two different prompts pool to the same vector"
            if same_for_all
            else 'pooled("") is not the last hidden state at position 1, the EOS of ""'
        )
        raise BaseModelError(
            f"base.clip: {name!r} does not pool at the end-of-text token ({symptom}): its "
            f"config.json has eos_token_id = {config_eos}, the tokenizer's <|endoftext|> is id "
            f'{tokenizer_eos}. Set "eos_token_id": {tokenizer_eos} (and bos_token_id / '
            f"pad_token_id to the tokenizer's) in the text config of {name!r}."
        )


def check_cross_attention(
    unet_width: int, clip_width: int, sd: str = "base.sd", clip: str = "base.clip"
) -> None:
    """The UNet cross-attends to conditioning of its own width: the CLIP's hidden size."""
    if unet_width != clip_width:
        raise BaseModelError(
            f"base.sd {sd!r} does not fit base.clip {clip!r}: its UNet cross-attends to "
            f"{unet_width}-wide conditioning (unet/config.json cross_attention_dim), but the CLIP "
            f"text model's hidden states are {clip_width} wide (hidden_size). Name the CLIP the "
            f"SD pipeline was trained with ({CLIP_CHECKPOINT}, 768 wide, for SD 1.x) or an SD "
            f"pipeline of this CLIP's width."
        )


# --- the whole check -----------------------------------------------------------------------


@dataclass
class BaseReport:
    clip: str
    sd: str
    hidden_size: int
    projection_size: int
    fingerprint: dict  # of every file both models load
    clip_fingerprint: dict  # of the CLIP's files alone

    def as_json(self) -> dict:
        """models/base.json: what the stages that draw or judge pictures depend on."""
        return {
            "clip": self.clip,
            "sd": self.sd,
            "hidden_size": self.hidden_size,
            "projection_size": self.projection_size,
            **self.fingerprint,
        }

    def clip_json(self) -> dict:
        """models/base-clip.json: what the stages that use the CLIP alone (captions, gap,
        extract, train) depend on, so a retrained UNet, VAE or judge does not rerun them."""
        return {
            "clip": self.clip,
            "hidden_size": self.hidden_size,
            "projection_size": self.projection_size,
            **self.clip_fingerprint,
        }


def check_base(clip_name: str, sd_name: str, base_dir: Path = WORLD_DIR) -> BaseReport:
    """Load base.clip and base.sd, run every check, fingerprint the files they came from."""
    clip = load_clip(clip_name, base_dir=base_dir)  # runs check_clip_folder
    check_tokenizer(clip, clip_name)
    check_pooling(clip, clip_name)
    pipe = load_sd_pipeline(sd_name, base_dir=base_dir)
    check_cross_attention(
        pipe.unet.config.cross_attention_dim, clip.hidden_size, sd_name, clip_name
    )
    clip_dir = source_folder(clip.model.name_or_path, "config.json")
    sd_dir = source_folder(pipe.name_or_path or sd_name, "model_index.json")
    clip_files = {"clip": (clip_dir, loaded_files(clip_dir))}
    prints = fingerprint({**clip_files, "sd": (sd_dir, sd_files(sd_dir))})
    return BaseReport(
        clip_name, sd_name, clip.hidden_size, clip.projection_size, prints, fingerprint(clip_files)
    )
