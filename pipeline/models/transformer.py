"""Transformer deprojector: one pre-LN transformer block and a final LayerNorm.

76 slots: slot 0 holds x_0 = e - null, slot j (1..75) holds x_j = s_j - null; output slot j
predicts s_{j+1}. With the original's choices (the defaults, docs/architectures.md):

    a = LN1(x + pos)                      position embedding only on the attention's input
    h = x + out_proj(causal_attn(q(a), k(a), v(a)))
    h = h + fc2(act(fc1(LN2(h))))
    s = LN_final(h)

`position: residual` adds pos to x itself (h = x + pos + ...), the earlier rewrite's choice.
The block has the shape of a CLIP encoder layer and starts from the CLIP text model's last
layer and final LayerNorm (`init_from_base`); `freeze` keeps q, k, v (the original) or also
out_proj frozen.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import (
    ACTIVATIONS,
    ClipTextModel,
    Deprojector,
    DeprojectorConfig,
    Linear,
    few_rows_linear,
    register,
)
from pipeline.models.clip_layers import (
    check_clip_layer_config,
    check_clip_shape,
    clip_shape,
    copy_module,
    split_heads,
)

FREEZE = {
    "none": (),
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
POSITIONS = ("attention_input", "residual")


@dataclass
class TransformerConfig(DeprojectorConfig):
    # Defaults are CLIP ViT-L/14's; trained from a base model they come from its config.
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    freeze: str = "qkv"  # the original froze q, k, v and trained out_proj
    position: str = "attention_input"  # where the position embedding is added
    position_init_std: float = 1.0  # the original started it as N(0, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_clip_layer_config(self)
        if self.freeze not in FREEZE:
            raise ValueError(f"freeze {self.freeze!r} is unknown (known: {', '.join(FREEZE)})")
        if self.position not in POSITIONS:
            raise ValueError(
                f"position {self.position!r} is unknown (known: {', '.join(POSITIONS)})"
            )
        if self.position_init_std < 0:
            raise ValueError(f"position_init_std must be >= 0, got {self.position_init_std}")


@register
class TransformerDeprojector(Deprojector):
    model_type = "transformer"
    config_class = TransformerConfig
    config: TransformerConfig
    uses_base_model = True

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        D, eps = config.hidden_size, config.layer_norm_eps
        self.n_head = config.num_heads
        self.act = ACTIVATIONS[config.activation]
        self.position_embedding = nn.Parameter(
            config.position_init_std * torch.randn(config.num_positions - 1, D)
        )
        self.ln1 = nn.LayerNorm(D, eps=eps)
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D, eps=eps)
        self.fc1 = nn.Linear(D, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, D)
        self.ln_final = nn.LayerNorm(D, eps=eps)
        for name in FREEZE[config.freeze]:
            getattr(self, name).requires_grad_(False)

    @classmethod
    def config_from_base(cls, text_config: Any) -> dict[str, Any]:
        return clip_shape(text_config)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"num_heads": 4, "intermediate_size": 64}

    def init_from_base(self, text_model: ClipTextModel) -> None:
        """Copy the last encoder layer and the final LayerNorm of a CLIP text model."""
        check_clip_shape(self.config, text_model)
        layer = text_model.encoder.layers[-1]
        for ours, theirs in (
            (self.ln1, layer.layer_norm1),
            (self.q_proj, layer.self_attn.q_proj),
            (self.k_proj, layer.self_attn.k_proj),
            (self.v_proj, layer.self_attn.v_proj),
            (self.out_proj, layer.self_attn.out_proj),
            (self.ln2, layer.layer_norm2),
            (self.fc1, layer.mlp.fc1),
            (self.fc2, layer.mlp.fc2),
            (self.ln_final, text_model.final_layer_norm),
        ):
            copy_module(ours, theirs)

    def _split(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, attention input) of slots x with position embeddings pos."""
        if self.config.position == "residual":
            x = x + pos
            return x, x
        return x, x + pos

    def _after_attention(
        self, x: torch.Tensor, y: torch.Tensor, linear: Linear = F.linear
    ) -> torch.Tensor:
        """The rest of the block given its residual input x and the attention output y.

        `linear` is F.linear, or few_rows_linear for the few rows of a generation step.
        """
        h = x + linear(y, self.out_proj.weight, self.out_proj.bias)
        m = self.act(linear(self.ln2(h), self.fc1.weight, self.fc1.bias))
        h = h + linear(m, self.fc2.weight, self.fc2.bias)
        return self.ln_final(h)

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        x = torch.cat([e_rel[:, None], prev_rel], dim=1)  # [B, T+1, D]
        x, attn_in = self._split(x, self.position_embedding[: x.shape[1]])
        a = self.ln1(attn_in)
        q, k, v = (
            split_heads(proj(a), self.n_head) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T+1, D/H]
        return self._after_attention(x, y.transpose(1, 2).reshape(x.shape))

    def generation_steps(self, e_rel: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
        # Key/value cache: each step runs the block on the new slot only and attends to the
        # keys and values of all earlier slots, which never change (attention is causal).
        B, D = e_rel.shape
        n, H = self.config.num_positions - 1, self.n_head
        keys = e_rel.new_empty(B, H, n, D // H)
        values = e_rel.new_empty(B, H, n, D // H)
        # One matmul for q, k and v of the new slot.
        qkv_weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qkv_bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        x = e_rel
        for t in range(n):
            x, attn_in = self._split(x, self.position_embedding[t])
            q, k, v = few_rows_linear(self.ln1(attn_in), qkv_weight, qkv_bias).split(D, dim=1)
            keys[:, :, t] = k.reshape(B, H, -1)
            values[:, :, t] = v.reshape(B, H, -1)
            # The newest slot may see every cached slot, so no mask is needed. (A contiguous
            # q lets SDPA take its fused CPU kernel instead of the slower reference math.)
            q = q.reshape(B, H, 1, -1).contiguous()
            y = F.scaled_dot_product_attention(q, keys[:, :, : t + 1], values[:, :, : t + 1])
            s = self._after_attention(x, y.reshape(B, D), few_rows_linear)
            x = (yield s) - self.null
