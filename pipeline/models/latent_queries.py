"""Latent-queries deprojector: `queries` with its layers on the K tokens, read once by 76 queries.

The one pass at a fraction of `queries`' cost (docs/architectures.md). `queries` runs its N
CLIP-sized layers over the 76 position queries: at CLIP-L sizes 76 x 14 D^2 multiply-adds per
layer. Here the layers run over the K tokens made from the embedding (latents), and the 76
position queries read them with one cross-attention, as Perceiver IO's decoder reads its
latent array (Jaegle et al. 2021); IP-Adapter's and ELLA's resamplers also keep their layers
on a few latents:

    t = LN_t(reshape(W_t (e - null) + b_t, [K, D]))        K latents
    per layer k = 1..N (pre-LN; attention among the latents, causal or not):
        t = t + out_k(self_attention_k(LN1_k(t)))
        t = t + fc2_k(act(fc1_k(LN2_k(t))))
    x = q + pos                                              [76, D] learned queries
    x = x + o(cross_attention(LN_r(x), LN_l(t)))             the one read
    x = x + fc2_r(act(fc1_r(LN_m(x))))                       with readout_mlp (width D)
    s_1..s_76 = LN_final(x)

Multiply-adds per row: K D^2 (tokens) + N K 12 D^2 (layers) + 76 x 2 D^2 + 2 K D^2 (the read),
+ 76 x 2 D^2 with the readout MLP. At K = 8, N = 2: 368 D^2, 0.033 x CLIP-L's text encoder
(77 x 12 x 12 D^2 = 11,088 D^2); `queries`: 2,192 D^2.

With `init: clip` (default) latent layer k starts from the k-th of CLIP's last N encoder
layers, LN_final from CLIP's final LayerNorm and pos from CLIP's position embeddings 1..76;
the read's output map o (and the readout MLP's last layer) start at zero, so at
initialisation every embedding gets LN_final(pos), as with `queries`. As `queries`, there is
no teacher forcing: the previous states `predict` receives are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from pipeline.models.base import ACTIVATIONS, register
from pipeline.models.queries import Attention, QueriesConfig, QueriesDeprojector


@dataclass
class LatentQueriesConfig(QueriesConfig):
    readout_mlp: bool = False  # an MLP (width D) on the 76 positions after the read


class LatentLayer(nn.Module):
    """CLIP's encoder layer on the K latents (pre-LN self-attention and MLP)."""

    def __init__(self, config: LatentQueriesConfig) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.causal = config.causal
        self.act = ACTIVATIONS[config.activation]
        self.ln1 = nn.LayerNorm(D, eps=eps)
        self.self_attn = Attention(D, config.num_heads)
        self.ln2 = nn.LayerNorm(D, eps=eps)
        self.fc1 = nn.Linear(D, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, D)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = self.ln1(t)
        t = t + self.self_attn(a, a, causal=self.causal)
        return t + self.fc2(self.act(self.fc1(self.ln2(t))))


@register
class LatentQueriesDeprojector(QueriesDeprojector):
    model_type = "latent-queries"
    config_class = LatentQueriesConfig
    config: LatentQueriesConfig
    layer_class = LatentLayer

    def __init__(self, config: LatentQueriesConfig) -> None:
        super().__init__(config)
        D, eps = config.hidden_size, config.layer_norm_eps
        self.ln_latents = nn.LayerNorm(D, eps=eps)
        self.ln_read = nn.LayerNorm(D, eps=eps)
        self.read = Attention(D, config.num_heads)
        self.readout: nn.Sequential | None = None
        if config.readout_mlp:
            self.readout = nn.Sequential(
                nn.LayerNorm(D, eps=eps),
                nn.Linear(D, D),
                ACTIVATIONS[config.activation],  # transformers' ACT2FN: a module
                nn.Linear(D, D),
            )

    def zero_at_start(self) -> list[nn.Linear]:
        """With `init: clip` the read's output map and the readout MLP's last layer start at
        zero: the initial states are LN_final(pos), as `queries`'."""
        maps = [self.read.out_proj]
        if self.readout is not None:
            maps.append(cast(nn.Linear, self.readout[-1]))
        return maps

    def states(self, e_rel: torch.Tensor) -> torch.Tensor:
        """The one pass: e - null [B, D] -> s_1..s_76 [B, 76, D]."""
        B, D = e_rel.shape
        t = self.ln_tokens(self.to_tokens(e_rel).view(B, self.config.num_tokens, D))  # [B, K, D]
        for layer in self.layers:
            t = layer(t)
        x = (self.queries + self.position_embedding).expand(B, -1, -1)  # [B, 76, D]
        x = x + self.read(self.ln_read(x), self.ln_latents(t))
        if self.readout is not None:
            x = x + self.readout(x)
        return self.ln_final(x)
