"""Vicinity RNN deprojector: states from the embedding first, then from states alone.

(docs/architectures.md)

    s_1..s_v = LN_final(f(e - null))                          f: D -> v·D, an MLP
    s_i      = LN_final(s_{i-1} - null + g(concat(s_{i-1} - null, ..., s_{i-v} - null)))
                                                               g: v·D -> D, an MLP; i > v

The step network g never sees the embedding: everything the later states carry must have
been put into the first v. The original trained it free-running (train.rollout); LN_final
starts from CLIP's final LayerNorm.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.models.base import (
    ACTIVATIONS,
    ClipTextModel,
    Deprojector,
    DeprojectorConfig,
    check_activation,
    register,
)
from pipeline.models.clip_layers import copy_module


@dataclass
class VicinityRNNConfig(DeprojectorConfig):
    vicinity: int = 3
    mlp_ratio: int = 4  # hidden width of f and g: mlp_ratio * D
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.vicinity < self.num_positions - 1:
            raise ValueError(
                f"vicinity must be in [1, {self.num_positions - 2}], got {self.vicinity}"
            )
        if self.mlp_ratio < 1:
            raise ValueError(f"mlp_ratio must be >= 1, got {self.mlp_ratio}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        check_activation(self.activation)


def mlp(d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), act, nn.Linear(d_hidden, d_out))


@register
class VicinityRNNDeprojector(Deprojector):
    model_type = "vicinity-rnn"
    config_class = VicinityRNNConfig
    config: VicinityRNNConfig
    uses_base_model = True  # the final LayerNorm starts from CLIP's

    def __init__(self, config: VicinityRNNConfig) -> None:
        super().__init__(config)
        D, v = config.hidden_size, config.vicinity
        act = ACTIVATIONS[config.activation]
        self.first = mlp(D, config.mlp_ratio * D, v * D, act)  # f
        self.step = mlp(v * D, config.mlp_ratio * D, D, act)  # g
        self.ln_final = nn.LayerNorm(D, eps=config.layer_norm_eps)

    @classmethod
    def config_from_base(cls, text_config: Any) -> dict[str, Any]:
        return {"layer_norm_eps": text_config.layer_norm_eps}

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"vicinity": 2, "mlp_ratio": 1}

    def init_from_base(self, text_model: ClipTextModel) -> None:
        copy_module(self.ln_final, text_model.final_layer_norm)

    def _first_states(self, e_rel: torch.Tensor) -> torch.Tensor:
        """s_1..s_v [B, v, D] from the embedding."""
        B, D = e_rel.shape
        return self.ln_final(self.first(e_rel).view(B, self.config.vicinity, D))

    def _next(self, window: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        """window [.., v·D] (newest first), newest = s_{i-1} - null [.., D] -> s_i."""
        return self.ln_final(newest + self.step(window))

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        B, T, D = prev_rel.shape
        v = self.config.vicinity
        first = self._first_states(e_rel)[:, : T + 1]
        if T + 1 <= v:
            return first
        # Position i (v+1..T+1) sees s_{i-1}, ..., s_{i-v}: prev_rel[:, i-1-k] for k = 1..v.
        n = T + 1 - v  # positions v+1 .. T+1
        window = torch.cat([prev_rel[:, v - k : v - k + n] for k in range(1, v + 1)], dim=2)
        later = self._next(window, prev_rel[:, v - 1 : v - 1 + n])
        return torch.cat([first, later], dim=1)

    def generation_steps(self, e_rel: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
        B, D = e_rel.shape
        n, v = self.config.num_positions - 1, self.config.vicinity
        # s_1..s_v come from the embedding alone; the window holds the states fed back.
        window = e_rel.new_zeros(B, v * D)  # s_{i-1} - null, ..., s_{i-v} - null, flat
        for first in self._first_states(e_rel).unbind(1):
            s = yield first
            window = torch.cat([s - self.null, window[:, : (v - 1) * D]], dim=1)
        for _ in range(v, n):
            s = yield self._next(window, window[:, :D])
            window = torch.cat([s - self.null, window[:, : (v - 1) * D]], dim=1)
