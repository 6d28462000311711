"""Prompt parsing and the conditioning built from it (docs/architectures.md)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from pipeline.base_models import MAX_LENGTH
from pipeline.clip_encode import encode_texts
from pipeline.models import build_deprojector
from pipeline.prompts import PromptError, conditioning, split_prompt, truncated_text


@pytest.fixture(scope="module")
def deprojector(clip, small_shards):
    """An untrained vicinity model: enough to check what goes into a deprojector."""
    constants = load_file(str(small_shards / "constants.safetensors"))
    return build_deprojector("vicinity-individual", clip.hidden_size, clip.projection_size,
                             constants).eval()


def test_split_prompt_strips_and_drops_empty_parts() -> None:
    assert split_prompt("cat, maid") == ["cat", "maid"]
    assert split_prompt("  1girl ,red hair,, ,blue eye,  ") == ["1girl", "red hair", "blue eye"]
    assert split_prompt("cat maid") == ["cat maid"]


@pytest.mark.parametrize("prompt", ["", "   ", ",", " , ,\t,\n"])
def test_prompt_without_text_is_an_error(prompt: str) -> None:
    with pytest.raises(PromptError, match="has no text"):
        split_prompt(prompt)
    assert issubclass(PromptError, ValueError)


def test_unicode_and_emoji() -> None:
    assert split_prompt("猫, メイド 🐱 ,  café") == ["猫", "メイド 🐱", "café"]


non_comma_text = st.text(st.characters(blacklist_characters=","), max_size=12)


@given(st.lists(non_comma_text.filter(str.strip), min_size=1, max_size=6),
       st.lists(st.sampled_from(["", " ", "  ", "\t", ", ", ",,"]), min_size=7, max_size=7))
def test_split_prompt_recovers_joined_parts(parts: list[str], padding: list[str]) -> None:
    # Any mix of extra whitespace and empty parts around the commas is ignored.
    prompt = padding[0] + ",".join(p + padding[k + 1] for k, p in enumerate(parts))
    assert split_prompt(prompt) == [p.strip() for p in parts]


@given(st.text(max_size=40))
def test_split_prompt_keeps_every_character_but_commas_and_edge_space(prompt: str) -> None:
    def squeeze(text: str) -> str:
        return "".join(text.split())

    try:
        parts = split_prompt(prompt)
    except PromptError:
        assert not squeeze(prompt.replace(",", ""))
        return
    for part in parts:
        assert part and part == part.strip() and "," not in part
    assert squeeze("".join(parts)) == squeeze(prompt.replace(",", ""))


def test_reference_is_the_ordinary_clip_state(clip) -> None:
    embeds, info = conditioning("cat, maid", clip, None)
    assert info.mode == "reference"
    assert torch.equal(embeds, encode_texts(clip, ["cat, maid"]).hidden)


def test_combine_adds_the_parts_relative_to_null(clip, deprojector) -> None:
    null = deprojector.null
    pooled = encode_texts(clip, ["cat", "maid"]).pooled
    embeds, info = conditioning(" cat ,maid,", clip, deprojector, combine=True)
    assert info.parts == ["cat", "maid"] and info.mode == "combined"
    expected = (pooled[0] - null) + (pooled[1] - null) + null
    torch.testing.assert_close(info.embeds[0], expected)
    assert torch.equal(embeds, deprojector.generate(info.embeds))
    assert embeds.shape == (1, MAX_LENGTH, clip.hidden_size)


def test_without_combine_the_whole_prompt_is_deprojected(clip, deprojector) -> None:
    _, info = conditioning("cat, maid", clip, deprojector, combine=False)
    assert info.mode == "whole"
    torch.testing.assert_close(info.embeds, encode_texts(clip, ["cat, maid"]).pooled)


def test_unicode_prompt_is_encoded(clip, deprojector) -> None:
    embeds, info = conditioning("猫, メイド 🐱", clip, deprojector)
    assert info.parts == ["猫", "メイド 🐱"]
    assert embeds.shape == (1, MAX_LENGTH, clip.hidden_size)
    assert torch.isfinite(embeds).all()


@pytest.mark.parametrize("use_deprojector", [False, True])
def test_over_long_part_is_truncated_with_a_warning(clip, deprojector,
                                                    use_deprojector: bool) -> None:
    long_part = " ".join(["red hair"] * 50) + " zebra"
    assert truncated_text(clip, "cat") == ""
    cut = truncated_text(clip, long_part)
    assert cut.endswith("zebra") and len(cut) < len(long_part)
    with pytest.warns(UserWarning, match="cut off: .*zebra"):
        embeds, info = conditioning(f"cat, {long_part}", clip,
                                    deprojector if use_deprojector else None)
    # With a deprojector only the long part is cut; the reference encodes the whole prompt.
    cut_text = long_part if use_deprojector else f"cat, {long_part}"
    assert info.cut == {cut_text: truncated_text(clip, cut_text)}
    assert embeds.shape == (1, MAX_LENGTH, clip.hidden_size)
