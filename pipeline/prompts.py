"""Prompts to Stable Diffusion conditioning: ordinary CLIP states or deprojected embeddings.

The reference is the CLIP last hidden state of the whole prompt; a deprojector turns one
pooled embedding into that sequence, either of the whole prompt or of the comma-separated
parts combined as Σ(e_k − null) + null (docs/architectures.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from pipeline.base_models import MAX_LENGTH, ClipText
from pipeline.clip_encode import encode_texts, token_ids
from pipeline.conventions import combine_embeddings
from pipeline.models import Deprojector


class PromptError(ValueError):
    """A prompt that cannot be turned into conditioning (e.g. no text at all)."""


@dataclass
class ConditioningInfo:
    mode: str  # "reference", "whole" (whole prompt deprojected) or "combined" (parts)
    parts: list[str]  # the texts that were encoded
    cut: dict[str, str] = field(default_factory=dict)  # text -> the words truncation dropped
    embeds: torch.Tensor | None = None  # [1, D] what the deprojector received


def split_prompt(prompt: str) -> list[str]:
    """The comma-separated parts of `prompt`, stripped, empty parts dropped."""
    parts = [part.strip() for part in prompt.split(",")]
    parts = [part for part in parts if part]
    if not parts:
        raise PromptError(f"prompt {prompt!r} has no text (only commas and whitespace)")
    return parts


def truncated_text(clip: ClipText, text: str) -> str:
    """The words of `text` beyond CLIP's 75-token limit ("" if it fits)."""
    ids = token_ids(clip, [text])[0]
    if len(ids) <= MAX_LENGTH:
        return ""
    # ids = BOS, tokens..., EOS; the encoder keeps BOS, 75 tokens and puts EOS last.
    return clip.tokenizer.decode(ids[MAX_LENGTH - 1 : -1], skip_special_tokens=True).strip()


def _encode(clip: ClipText, texts: list[str],
            info: ConditioningInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled [N, D] and hidden [N, 77, D] states of `texts`, noting what truncation cut."""
    for text in texts:
        cut = truncated_text(clip, text)
        if cut:
            info.cut[text] = cut
            warnings.warn(
                f"prompt part {text[:60]!r} is longer than CLIP's {MAX_LENGTH - 2} tokens; "
                f"cut off: {cut!r}",
                stacklevel=3,
            )
    # One text per call: the pipeline encodes a prompt alone, and a batch can round differently.
    encoded = [encode_texts(clip, [text]) for text in texts]
    return torch.cat([e.pooled for e in encoded]), torch.cat([e.hidden for e in encoded])


def conditioning(
    prompt: str, clip: ClipText, deprojector: Deprojector | None, combine: bool = True
) -> tuple[torch.Tensor, ConditioningInfo]:
    """`prompt_embeds` [1, 77, D] for the UNet, and how they were made.

    deprojector None: the ordinary CLIP last hidden state of the whole prompt (the reference).
    combine: the comma-separated parts are encoded and Σ(e_k − null) + null is deprojected;
    otherwise the pooled embedding of the whole prompt is deprojected.
    """
    parts = split_prompt(prompt)  # also rejects prompts without text in every mode
    if deprojector is None:
        info = ConditioningInfo("reference", [prompt])
        return _encode(clip, [prompt], info)[1], info
    deprojector.check_base(clip.hidden_size, clip.projection_size)
    null = deprojector.null
    if combine:
        info = ConditioningInfo("combined", parts)
        pooled = _encode(clip, parts, info)[0].to(null)
        embeds = combine_embeddings(pooled, null)[None]
    else:
        info = ConditioningInfo("whole", [prompt])
        embeds = _encode(clip, [prompt], info)[0].to(null)
    info.embeds = embeds
    return deprojector.generate(embeds), info


def negative_conditioning(clip: ClipText) -> torch.Tensor:
    """CLIP states of the empty prompt: what the pipeline uses for negative_prompt=""."""
    return encode_texts(clip, [""]).hidden
