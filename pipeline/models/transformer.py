"""Transformer deprojector (SPEC 2.1): one pre-LN transformer block and a final LayerNorm.

76 slots: slot 0 holds e - null, slot j (1..75) holds s_j - null; output slot j predicts
s_{j+1}. Causal attention makes it autoregressive. The block has the shape of a CLIP encoder
layer so it can start from the CLIP text model's last layer (`init_from_clip`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import (
    ACTIVATIONS,
    Deprojector,
    DeprojectorConfig,
    Linear,
    few_rows_linear,
)


@dataclass
class TransformerConfig(DeprojectorConfig):
    # Defaults are CLIP ViT-L/14's; init_from_clip needs them to match the CLIP model.
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    freeze_attention: bool = True  # the original trained with the CLIP attention frozen

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be >= 1 and divide hidden_size={self.hidden_size}"
            )
        if self.intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {self.intermediate_size}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is unknown (known: {', '.join(ACTIVATIONS)})"
            )


class TransformerDeprojector(Deprojector):
    model_type = "transformer"
    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        D, eps = config.hidden_size, config.layer_norm_eps
        self.n_head = config.num_heads
        self.act = ACTIVATIONS[config.activation]
        self.position_embedding = nn.Parameter(0.02 * torch.randn(config.num_positions - 1, D))
        self.ln1 = nn.LayerNorm(D, eps=eps)
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D, eps=eps)
        self.fc1 = nn.Linear(D, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, D)
        self.ln_final = nn.LayerNorm(D, eps=eps)
        if config.freeze_attention:
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                proj.requires_grad_(False)

    @torch.no_grad()
    def init_from_clip(self, text_model: nn.Module) -> None:
        """Copy the last encoder layer and final LayerNorm of a CLIP text model."""
        # CLIPTextModelWithProjection wraps the text model in `.text_model`.
        model = getattr(text_model, "text_model", text_model)
        clip = model.config
        for clip_key, ours in (
            ("hidden_size", self.config.hidden_size),
            ("num_attention_heads", self.config.num_heads),
            ("intermediate_size", self.config.intermediate_size),
            ("hidden_act", self.config.activation),
            ("layer_norm_eps", self.config.layer_norm_eps),
        ):
            if getattr(clip, clip_key) != ours:
                raise ValueError(
                    f"CLIP text model has {clip_key}={getattr(clip, clip_key)!r}, "
                    f"the transformer deprojector was built with {ours!r}"
                )
        layer = model.encoder.layers[-1]
        for ours, theirs in (
            (self.ln1, layer.layer_norm1),
            (self.q_proj, layer.self_attn.q_proj),
            (self.k_proj, layer.self_attn.k_proj),
            (self.v_proj, layer.self_attn.v_proj),
            (self.out_proj, layer.self_attn.out_proj),
            (self.ln2, layer.layer_norm2),
            (self.fc1, layer.mlp.fc1),
            (self.fc2, layer.mlp.fc2),
            (self.ln_final, model.final_layer_norm),
        ):
            ours.load_state_dict(theirs.state_dict())  # copies in place: requires_grad is kept

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # [B, H, T, hd]

    def _after_attention(
        self, x: torch.Tensor, y: torch.Tensor, linear: Linear = F.linear
    ) -> torch.Tensor:
        """The rest of the block given its input x and the attention output y (heads merged).

        `linear` is F.linear, or few_rows_linear for the few rows of a generation step.
        """
        h = x + linear(y, self.out_proj.weight, self.out_proj.bias)
        m = self.act(linear(self.ln2(h), self.fc1.weight, self.fc1.bias))
        h = h + linear(m, self.fc2.weight, self.fc2.bias)
        return self.ln_final(h)

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        x = torch.cat([e_rel[:, None], prev_rel], dim=1)
        x = x + self.position_embedding[: x.shape[1]]
        a = self.ln1(x)
        q, k, v = (self._heads(proj(a)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._after_attention(x, y.transpose(1, 2).reshape(x.shape))

    def generate_states_naive(self, e_rel: torch.Tensor) -> torch.Tensor:
        """Reference generation that re-runs the whole prefix for every position (quadratic)."""
        prev = e_rel.new_zeros(e_rel.shape[0], 0, e_rel.shape[1])
        states = []
        for _ in range(self.config.num_positions - 1):
            s = self.predict(e_rel, prev)[:, -1]
            states.append(s)
            prev = torch.cat([prev, (s - self.null)[:, None]], dim=1)
        return torch.stack(states, dim=1)

    def generate_states(self, e_rel: torch.Tensor) -> torch.Tensor:
        # Key/value cache: each step runs the block on the new slot only and attends to the
        # keys and values of all earlier slots, which never change (attention is causal).
        B, D = e_rel.shape
        n, H = self.config.num_positions - 1, self.n_head
        keys = e_rel.new_empty(B, H, n, D // H)
        values = e_rel.new_empty(B, H, n, D // H)
        states = e_rel.new_empty(B, n, D)
        # One matmul for q, k and v of the new slot.
        qkv_weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qkv_bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        x = e_rel
        for t in range(n):
            x = x + self.position_embedding[t]
            q, k, v = few_rows_linear(self.ln1(x), qkv_weight, qkv_bias).split(D, dim=1)
            keys[:, :, t] = k.reshape(B, H, -1)
            values[:, :, t] = v.reshape(B, H, -1)
            # The newest slot may see every cached slot, so no mask is needed. (A contiguous
            # q lets SDPA take its fused CPU kernel instead of the slower reference math.)
            q = q.reshape(B, H, 1, -1).contiguous()
            y = F.scaled_dot_product_attention(q, keys[:, :, : t + 1], values[:, :, : t + 1])
            s = self._after_attention(x, y.reshape(B, D), few_rows_linear)
            states[:, t] = s
            x = s - self.null
        return states

