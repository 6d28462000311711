"""Base models: the CLIP text tower (with projection) and a Stable Diffusion 1.x pipeline.

`builtin` builds small, seeded stand-ins offline in the ordinary transformers/diffusers
folder layouts; everything downstream loads them through the same `from_pretrained` calls
that load `openai/clip-vit-large-patch14` and `stable-diffusion-v1-5/stable-diffusion-v1-5`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.builtin_captions import generate_captions

BUILTIN = "builtin"
BASE_DIR = Path("models/base")
MAX_LENGTH = 77  # CLIP's context: BOS + 75 tokens + EOS

# Sizes of the embedded default: small enough to train on a laptop CPU in minutes.
BUILTIN_CLIP = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, projection_dim=128)
BUILTIN_VOCAB_SIZE = 2048
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class BaseModelError(RuntimeError):
    """A base model could not be built or loaded; the message says what to do."""


def resolve(name: str, kind: str, base_dir: Path = BASE_DIR) -> str:
    """Map a `base.clip` / `base.sd` value to what `from_pretrained` receives."""
    return str(base_dir / kind) if name == BUILTIN else name


# --- the builtin tokenizer -------------------------------------------------------------

def _train_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with `</w>` word ends, normalised and pre-split exactly as CLIPTokenizer."""
    reference = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[]).backend_tokenizer
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = reference.normalizer or normalizers.Lowercase()
    bpe.pre_tokenizer = reference.pre_tokenizer or pre_tokenizers.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    # CLIP's layout: 256 bytes, the same with `</w>`, merges in order, then the specials,
    # so EOS has the highest id as in the real vocabulary.
    ordered = sorted(alphabet)
    tokens = ordered + [c + "</w>" for c in ordered]
    tokens += [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def _write_slow_tokenizer_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """vocab.json + merges.txt beside tokenizer.json, the files older transformers read."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    (folder / "vocab.json").write_text(json.dumps(state["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_builtin_tokenizer(seed: int) -> CLIPTokenizer:
    corpus = generate_captions(20_000, seed=seed + 1)
    vocab, merges = _train_bpe(corpus, BUILTIN_VOCAB_SIZE)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


# --- the builtin CLIP text model and SD pipeline ----------------------------------------

def build_builtin_clip(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        # A home-made vocabulary must name its special ids, or the model looks for EOS
        # at the highest id (legacy eos_token_id = 2).
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **BUILTIN_CLIP,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():
        table = model.text_model.embeddings.position_embedding.weight
        table.copy_(_smooth_positions(table.shape[0], table.shape[1], table.std().item()))
    return model


def _smooth_positions(positions: int, width: int, scale: float) -> torch.Tensor:
    """Position embeddings that change slowly along the sequence, as trained CLIP's do.

    Independent random rows would make each padding state unpredictable from its
    neighbours, which is not true of the real model and would defeat the vicinity models.
    """
    t = torch.arange(positions, dtype=torch.float32)[:, None] / positions
    frequencies = torch.rand(1, 8) * 3.0  # at most 3 periods over the context
    phases = torch.rand(1, 8) * 2 * torch.pi
    waves = torch.sin(2 * torch.pi * frequencies * t + phases)  # [positions, 8]
    table = waves @ torch.randn(8, width)
    return table * (scale / table.std())


def build_builtin_sd(clip_dir: Path, sd_dir: Path, seed: int) -> None:
    """A tiny SD 1.x pipeline whose text encoder is the builtin CLIP text tower."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    # SD's pipeline calls text_encoder(...)[0] for the hidden states: it must be a
    # CLIPTextModel, not the WithProjection class (same weights, other first output).
    text_encoder = CLIPTextModel.from_pretrained(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    hidden = text_encoder.config.hidden_size
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        steps_offset=1, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(sd_dir)


def build_builtin(base_dir: Path, seed: int) -> None:
    """Write models/base/clip (tokenizer + text model with projection) and models/base/sd."""
    clip_dir, sd_dir = base_dir / "clip", base_dir / "sd"
    tokenizer = build_builtin_tokenizer(seed)
    model = build_builtin_clip(tokenizer, seed)
    tokenizer.save_pretrained(clip_dir)
    _write_slow_tokenizer_files(tokenizer, clip_dir)
    model.save_pretrained(clip_dir)
    build_builtin_sd(clip_dir, sd_dir, seed)


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


def _from_pretrained(load, source: str, kind: str):
    """`load(source)`; offline, only from the local Hugging Face cache, failing fast."""
    offline = not Path(source).exists() and not _hub_reachable()
    try:
        return load(source, local_files_only=True) if offline else load(source)
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise BaseModelError(f"base.{kind}: cannot load the folder {source!r}: {err}") from err
        why = ("the Hugging Face Hub is not reachable (offline) and it is not in the local cache"
               if offline else f"could not be fetched from the Hugging Face Hub: {err}")
        raise BaseModelError(
            f"base.{kind}: {source!r} is not a local folder and {why}.\n"
            f"On a machine with network run `hf download {source} --local-dir DIR`, "
            f"then set base.{kind} to DIR in params.yaml (or use `builtin`)."
        ) from err


def _source(name: str, kind: str, base_dir: Path) -> str:
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
    """The CLIP tokenizer and text model with projection, as loaded for extraction."""

    tokenizer: CLIPTokenizer
    model: CLIPTextModelWithProjection

    def __post_init__(self) -> None:
        # A private copy of the Rust tokenizer without padding or truncation, for fast
        # batch encoding (pipeline.clip_encode.token_ids).
        self.raw_tokenizer = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self.raw_tokenizer.no_padding()
        self.raw_tokenizer.no_truncation()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def projection_size(self) -> int:
        return self.model.config.projection_dim


def load_tokenizer(name: str, base_dir: Path = BASE_DIR) -> CLIPTokenizer:
    from pipeline.base_checks import check_tokenizer_files

    source = _source(name, "clip", base_dir)
    if Path(source).is_dir():  # transformers would make a 2-token tokenizer of a bare folder
        check_tokenizer_files(Path(source), name)
    tokenizer = _from_pretrained(CLIPTokenizer.from_pretrained, source, "clip")
    tokenizer.model_max_length = min(tokenizer.model_max_length, MAX_LENGTH)
    return tokenizer


def load_clip(name: str, device: str = "cpu", base_dir: Path = BASE_DIR) -> ClipText:
    """Tokenizer + text model with projection; a folder without either fails, naming it."""
    from pipeline.base_checks import check_clip_folder, source_folder

    source = _source(name, "clip", base_dir)
    if Path(source).is_dir():
        check_clip_folder(Path(source), name)
    tokenizer = load_tokenizer(name, base_dir)
    model = _from_pretrained(CLIPTextModelWithProjection.from_pretrained, source, "clip")
    if not Path(source).is_dir():  # a hub id: check the snapshot it was loaded from
        check_clip_folder(source_folder(source, "config.json"), name)
    return ClipText(tokenizer, model.to(device).eval())


def load_sd_pipeline(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     base_dir: Path = BASE_DIR):
    """The diffusers StableDiffusionPipeline named by `base.sd` (safety checker off)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" would cut in

    def load(source: str, **kwargs):
        return StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, safety_checker=None, requires_safety_checker=False, **kwargs
        )

    pipe = _from_pretrained(load, _source(name, "sd", base_dir), "sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
