"""The builtin base models load like real ones and have the CLIP properties the design uses."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.base_models import BaseModelError, build_builtin, load_clip, load_sd_pipeline
from pipeline.clip_encode import encode_texts
from pipeline.extract import compute_constants

PROMPTS = ["cat maid", "1girl red hair blue eye black skirt", "1boy 1girl in class room"]


def test_builtin_folders_load_through_from_pretrained(base_dir):
    tokenizer = CLIPTokenizer.from_pretrained(base_dir / "clip")
    model = CLIPTextModelWithProjection.from_pretrained(base_dir / "clip")
    assert model.config.max_position_embeddings == 77
    assert model.config.projection_dim == model.config.hidden_size  # square, as CLIP-L
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("cat maid")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # SD's text encoder folder holds a CLIPTextModel with the same weights.
    text_encoder = CLIPTextModel.from_pretrained(base_dir / "sd" / "text_encoder")
    a = text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
    assert torch.equal(a.final_layer_norm.weight, model.text_model.final_layer_norm.weight)
    pipe = load_sd_pipeline("builtin", base_dir=base_dir)
    assert pipe.unet.config.cross_attention_dim == model.config.hidden_size


def test_builtin_build_is_deterministic(tmp_path, base_dir):
    build_builtin(tmp_path, seed=0)
    for name in ("clip/model.safetensors", "clip/tokenizer.json",
                 "sd/unet/diffusion_pytorch_model.safetensors"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tmp_path, base_dir)]
        assert digest[0] == digest[1], name


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
    assert (recovered - out.pooled).abs().max() < 1e-4


def test_unreachable_hub_id_fails_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="`hf download .* --local-dir DIR`"):
        load_clip("no-such-org/no-such-clip")


def test_fast_tokenize_equals_the_transformers_tokenizer(clip):
    from pipeline.clip_encode import tokenize

    texts = PROMPTS + ["", "Ünïcode 🐱 text", "word " * 100, "  spaced   out  ", "a,b , c"]
    ours = tokenize(clip, texts)
    theirs = clip.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
