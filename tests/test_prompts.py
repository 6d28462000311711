"""Prompt parsing and the conditioning `PromptEncoder` builds from it (docs/architectures.md)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from pipeline.base.clip_encode import encode_texts
from pipeline.core.conventions import MAX_LENGTH
from pipeline.models import build_deprojector
from pipeline.prompting.encoder import PromptEncoder, truncated_text, unknown_words
from pipeline.prompting.grammar import KEYWORD, PromptError, parse_weighted


@pytest.fixture(scope="module")
def deprojector(clip, small_shards):
    """An untrained vicinity model: enough to check what goes into a deprojector."""
    constants = load_file(str(small_shards / "constants.safetensors"))
    return build_deprojector(
        "vicinity-individual", clip.hidden_size, clip.projection_size, constants
    ).eval()


@pytest.fixture(scope="module")
def encoder(clip, deprojector) -> PromptEncoder:
    return PromptEncoder(clip, deprojector)


def texts(prompt: str) -> list[str]:
    return [part.text for part in parse_weighted(prompt)]


def test_parts_are_stripped_and_empty_parts_dropped() -> None:
    assert texts("cat, maid") == ["cat", "maid"]
    assert texts("  1girl ,red hair,, ,blue eye,  ") == ["1girl", "red hair", "blue eye"]
    assert texts("cat maid") == ["cat maid"]


@pytest.mark.parametrize("prompt", ["", "   ", ",", " , ,\t,\n"])
def test_prompt_without_text_is_an_error(prompt: str) -> None:
    with pytest.raises(PromptError, match="has no text"):
        parse_weighted(prompt)
    assert issubclass(PromptError, ValueError)


def test_unicode_and_emoji() -> None:
    assert texts("猫, メイド 🐱 ,  café") == ["猫", "メイド 🐱", "café"]


def no_keyword(text: str) -> bool:
    """Another tool's keywords (AND, BREAK) are refused with their own message, tested in
    test_what_a_deprojector_cannot_mean_is_refused_with_how_to_write_it."""
    return not KEYWORD.search(text)


# Without the characters of weights and of other tools' emphasis (tested below).
plain_text = st.text(st.characters(blacklist_characters=",:()[]+-\\"), max_size=12).filter(
    no_keyword
)


@given(
    st.lists(plain_text.filter(str.strip), min_size=1, max_size=6),
    st.lists(st.sampled_from(["", " ", "  ", "\t", ", ", ",,"]), min_size=7, max_size=7),
)
def test_parts_are_recovered_from_joined_text(parts: list[str], padding: list[str]) -> None:
    # Any mix of extra whitespace and empty parts around the commas is ignored.
    prompt = padding[0] + ",".join(p + padding[k + 1] for k, p in enumerate(parts))
    assert texts(prompt) == [p.strip() for p in parts]


@given(st.text(st.characters(blacklist_characters=":()[]+-\\"), max_size=40).filter(no_keyword))
def test_parsing_keeps_every_character_but_commas_and_edge_space(prompt: str) -> None:
    def squeeze(text: str) -> str:
        return "".join(text.split())

    try:
        parts = texts(prompt)
    except PromptError:
        assert not squeeze(prompt.replace(",", ""))
        return
    for part in parts:
        assert part and part == part.strip() and "," not in part
    assert squeeze("".join(parts)) == squeeze(prompt.replace(",", ""))


# --- the syntax of other tools (A1111's wiki "Attention/emphasis", compel's doc/syntax.md) ---


def weights(prompt: str) -> list[tuple[str, float]]:
    return [(part.text, round(part.weight, 6)) for part in parse_weighted(prompt)]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # A1111: (text:w) is w, (text) 1.1, [text] 1/1.1, nesting multiplies.
        ("(red circle:1.2), blue square", [("red circle", 1.2), ("blue square", 1.0)]),
        ("(red circle)", [("red circle", 1.1)]),
        ("((red circle))", [("red circle", 1.21)]),
        ("[red circle]", [("red circle", round(1 / 1.1, 6))]),
        ("((red circle:1.5))", [("red circle", 1.65)]),
        ("(red circle:-0.5)", [("red circle", -0.5)]),
        # compel: + is 1.1, - is 0.9 per sign; (words)w and (words)++ group without 1.1.
        ("red circle++", [("red circle", 1.21)]),
        ("red circle--", [("red circle", 0.81)]),
        ("(red circle)1.3", [("red circle", 1.3)]),
        ("(red circle)+++", [("red circle", 1.331)]),
        ("(red circle+)++", [("red circle", 1.331)]),
        # with this project's weight, which multiplies
        ("(red circle):2", [("red circle", 2.2)]),
        # A1111's escapes are literal brackets
        (r"\(red\) circle", [("(red) circle", 1.0)]),
    ],
)
def test_whole_part_emphasis_of_a1111_and_compel_becomes_the_part_weight(
    prompt: str, expected: list[tuple[str, float]]
) -> None:
    assert weights(prompt) == expected
    assert all(part.explicit for part in parse_weighted(prompt) if part.weight != 1.0)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a (red) circle", r"'\(' weights words inside a part .* 'a circle, red:1.1'"),
        ("a [red] circle", r"'\[' weights words inside a part"),
        ("a cat++ playing", r"'cat\+\+' weights words inside a part"),
        ("(red circle, blue square:1.2)", r"'\(' is not closed within the part .* own weight"),
        ("(red circle", r"not closed within the part"),
        ("a cat AND a dog:0.5", r"AND at character 7: A1111's AND .* 'a cat, a dog'"),
        ("a cat BREAK a dog", r"BREAK at character 7: .* separate them with commas"),
        ("cat, 16:9", r"part 2 '16:9': .* the number '16' weighted 9; .* '16x9'"),
        ("10:30", r"the number '10' weighted 30"),
        ("(red circle:1e300)", r"outside \[-100, 100\]"),
        ("red circle" + "+" * 60, r"outside \[-100, 100\]"),
    ],
)
def test_what_a_deprojector_cannot_mean_is_refused_with_how_to_write_it(
    prompt: str, message: str
) -> None:
    with pytest.raises(PromptError, match=message):
        parse_weighted(prompt)


def test_lowercase_and_and_break_are_words() -> None:
    assert texts("cats and dogs, break dance") == ["cats and dogs", "break dance"]


def test_words_the_base_clip_does_not_know_are_reported(clip, encoder) -> None:
    assert unknown_words(clip, "red circle, blue square 16") == {}
    assert unknown_words(clip, "red xyzzyqwv circle")["xyzzyqwv"] > 2
    with pytest.warns(UserWarning, match=r"does not know 'xyzzyqwv' \(\d+ tokens\)"):
        encoder.encode_prompt("red circle, xyzzyqwv square")
    assert list(encoder.unknown["xyzzyqwv square"]) == ["xyzzyqwv"]
    with pytest.warns(UserWarning, match="does not know 'xyzzyqwv'"):
        PromptEncoder(clip).encode_prompt("xyzzyqwv", deproject=False)


def test_reference_is_the_ordinary_clip_state(clip) -> None:
    embeds = PromptEncoder(clip).encode_prompt("cat, maid", deproject=False)
    assert torch.equal(embeds, encode_texts(clip, ["cat, maid"]).hidden)


def test_combine_adds_the_parts_relative_to_null(clip, deprojector, encoder) -> None:
    null = deprojector.null
    pooled = encode_texts(clip, ["cat", "maid"]).pooled
    embedding = encoder.embedding(" cat ,maid,")
    expected = (pooled[0] - null) + (pooled[1] - null) + null
    torch.testing.assert_close(embedding[0], expected)
    embeds = encoder.encode_prompt(" cat ,maid,")
    assert torch.equal(embeds, deprojector.generate(embedding))
    assert embeds.shape == (1, MAX_LENGTH, clip.hidden_size)


def test_without_combine_the_whole_prompt_is_deprojected(clip, encoder) -> None:
    torch.testing.assert_close(
        encoder.embedding("cat, maid", combine=False), encode_texts(clip, ["cat, maid"]).pooled
    )


def test_weights_need_the_combined_mode(clip, encoder) -> None:
    for call in (
        lambda: encoder.encode_prompt("cat:2", combine=False),
        lambda: encoder.encode_prompt("cat:2", deproject=False),
    ):
        with pytest.raises(PromptError, match="the weight of 'cat' needs a deprojector"):
            call()


def test_the_reference_encoder_has_no_deprojector(clip) -> None:
    with pytest.raises(PromptError, match="no deprojector"):
        PromptEncoder(clip).encode_prompt("cat")


def test_unicode_prompt_is_encoded(clip, encoder) -> None:
    embeds = encoder.encode_prompt("猫, メイド 🐱")
    assert embeds.shape == (1, MAX_LENGTH, clip.hidden_size)
    assert torch.isfinite(embeds).all()


@pytest.mark.parametrize("deproject", [False, True])
def test_over_long_part_is_truncated_with_a_warning(clip, deprojector, deproject: bool) -> None:
    long_part = " ".join(["red hair"] * 50) + " zebra"
    assert truncated_text(clip, "cat") == ""
    cut = truncated_text(clip, long_part)
    assert cut.endswith("zebra") and len(cut) < len(long_part)
    encoder = PromptEncoder(clip, deprojector)
    with pytest.warns(UserWarning, match="cut off: .*zebra"):
        embeds = encoder.encode_prompt(f"cat, {long_part}", deproject=deproject)
    # With a deprojector only the long part is cut; the reference encodes the whole prompt.
    cut_text = long_part if deproject else f"cat, {long_part}"
    assert encoder.cut == {cut_text: truncated_text(clip, cut_text)}
    assert embeds.shape == (1, MAX_LENGTH, clip.hidden_size)
