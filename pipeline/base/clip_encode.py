"""Run the CLIP text model the way Stable Diffusion 1.x does, and read off what we store.

SD tokenises to 77 positions (padding with EOS) and calls the text model *without* an
attention mask, so padding positions hold real, prompt-dependent states that the UNet
sees. We encode exactly like that, so targets equal what the pipeline would compute.

Clip skip (`ClipText.clip_skip`, diffusers' count): 0 conditions on the last layer's states
after the final LayerNorm; k > 0 on the output of the k-th layer from the end, passed through
the same final LayerNorm, as diffusers' `StableDiffusionPipeline.encode_prompt(clip_skip=k)`
computes it (`hidden_states[-(k + 1)]`, then `text_model.final_layer_norm`; A1111 calls k = 1
"clip skip 2"). The pooled embedding is always the last layer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.base.loaders import ClipText
from pipeline.core.conventions import MAX_LENGTH


@dataclass
class Encoded:
    pooled: torch.Tensor  # [B, D] last hidden state at the EOS position
    hidden: torch.Tensor  # [B, 77, D] the states SD is conditioned on (clip skip applied)
    mask: torch.Tensor  # [B, 77] int8: 1 at BOS, real tokens and EOS
    n_tokens: torch.Tensor  # [B] int32, BOS and EOS included
    text_embeds: torch.Tensor  # [B, P] projection of pooled


def token_ids(clip: ClipText, texts: list[str]) -> list[list[int]]:
    """Token ids with BOS and EOS, untruncated, straight from the Rust tokenizer.

    Same ids as `clip.tokenizer(texts)`; transformers' per-text conversion of the results
    cost a tenth of a small model's extraction time.
    """
    return [e.ids for e in clip.raw_tokenizer.encode_batch(texts)]


def token_counts(clip: ClipText, texts: list[str]) -> list[int]:
    """Tokens of each text, BOS and EOS included, before truncation (CLIP keeps MAX_LENGTH)."""
    return [len(ids) for ids in token_ids(clip, texts)]


def tokenize(clip: ClipText, texts: list[str]) -> dict[str, torch.Tensor]:
    """As `tokenizer(texts, padding="max_length", max_length=77, truncation=True)`."""
    eos, pad = clip.tokenizer.eos_token_id, clip.tokenizer.pad_token_id
    input_ids = torch.full((len(texts), MAX_LENGTH), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), MAX_LENGTH), dtype=torch.long)
    for row, ids in enumerate(token_ids(clip, texts)):
        if len(ids) > MAX_LENGTH:
            ids = ids[: MAX_LENGTH - 1] + [eos]  # keep BOS and 75 tokens, end with EOS
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.inference_mode()
def encode_tokens(clip: ClipText, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
    device = clip.model.device
    input_ids = input_ids.to(device)
    text_model = clip.model.text_model
    out = text_model(input_ids=input_ids, output_hidden_states=clip.clip_skip > 0)
    pooled = out.pooler_output
    hidden = (
        text_model.final_layer_norm(out.hidden_states[-(clip.clip_skip + 1)])
        if clip.clip_skip
        else out.last_hidden_state
    )
    return Encoded(
        pooled=pooled,
        hidden=hidden,
        mask=attention_mask.to(torch.int8),
        n_tokens=attention_mask.sum(dim=1).to(torch.int32),
        text_embeds=clip.model.text_projection(pooled),
    )


def encode_texts(clip: ClipText, texts: list[str]) -> Encoded:
    tokens = tokenize(clip, texts)
    return encode_tokens(clip, tokens["input_ids"], tokens["attention_mask"])
