"""The builtin base models have the CLIP properties the design uses (loading: test_world.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.base.clip_encode import encode_texts
from pipeline.base.files import BaseModelError
from pipeline.base.loaders import load_clip
from pipeline.data.extraction import compute_constants

PROMPTS = ["cat maid", "1girl red hair blue eye black skirt", "1boy 1girl in class room"]


@pytest.mark.slow
def test_pooled_is_hidden_at_eos(clip):
    out = encode_texts(clip, PROMPTS + [""])
    eos = out.n_tokens.long() - 1
    torch.testing.assert_close(out.pooled, out.hidden[torch.arange(len(eos)), eos])


def test_sos_is_the_same_for_every_prompt_and_null_is_pooled_empty(clip):
    out = encode_texts(clip, PROMPTS + ["a completely different caption"])
    constants = compute_constants(clip)
    for row in out.hidden[:, 0]:
        torch.testing.assert_close(row, constants["sos"], rtol=0, atol=1e-5)
    empty = encode_texts(clip, [""])
    torch.testing.assert_close(constants["null"], empty.pooled[0])
    torch.testing.assert_close(constants["null"], empty.hidden[0, 1])  # EOS of "" at position 1


def test_deprojection_recovers_pooled(clip):
    out = encode_texts(clip, PROMPTS)
    deprojection = compute_constants(clip)["deprojection"]
    assert deprojection.shape == (clip.hidden_size, clip.projection_size)
    recovered = out.text_embeds @ deprojection.T
    # float32 rounding through a trained (less well-conditioned) projection: about 1e-4 of
    # values of size ~2; a wrong inverse would be off by O(1).
    torch.testing.assert_close(recovered, out.pooled, rtol=1e-3, atol=1e-3)


def test_unreachable_hub_id_fails_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="`hf download .* --local-dir DIR`"):
        load_clip("no-such-org/no-such-clip")


def test_fast_tokenize_equals_the_transformers_tokenizer(clip):
    from pipeline.base.clip_encode import tokenize

    texts = PROMPTS + ["", "Ünïcode 🐱 text", "word " * 100, "  spaced   out  ", "a,b , c"]
    ours = tokenize(clip, texts)
    theirs = clip.tokenizer(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])


def test_loading_a_base_clip_prints_no_weight_report(base_dir, capfd):
    """Reading a CLIPModel folder's towers one at a time is how a base CLIP is read: no
    transformers report of the other tower's UNEXPECTED weights, no progress bars; the
    caller's logging settings come back."""
    from transformers.utils import logging as transformers_logging

    from pipeline.base.vision import ImageTower

    transformers_logging.set_verbosity_warning()
    transformers_logging.enable_progress_bar()
    capfd.readouterr()
    load_clip("builtin", base_dir=base_dir)
    ImageTower.load("builtin", base_dir=base_dir)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in err + out and "UNEXPECTED" not in err + out
    assert "Loading weights" not in err
    assert transformers_logging.get_verbosity() == transformers_logging.WARNING
    assert transformers_logging.is_progress_bar_enabled()
