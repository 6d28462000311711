"""Vicinity deprojectors: attention replaced by a network over a local window.

See docs/architectures.md.

The state at position i is predicted from e - null and the `vicinity` states just before i,
s_{i-1} - null, ..., s_{i-v} - null. Where the window runs past position 1, zero vectors stand
in (sos is never an input). Both variants share everything but the first layer:

    batch:       concat(e, s_{i-1}, ..., s_{i-v}) -> Linear -> act -> Linear
    individual:  concat(act(L_e e), act(L_s s_{i-1}), ..., act(L_s s_{i-v})) -> Linear

followed by `mlp_layers` x [norm -> Linear(D, rD) -> act -> Linear(rD, D)] and a final norm,
with no residual connections, as in the original.

Both are written as per-input features (`embed_features`, `state_features`), a shared mixing
Linear over their concatenation (`mix`) and what follows it (`after_mix`), so a state's
features are computed once: for the whole shifted sequence when teacher-forced, once per
generated state when generating, where the embedding's share of `mix` is also computed once.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import (
    ACTIVATIONS,
    Deprojector,
    DeprojectorConfig,
    Linear,
    check_activation,
    few_rows_linear,
    register,
)

NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}


@dataclass
class VicinityConfig(DeprojectorConfig):
    vicinity: int = 3  # the article's experiment
    mlp_layers: int = 1
    mlp_ratio: int = 4
    norm: str = "batch"  # the original used BatchNorm; "layer" for LayerNorm
    activation: str = "quick_gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vicinity < 1:
            raise ValueError(f"vicinity must be >= 1, got {self.vicinity}")
        if self.mlp_layers < 0:
            raise ValueError(f"mlp_layers must be >= 0, got {self.mlp_layers}")
        if self.mlp_ratio < 1:
            raise ValueError(f"mlp_ratio must be >= 1, got {self.mlp_ratio}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is unknown (known: {', '.join(NORMS)})")
        check_activation(self.activation)


class MLPBlock(nn.Module):
    def __init__(self, config: VicinityConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.norm = NORMS[config.norm](D)
        self.fc1 = nn.Linear(D, config.mlp_ratio * D)
        self.fc2 = nn.Linear(config.mlp_ratio * D, D)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        h = self.act(linear(self.norm(x), self.fc1.weight, self.fc1.bias))
        return linear(h, self.fc2.weight, self.fc2.bias)


class VicinityDeprojector(Deprojector):
    """What both variants share: the mixing layer, the MLP head, windows, the generation loop.

    Functions used both teacher-forced and step by step take the matmul as `linear`:
    F.linear for many rows, few_rows_linear for the few rows of a generation step.
    """

    config_class = VicinityConfig
    config: VicinityConfig

    def __init__(self, config: VicinityConfig) -> None:
        super().__init__(config)
        D, v = config.hidden_size, config.vicinity
        self.act = ACTIVATIONS[config.activation]
        self.mix = nn.Linear(D * (1 + v), D)  # over concat(embedding features, window)
        self.blocks = nn.ModuleList(MLPBlock(config) for _ in range(config.mlp_layers))
        self.norm = NORMS[config.norm](D)

    def embed_features(self, e_rel: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_features(self, s_rel: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        raise NotImplementedError

    def after_mix(self, z: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        raise NotImplementedError

    def _head(self, z: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        # [N, D] rows; BatchNorm takes its statistics over all rows, i.e. over every position.
        x = self.after_mix(z, linear)
        for block in self.blocks:
            x = block(x, linear)
        return self.norm(x)

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        B, T, D = prev_rel.shape
        n, v = T + 1, self.config.vicinity
        # Left-pad with v zero states: padded index v - 1 + j holds s_j - null, so the window
        # of position i (1..n) holds s_{i-k} at index v - k + (i - 1) for k = 1..v.
        feats = self.state_features(F.pad(prev_rel, (0, 0, v, 0)))
        window = torch.cat([feats[:, v - k : v - k + n] for k in range(1, v + 1)], dim=2)
        e_feat = self.embed_features(e_rel)[:, None].expand(B, n, D)
        z = self.mix(torch.cat([e_feat, window], dim=2))  # [B, n, D]
        return self._head(z.reshape(B * n, D)).view(B, n, D)

    def generation_steps(self, e_rel: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
        # Call eval() first: with BatchNorm in training mode each step would normalise with
        # the statistics of its own batch.
        B, D = e_rel.shape
        n, v = self.config.num_positions - 1, self.config.vicinity
        # The embedding's share of the mixing layer is the same at every step: compute it once.
        e_term = F.linear(self.embed_features(e_rel), self.mix.weight[:, :D], self.mix.bias)
        window_weight = self.mix.weight[:, D:].contiguous()
        # Features of the v latest states, newest first, flat [B, v*D]; zero states at first.
        window = self.state_features(e_rel.new_zeros(B, v, D)).flatten(1)
        for _ in range(n):
            z = e_term + few_rows_linear(window, window_weight)
            s = yield self._head(z, few_rows_linear)
            newest = self.state_features(s - self.null, few_rows_linear)
            window = torch.cat([newest, window[:, : (v - 1) * D]], dim=1)


@register
class VicinityBatchDeprojector(VicinityDeprojector):
    """一括適用: one MLP over the concatenated embedding and window."""

    model_type = "vicinity-batch"

    def __init__(self, config: VicinityConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def embed_features(self, e_rel: torch.Tensor) -> torch.Tensor:
        return e_rel

    def state_features(self, s_rel: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        return s_rel

    def after_mix(self, z: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        return linear(self.act(z), self.proj.weight, self.proj.bias)


@register
class VicinityIndividualDeprojector(VicinityDeprojector):
    """個別適用: a separate linear map per input (one shared over the window), then the mix."""

    model_type = "vicinity-individual"

    def __init__(self, config: VicinityConfig) -> None:
        super().__init__(config)
        self.embed_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.state_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def embed_features(self, e_rel: torch.Tensor) -> torch.Tensor:
        return self.act(self.embed_proj(e_rel))

    def state_features(self, s_rel: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        # Zero stand-in states go through state_proj like real ones.
        return self.act(linear(s_rel, self.state_proj.weight, self.state_proj.bias))

    def after_mix(self, z: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        return z
