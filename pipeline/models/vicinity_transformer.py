"""Vicinity-transformer deprojector: CLIP's last N encoder layers with a vicinity block each.

77 slots, the embedding as a prefix token (docs/architectures.md):

    x_0 = LN_e(e - null),  x_1 = 0,  x_t = s_{t-1} - null (t = 2..76),  x += pos
    per layer k:  h = x + attn_k(LN1_k(x))                      causal self-attention
                  h = h + V_k(concat(e - null, s_{t-1} - null, ..., s_{t-v} - null))
                  h = h + fc2_k(act(fc1_k(LN2_k(h))))              CLIP's MLP
                  x = LNout_k(h)
    output slot t (1..76) is the prediction of s_t.

The vicinity block V is a no-bias linear map over the embedding and the v states before the
slot (zeros before s_1), `mlp` (Linear, act, Linear) or `gate` (sigmoid(G z) * W z); its
output layer starts at zero, so at initialisation each layer is CLIP's own layer k. Layer k
starts from the k-th of CLIP's last N encoder layers; every LNout from CLIP's final norm, so
each layer maps states to states. Generation keeps a key/value cache per layer.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import (
    ACTIVATIONS,
    ClipTextModel,
    Deprojector,
    DeprojectorConfig,
    register,
)
from pipeline.models.clip_layers import (
    check_clip_layer_config,
    check_clip_shape,
    clip_shape,
    copy_module,
    split_heads,
)

VICINITY_BLOCKS = ("linear", "mlp", "gate")


@dataclass
class VicinityTransformerConfig(DeprojectorConfig):
    num_layers: int = 1
    vicinity: int = 2
    vicinity_block: str = "linear"  # linear | mlp | gate
    # CLIP ViT-L/14's shape; trained from a base model these come from its config.
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.vicinity < 1:
            raise ValueError(f"vicinity must be >= 1, got {self.vicinity}")
        if self.vicinity_block not in VICINITY_BLOCKS:
            raise ValueError(
                f"vicinity_block {self.vicinity_block!r} is unknown "
                f"(known: {', '.join(VICINITY_BLOCKS)})"
            )
        check_clip_layer_config(self)


class VicinityBlock(nn.Module):
    """z = concat(e, s_{t-1}, ..., s_{t-v}) [.., (1+v)D] -> a residual update [.., D].

    The first map is linear in z, so callers may pass its pre-activation `u` = W_in z (and for
    `gate` also G z) computed piecewise; `finish` turns it into the update.
    """

    def __init__(self, config: VicinityTransformerConfig) -> None:
        super().__init__()
        D, kind = config.hidden_size, config.vicinity_block
        width = D * (1 + config.vicinity)
        self.kind = kind
        self.act = ACTIVATIONS[config.activation]
        self.inner = nn.Linear(width, D, bias=False)  # linear: the map itself
        if kind == "gate":
            self.gate = nn.Linear(width, D, bias=False)
        if kind == "mlp":
            self.out = nn.Linear(D, D, bias=False)
        # Start as no update at all: the layer is CLIP's layer.
        zero = self.out if kind == "mlp" else self.inner
        nn.init.zeros_(zero.weight)

    def in_weights(self) -> torch.Tensor:
        """The maps applied to z, stacked: [D or 2D, (1+v)D]."""
        return (
            torch.cat([self.inner.weight, self.gate.weight])
            if self.kind == "gate"
            else self.inner.weight
        )

    def finish(self, u: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return u
        if self.kind == "mlp":
            return self.out(self.act(u))
        w, g = u.chunk(2, dim=-1)
        return torch.sigmoid(g) * w

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.finish(F.linear(z, self.in_weights()))


class Layer(nn.Module):
    """One CLIP encoder layer with the vicinity block between attention and MLP."""

    def __init__(self, config: VicinityTransformerConfig) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.n_head = config.num_heads
        self.act = ACTIVATIONS[config.activation]
        self.ln1 = nn.LayerNorm(D, eps=eps)
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.vicinity = VicinityBlock(config)
        self.ln2 = nn.LayerNorm(D, eps=eps)
        self.fc1 = nn.Linear(D, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, D)
        self.ln_out = nn.LayerNorm(D, eps=eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.ln1(x)
        return tuple(
            split_heads(p(a), self.n_head) for p in (self.q_proj, self.k_proj, self.v_proj)
        )

    def rest(self, x: torch.Tensor, y: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """x [.., D], attention output y (heads merged), vicinity update -> the layer output."""
        h = x + self.out_proj(y) + update
        h = h + self.fc2(self.act(self.fc1(self.ln2(h))))
        return self.ln_out(h)


@register
class VicinityTransformerDeprojector(Deprojector):
    model_type = "vicinity-transformer"
    config_class = VicinityTransformerConfig
    config: VicinityTransformerConfig
    uses_base_model = True

    def __init__(self, config: VicinityTransformerConfig) -> None:
        super().__init__(config)
        D = config.hidden_size
        self.ln_embed = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.position_embedding = nn.Parameter(torch.zeros(config.num_positions, D))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))

    @property
    def blocks(self) -> list[Layer]:
        """self.layers, typed (nn.ModuleList yields plain modules)."""
        return cast(list[Layer], list(self.layers))

    @classmethod
    def config_from_base(cls, text_config: Any) -> dict[str, Any]:
        return clip_shape(text_config)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"num_heads": 4, "intermediate_size": 64, "num_layers": 2}

    def init_from_base(self, text_model: ClipTextModel) -> None:
        """Layer k from the k-th of CLIP's last N layers; every ln_out from the final norm."""
        n = self.config.num_layers
        check_clip_shape(self.config, text_model, layers=n)
        for ours, theirs in zip(self.blocks, text_model.encoder.layers[-n:], strict=True):
            for a, b in (
                (ours.ln1, theirs.layer_norm1),
                (ours.q_proj, theirs.self_attn.q_proj),
                (ours.k_proj, theirs.self_attn.k_proj),
                (ours.v_proj, theirs.self_attn.v_proj),
                (ours.out_proj, theirs.self_attn.out_proj),
                (ours.ln2, theirs.layer_norm2),
                (ours.fc1, theirs.mlp.fc1),
                (ours.fc2, theirs.mlp.fc2),
                (ours.ln_out, text_model.final_layer_norm),
            ):
                copy_module(a, b)

    def _window(self, e_rel: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """z for every slot: concat(e, s_{t-1}, ..., s_{t-v}) [B, T, (1+v)D].

        inputs [B, T, D] are the slots' own inputs, so slot t's s_{t-k} is inputs[t-k+1]
        (slot 1 holds the zero token, which stands in for states before s_1)."""
        B, T, D = inputs.shape
        v = self.config.vicinity
        states = inputs.clone()
        states[:, 0] = 0.0  # the prefix slot holds the embedding, not a state
        padded = F.pad(states, (0, 0, v - 1, 0))  # padded[j + v - 1] = states[j]
        window = [padded[:, v - k : v - k + T] for k in range(1, v + 1)]  # states[t - k + 1]
        return torch.cat([e_rel[:, None].expand(B, T, D), *window], dim=2)

    def _slots(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        zero = e_rel.new_zeros(e_rel.shape[0], 1, e_rel.shape[1])
        return torch.cat([self.ln_embed(e_rel)[:, None], zero, prev_rel], dim=1)

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        inputs = self._slots(e_rel, prev_rel)  # [B, T+2, D]
        z = self._window(e_rel, inputs)
        B, T, D = inputs.shape
        x = inputs + self.position_embedding[:T]
        for layer in self.blocks:
            q, k, v = layer.qkv(x)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = layer.rest(x, y.transpose(1, 2).reshape(B, T, D), layer.vicinity(z))
        return x[:, 1:]  # slot t predicts s_t

    def generation_steps(self, e_rel: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
        # Prefill the prefix and zero slots, then one slot per step with a key/value cache per
        # layer. The embedding's share of each vicinity block is the same at every step.
        B, D = e_rel.shape
        n, v = self.config.num_positions, self.config.vicinity
        H = self.config.num_heads
        caches = [
            (e_rel.new_empty(B, H, n, D // H), e_rel.new_empty(B, H, n, D // H))
            for _ in self.blocks
        ]
        e_terms = [F.linear(e_rel, layer.vicinity.in_weights()[:, :D]) for layer in self.blocks]
        window_weights = [layer.vicinity.in_weights()[:, D:] for layer in self.blocks]

        # Slots 0 and 1 together (their vicinity windows hold no state yet).
        x = self._slots(e_rel, e_rel.new_zeros(B, 0, D)) + self.position_embedding[:2]
        for layer, (keys, values), e_term in zip(self.blocks, caches, e_terms, strict=True):
            q, k, v_ = layer.qkv(x)
            keys[:, :, :2], values[:, :, :2] = k, v_
            y = F.scaled_dot_product_attention(q, k, v_, is_causal=True)
            update = layer.vicinity.finish(e_term)[:, None]
            x = layer.rest(x, y.transpose(1, 2).reshape(B, 2, D), update)
        s = yield x[:, 1]
        window = e_rel.new_zeros(B, v * D)  # s_{t-1} - null, ..., s_{t-v} - null, flat
        for t in range(2, n):
            s_rel = s - self.null
            window = torch.cat([s_rel, window[:, : (v - 1) * D]], dim=1)
            x = (s_rel + self.position_embedding[t])[:, None]  # [B, 1, D]
            for layer, (keys, values), e_term, w in zip(
                self.blocks, caches, e_terms, window_weights, strict=True
            ):
                q, k, v_ = layer.qkv(x)
                keys[:, :, t : t + 1], values[:, :, t : t + 1] = k, v_
                y = F.scaled_dot_product_attention(
                    q.contiguous(), keys[:, :, : t + 1], values[:, :, : t + 1]
                )
                update = layer.vicinity.finish(e_term + F.linear(window, w))[:, None]
                x = layer.rest(x, y.transpose(1, 2).reshape(B, 1, D), update)
            s = yield x[:, 0]
