"""The prompt grammar: comma-separated parts, each with an optional weight.

    prompt := part ("," part)*        empty parts and the spaces around parts are dropped
    part   := text [":" weight]       weight: a decimal number (1.2, -0.5, .5, 2e-1); none = 1

A colon always starts a weight, so a part's text holds neither "," nor ":". A weight's size is
at most MAX_WEIGHT: the parts combine as Σ w_k (e_k − null) + null, and far beyond the offsets
seen in training a deprojector's LayerNorms overflow float32 (NaN from |w| ≈ 1e25 on).
pipeline/prompting/encoder.py turns parsed prompts into conditioning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.core.errors import DeprojectorError

MAX_WEIGHT = 100.0  # |weight| bound: 100 × a prompt's offset from null is far out already


class PromptError(DeprojectorError, ValueError):
    """A prompt that cannot be turned into conditioning (e.g. no text at all)."""


@dataclass(frozen=True)
class WeightedPart:
    text: str
    weight: float = 1.0
    explicit: bool = False  # the prompt wrote the weight out


WEIGHT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
NUMBER_CHARACTERS = set("0123456789+-.eE")


def checked_weight(value: float, where: str) -> float:
    """`value` if it is a usable weight, else a PromptError naming `where`."""
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise PromptError(
            f"{where}: the weight {value:g} is outside [-{MAX_WEIGHT:g}, "
            f"{MAX_WEIGHT:g}], the range in which a deprojector stays finite"
        )
    return value


def _weight(text: str, part: str, number: int, offset: int) -> float:
    """The weight `text` (after the colon at prompt index `offset` - 1) or a PromptError."""
    where = f"prompt part {number} {part.strip()!r}"
    stripped = text.strip()
    if not stripped:
        raise PromptError(
            f"{where}: ':' at character {offset} is followed by no weight "
            "(write e.g. 'red circle:1.2', or drop the ':')"
        )
    if WEIGHT_NUMBER.fullmatch(stripped):
        return checked_weight(float(stripped), where)
    start = offset + len(text) - len(text.lstrip())
    bad = next((i for i, c in enumerate(stripped) if c not in NUMBER_CHARACTERS), None)
    found = (
        f"character {start + bad + 1} {stripped[bad]!r} is not part of a number"
        if bad is not None
        else f"{stripped!r} is not a number"
    )
    raise PromptError(
        f"{where}: the weight after ':' must be a number such as 1.2 or -0.5; {found}"
    )


def parse_weighted(prompt: str) -> list[WeightedPart]:
    """The parts of `prompt` with their weights (the grammar above); errors name the part
    (1-based) and the character (1-based index in `prompt`)."""
    parts, begin = [], 0
    for number, raw in enumerate(prompt.split(","), start=1):
        text, colon, weight = raw.partition(":")
        if colon:
            value = _weight(weight, raw, number, begin + len(text) + 1)
            if not text.strip():
                raise PromptError(f"prompt part {number} {raw.strip()!r}: a weight without text")
            parts.append(WeightedPart(text.strip(), value, explicit=True))
        elif text.strip():
            parts.append(WeightedPart(text.strip()))
        begin += len(raw) + 1
    if not parts:
        raise PromptError(f"prompt {prompt!r} has no text (only commas and whitespace)")
    return parts
