r"""The prompt grammar: comma-separated parts, each with an optional weight.

    prompt := part ("," part)*        empty parts and the spaces around parts are dropped
    part   := text [":" weight]       weight: a decimal number (1.2, -0.5, .5, 2e-1); none = 1

A colon always starts a weight, so a part's text holds neither "," nor ":". A weight's size is
at most MAX_WEIGHT: the parts combine as Σ w_k (e_k − null) + null, and far beyond the offsets
seen in training a deprojector's LayerNorms overflow float32 (NaN from |w| ≈ 1e25 on).
pipeline/prompting/encoder.py turns parsed prompts into conditioning.

The weight syntax of other tools, where it wraps a whole part, is the same request, "this
part, w times as much", and becomes that part's weight (factors multiply, nesting included):

    A1111 (stable-diffusion-webui wiki, Features, "Attention/emphasis"; its
    modules/prompt_parser.py `parse_prompt_attention`): (text:1.2) x1.2, (text) x1.1,
    [text] /1.1; \( \) \[ \] are literal brackets.
    compel (doc/syntax.md, "Weighting"): text+ x1.1, text++ x1.1^2, text- x0.9, text-- x0.9^2,
    (text)1.3 x1.3, (text)++ x1.1^2.

Those tools weight single tokens inside a prompt ("a (red) circle"); a deprojector weights
whole parts, so emphasis inside a part, or spanning a comma, is an error that shows how to
write it here. A1111's AND (composable diffusion: separate prompts whose noise predictions are
summed) and BREAK (a new 75-token chunk) have no counterpart and are refused, as is a weight
after a number alone ("16:9" would be the part "16" weighted 9).
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

A1111_UP = 1.1  # (text); [text] divides by it
COMPEL_UP, COMPEL_DOWN = 1.1, 0.9  # each trailing + / -
BRACKETS = {"(": ")", "[": "]"}
KEYWORDS = {
    "AND": "A1111's AND (composable diffusion) sums the noise predictions of separate "
    "prompts; here the comma parts combine their embeddings: write 'a cat, a dog' (with "
    "weights: 'a cat:1.2, a dog:0.8')",
    "BREAK": "A1111's BREAK starts a new 75-token chunk; a deprojector makes one 77-position "
    "conditioning from the parts: separate them with commas",
}
KEYWORD = re.compile(r"\b(AND|BREAK)\b")
SUFFIX = re.compile(r"(\++|-+)$")  # compel's trailing + / - on a whole part
INNER_SUFFIX = re.compile(r"\S*[^\s+-](\++|-+)(?=\s|$)")  # on one word inside a part


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


def _unescaped(text: str, index: int) -> bool:
    """Is text[index] not escaped by an odd number of backslashes?"""
    j = index - 1
    while j >= 0 and text[j] == "\\":
        j -= 1
    return (index - 1 - j) % 2 == 0


def _closing(text: str) -> int | None:
    """Index of the bracket closing text[0] (an opening bracket), None if unclosed."""
    depth = []
    for i, c in enumerate(text):
        if not _unescaped(text, i):
            continue
        if c in BRACKETS:
            depth.append(BRACKETS[c])
        elif c in BRACKETS.values():
            if not depth or depth.pop() != c:
                return None
            if not depth:
                return i
    return None


def _peel(text: str, where: str) -> tuple[str, float]:
    """`text` without the A1111 / compel emphasis wrapping it whole, and its factor."""
    factor = 1.0
    while True:
        suffix = SUFFIX.search(text)
        if suffix and text[: suffix.start()].strip():
            marks = suffix.group(1)
            factor *= (COMPEL_UP if marks[0] == "+" else COMPEL_DOWN) ** len(marks)
            text = text[: suffix.start()].rstrip()
            if text[0] == "(" and _closing(text) == len(text) - 1:  # compel's (words)++
                text = text[1:-1].strip()
            continue
        if not text or text[0] not in BRACKETS:
            return text, factor
        end = _closing(text)
        if end is None:
            raise PromptError(
                f"{where}: the bracket {text[0]!r} is not closed within the part (parts end at "
                f"commas; to weight several parts give each its own weight: 'red circle:1.2, "
                f"blue square:1.2'; a literal bracket is written \\{text[0]})"
            )
        inner, rest = text[1:end], text[end + 1 :].strip()
        if rest and WEIGHT_NUMBER.fullmatch(rest) and text[0] == "(":  # compel: (text)1.3
            factor *= float(rest)
        elif rest:
            return text, factor  # "(a) b": emphasis inside the part, refused by the caller
        elif text[0] == "[":
            factor /= A1111_UP
        else:
            head, colon, weight = inner.rpartition(":")
            if colon and WEIGHT_NUMBER.fullmatch(weight.strip()):  # A1111: (text:1.2)
                factor *= float(weight)
                inner = head
            else:
                factor *= A1111_UP
        text = inner.strip()


def _refuse_inner_emphasis(text: str, where: str) -> None:
    """Emphasis left inside a part's text weights single words, which a deprojector cannot."""
    inner = next((i for i, c in enumerate(text) if c in "()[]" and _unescaped(text, i)), None)
    word = INNER_SUFFIX.search(text)
    if inner is not None:
        found = repr(text[inner])
    elif word is not None:
        found = repr(word.group(0).strip())
    else:
        return
    raise PromptError(
        f"{where}: {found} weights words inside a part (A1111 / compel emphasis); here weights "
        "apply to whole comma-separated parts: make the words a part of their own and weight "
        "it, e.g. 'a (red) circle' -> 'a circle, red:1.1' or '(red circle:1.2)' -> 'red "
        "circle:1.2' (a literal bracket is written \\( )"
    )


