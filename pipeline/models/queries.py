"""Queries deprojector: all 76 states in one forward pass, no autoregression.

Learned position queries read K tokens made from the embedding through cross-attention
(IP-Adapter's resampler, ELLA's connector, Kosmos-G's AlignerNet; docs/architectures.md):

    t = LN_t(reshape(W_t (e - null) + b_t, [K, D]))        K tokens of the embedding
    x = q + pos                                             [76, D] learned queries, slot j: s_{j+1}
    per layer k = 1..N (pre-LN):
        x = x + out_k(self_attention_k(LN1_k(x)))            among the queries (causal or not)
        x = x + o_k(cross_attention_k(LNc_k(x), t))          queries read the tokens
        x = x + fc2_k(act(fc1_k(LN2_k(x))))                  MLP
    s_1..s_76 = LN_final(x)

With `init: clip` (default) layer k's self-attention, MLP and norms start from the k-th of
CLIP's last N encoder layers, LN_final from CLIP's final LayerNorm and pos from CLIP's input
position embeddings 1..76; every cross-attention output map o_k starts at zero, so at
initialisation the model is CLIP's last layers run on the position embeddings alone. The
queries q start at zero. `init: fresh` keeps PyTorch's defaults (pos from N(0, 0.02)).

There is no teacher forcing: the previous states `predict` receives are ignored, so the
teacher-forced, the naive and the fast generation are the same single pass.
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

INITS = ("clip", "fresh")


@dataclass
class QueriesConfig(DeprojectorConfig):
    num_tokens: int = 8  # K: tokens made from e - null
    num_layers: int = 2  # N
    causal: bool = False  # self-attention among the queries: causal (as CLIP's) or not
    init: str = "clip"  # clip: layers from CLIP's last N layers; fresh: PyTorch defaults
    # CLIP ViT-L/14's shape; trained from a base model these come from its config.
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is unknown (known: {', '.join(INITS)})")
        check_clip_layer_config(self)


class Attention(nn.Module):
    """Multi-head attention of queries x [B, T, D] over keys/values from c [B, S, D]."""

    def __init__(self, D: int, heads: int) -> None:
        super().__init__()
        self.n_head = heads
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, D = x.shape
        q = split_heads(self.q_proj(x), self.n_head)  # [B, H, T, D/H]
        k = split_heads(self.k_proj(c), self.n_head)  # [B, H, S, D/H]
        v = split_heads(self.v_proj(c), self.n_head)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, T, D/H]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Layer(nn.Module):
    """Pre-LN: self-attention among the queries, cross-attention to the tokens, MLP."""

    def __init__(self, config: QueriesConfig) -> None:
        super().__init__()
        D, eps, H = config.hidden_size, config.layer_norm_eps, config.num_heads
        self.causal = config.causal
        self.act = ACTIVATIONS[config.activation]
        self.ln1 = nn.LayerNorm(D, eps=eps)
        self.self_attn = Attention(D, H)
        self.ln_cross = nn.LayerNorm(D, eps=eps)
        self.cross_attn = Attention(D, H)
        self.ln2 = nn.LayerNorm(D, eps=eps)
        self.fc1 = nn.Linear(D, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, D)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        a = self.ln1(x)
        x = x + self.self_attn(a, a, causal=self.causal)
        x = x + self.cross_attn(self.ln_cross(x), tokens)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


@register
class QueriesDeprojector(Deprojector):
    model_type = "queries"
    config_class = QueriesConfig
    config: QueriesConfig
    layers: nn.ModuleList
    layer_class: type[nn.Module] = Layer  # what the N layers are
    uses_base_model = True

    def __init__(self, config: QueriesConfig) -> None:
        super().__init__(config)
        D, K, eps = config.hidden_size, config.num_tokens, config.layer_norm_eps
        n = config.num_positions - 1  # 76 predicted positions
        self.to_tokens = nn.Linear(D, K * D)  # W_t, b_t
        self.ln_tokens = nn.LayerNorm(D, eps=eps)
        self.queries = nn.Parameter(torch.zeros(n, D))
        self.position_embedding = nn.Parameter(torch.zeros(n, D))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(self.layer_class(config) for _ in range(config.num_layers))
        self.ln_final = nn.LayerNorm(D, eps=eps)

    @classmethod
    def config_from_base(cls, text_config: Any) -> dict[str, Any]:
        return clip_shape(text_config)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"num_heads": 4, "intermediate_size": 64, "num_layers": 2, "num_tokens": 4}

    def init_from_base(self, text_model: ClipTextModel) -> None:
        """Layer k from the k-th of CLIP's last N layers (self-attention, MLP, norms), LN_final
        from the final norm, pos from CLIP's position embeddings 1..76; o_k at zero."""
        if self.config.init == "fresh":
            return
        n = self.config.num_layers
        check_clip_shape(self.config, text_model, layers=n)
        layers: list[Any] = list(self.layers)  # layer_class's: CLIP's layer fields, and more
        for ours, theirs in zip(layers, text_model.encoder.layers[-n:], strict=True):
            for a, b in (
                (ours.ln1, theirs.layer_norm1),
                (ours.self_attn.q_proj, theirs.self_attn.q_proj),
                (ours.self_attn.k_proj, theirs.self_attn.k_proj),
                (ours.self_attn.v_proj, theirs.self_attn.v_proj),
                (ours.self_attn.out_proj, theirs.self_attn.out_proj),
                (ours.ln2, theirs.layer_norm2),
                (ours.fc1, theirs.mlp.fc1),
                (ours.fc2, theirs.mlp.fc2),
            ):
                copy_module(a, b)
        copy_module(self.ln_final, text_model.final_layer_norm)
        positions = text_model.embeddings.position_embedding.weight  # [77, D]
        with torch.no_grad():
            self.position_embedding.copy_(positions[1 : self.config.num_positions])
            for linear in self.zero_at_start():
                linear.weight.zero_()
                linear.bias.zero_()

    def zero_at_start(self) -> list[nn.Linear]:
        """The maps that start at zero with `init: clip`: each cross-attention's output map."""
        return [cast(Layer, layer).cross_attn.out_proj for layer in self.layers]

    def states(self, e_rel: torch.Tensor) -> torch.Tensor:
        """The one pass: e - null [B, D] -> s_1..s_76 [B, 76, D]."""
        B, D = e_rel.shape
        K = self.config.num_tokens
        tokens = self.ln_tokens(self.to_tokens(e_rel).view(B, K, D))  # [B, K, D]
        x = (self.queries + self.position_embedding).expand(B, -1, -1)  # [B, 76, D]
        for layer in self.layers:
            x = layer(x, tokens)
        return self.ln_final(x)

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        """The previous states are not read: the first T+1 states of the one pass."""
        return self.states(e_rel)[:, : prev_rel.shape[1] + 1]

    def generate_states(self, e_rel: torch.Tensor) -> torch.Tensor:
        return self.states(e_rel)

    def generation_steps(self, e_rel: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
        # For callers that step (the ensemble): one pass, then its states one at a time; what
        # is sent back is not read. (Not `yield from`: it would pass `send` on to a tuple.)
        for s in self.states(e_rel).unbind(dim=1):  # noqa: UP028
            yield s
