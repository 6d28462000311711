"""Prompts to Stable Diffusion conditioning: ordinary CLIP states or deprojected embeddings.

The reference is the CLIP last hidden state of the whole prompt; a deprojector turns one
pooled embedding into that sequence, either of the whole prompt or of the comma-separated
parts combined as Σ w_k (e_k − null) + null (docs/architectures.md).

Prompt grammar (combined parts):

    prompt := part ("," part)*        empty parts and the spaces around parts are dropped
    part   := text [":" weight]       weight: a decimal number (1.2, -0.5, .5, 2e-1); none = 1

A colon always starts a weight, so a part's text holds neither "," nor ":".
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from pipeline.base_models import MAX_LENGTH, ClipText
from pipeline.clip_encode import encode_texts, token_ids
from pipeline.conventions import combine_embeddings
from pipeline.errors import DeprojectorError
from pipeline.models import Deprojector


class PromptError(DeprojectorError, ValueError):
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


@dataclass(frozen=True)
class WeightedPart:
    text: str
    weight: float = 1.0
    explicit: bool = False  # the prompt wrote the weight out


WEIGHT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
NUMBER_CHARACTERS = set("0123456789+-.eE")


def _weight(text: str, part: str, number: int, offset: int) -> float:
    """The weight `text` (after the colon at prompt index `offset` - 1) or a PromptError."""
    where = f"prompt part {number} {part.strip()!r}"
    stripped = text.strip()
    if not stripped:
        raise PromptError(f"{where}: ':' at character {offset} is followed by no weight "
                          "(write e.g. 'red circle:1.2', or drop the ':')")
    if WEIGHT_NUMBER.fullmatch(stripped):
        return float(stripped)
    start = offset + len(text) - len(text.lstrip())
    bad = next((i for i, c in enumerate(stripped) if c not in NUMBER_CHARACTERS), None)
    found = f"character {start + bad + 1} {stripped[bad]!r} is not part of a number" \
        if bad is not None else f"{stripped!r} is not a number"
    raise PromptError(f"{where}: the weight after ':' must be a number such as 1.2 or -0.5; "
                      f"{found}")


def parse_weighted(prompt: str) -> list[WeightedPart]:
    """The parts of `prompt` with their weights (the grammar above); errors name the part
    (1-based) and the character (1-based index in `prompt`)."""
    parts, begin = [], 0
    for number, raw in enumerate(prompt.split(","), start=1):
        text, colon, weight = raw.partition(":")
        if colon:
            value = _weight(weight, raw, number, begin + len(text) + 1)
            if not text.strip():
                raise PromptError(f"prompt part {number} {raw.strip()!r}: a weight without "
                                  "text")
            parts.append(WeightedPart(text.strip(), value, explicit=True))
        elif text.strip():
            parts.append(WeightedPart(text.strip()))
        begin += len(raw) + 1
    if not parts:
        raise PromptError(f"prompt {prompt!r} has no text (only commas and whitespace)")
    return parts


def format_weighted(parts: list[WeightedPart]) -> str:
    """The prompt that `parse_weighted` reads back as `parts` (weights written exactly)."""
    return ", ".join(f"{p.text}:{p.weight!r}" if p.explicit else p.text for p in parts)


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


def weighted_embedding(parts: list[WeightedPart], clip: ClipText, null: torch.Tensor,
                       info: ConditioningInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts' pooled embeddings [K, D] and weights [K] (on null's device and dtype)."""
    pooled = _encode(clip, [p.text for p in parts], info)[0].to(null)
    return pooled, torch.tensor([p.weight for p in parts]).to(null)


def conditioning(
    prompt: str, clip: ClipText, deprojector: Deprojector | None, combine: bool = True
) -> tuple[torch.Tensor, ConditioningInfo]:
    """`prompt_embeds` [1, 77, D] for the UNet, and how they were made.

    deprojector None: the ordinary CLIP last hidden state of the whole prompt (the reference).
    combine: the comma-separated parts are encoded and Σ w_k (e_k − null) + null is
    deprojected; otherwise the pooled embedding of the whole prompt is deprojected.
    """
    parts = parse_weighted(prompt)  # also rejects prompts without text in every mode
    if deprojector is None or not combine:
        weighted = [p for p in parts if p.explicit]
        if weighted:
            raise PromptError(
                f"prompt {prompt!r}: the weight of {weighted[0].text!r} needs a deprojector "
                "combining the parts (weights scale e_k − null); the reference and the "
                "whole-prompt mode encode the text as it is")
    if deprojector is None:
        info = ConditioningInfo("reference", [prompt])
        return _encode(clip, [prompt], info)[1], info
    deprojector.check_base(clip.hidden_size, clip.projection_size)
    null = deprojector.null
    if combine:
        info = ConditioningInfo("combined", [p.text for p in parts])
        pooled, weights = weighted_embedding(parts, clip, null, info)
        embeds = combine_embeddings(pooled, null, weights)[None]
    else:
        info = ConditioningInfo("whole", [prompt])
        embeds = _encode(clip, [prompt], info)[0].to(null)
    info.embeds = embeds
    return deprojector.generate(embeds), info


def negative_conditioning(clip: ClipText) -> torch.Tensor:
    """CLIP states of the empty prompt: what the pipeline uses for negative_prompt=""."""
    return encode_texts(clip, [""]).hidden