def _part(raw: str, number: int, begin: int) -> WeightedPart | None:
    """One comma-separated part (`begin`: the index of raw in the prompt), or None if empty."""
    where = f"prompt part {number} {raw.strip()!r}"
    text, factor = _peel(raw.strip(), where)
    body, colon, weight = text.partition(":")
    value = 1.0
    if colon:
        value = _weight(weight, raw, number, begin + raw.index(text) + len(body) + 1)
        if not body.strip():
            raise PromptError(f"{where}: a weight without text")
        if WEIGHT_NUMBER.fullmatch(body.strip()):
            raise PromptError(
                f"{where}: a colon always starts a weight, so this is the number "
                f"{body.strip()!r} weighted {weight.strip()}; for a ratio or a time write it "
                f"without ':' (e.g. '{body.strip()}x{weight.strip()}' or '{body.strip()} by "
                f"{weight.strip()}')"
            )
        body, more = _peel(body, where)  # "(red circle)++:1.2"
        factor *= more
    if not body.strip():
        return None
    _refuse_inner_emphasis(body, where)
    for c in "()[]":
        body = body.replace("\\" + c, c)
    explicit = bool(colon) or factor != 1.0
    return WeightedPart(body.strip(), checked_weight(value * factor, where), explicit)


def parse_weighted(prompt: str) -> list[WeightedPart]:
    """The parts of `prompt` with their weights (the grammar above); errors name the part
    (1-based) and the character (1-based index in `prompt`), and for another tool's syntax
    how to write it here."""
    keyword = KEYWORD.search(prompt)
    if keyword:
        raise PromptError(
            f"prompt {prompt[:60]!r}: {keyword.group(1)} at character {keyword.start() + 1}: "
            f"{KEYWORDS[keyword.group(1)]}"
        )
    parts, begin = [], 0
    for number, raw in enumerate(prompt.split(","), start=1):
        part = _part(raw, number, begin)
        if part is not None:
            parts.append(part)
        begin += len(raw) + 1
    if not parts:
        raise PromptError(f"prompt {prompt!r} has no text (only commas and whitespace)")
    return parts
