"""LSTM deprojector: an LSTM over positions started from the embedding.

Inputs x_1 = 0, x_i = s_{i-1} - null; every layer starts from h_0 = e - null, c_0 = 0
(docs/architectures.md):

    o_i = LSTM(x_1..x_i; h_0, c_0)
    s_i = LN_final(o_i + x_i [+ W_e (e - null)])

`cell: layernorm` uses LSTM cells with LayerNorm on the cell state and the output,
c' = f*c + i*g, h' = LN_h(o * tanh(LN_c(c'))); `num_layers: 2` stacks two. LN_final starts
from CLIP's final LayerNorm. Generation carries (h, c), so each position costs O(1).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.models.base import ClipTextModel, Deprojector, DeprojectorConfig, register
from pipeline.models.clip_layers import copy_module

CELLS = ("standard", "layernorm")


@dataclass
class LSTMConfig(DeprojectorConfig):
    num_layers: int = 1
    cell: str = "standard"  # standard (torch's fused LSTM) | layernorm
    embed_linear: bool = False  # add a linear map of e - null to every output
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.cell not in CELLS:
            raise ValueError(f"cell {self.cell!r} is unknown (known: {', '.join(CELLS)})")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")


class LayerNormLSTMCell(nn.Module):
    """c' = f*c + i*g;  h' = LN_h(o * tanh(LN_c(c')))  with [i f g o] = W x + U h + b."""

    def __init__(self, D: int, eps: float) -> None:
        super().__init__()
        self.ih = nn.Linear(D, 4 * D)
        self.hh = nn.Linear(D, 4 * D, bias=False)
        self.ln_c = nn.LayerNorm(D, eps=eps)
        self.ln_h = nn.LayerNorm(D, eps=eps)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = self.ln_h(torch.sigmoid(o) * torch.tanh(self.ln_c(c)))
        return h, c


@register
class LSTMDeprojector(Deprojector):
    model_type = "lstm"
    config_class = LSTMConfig
    config: LSTMConfig
    uses_base_model = True  # the final LayerNorm starts from CLIP's

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__(config)
        D, eps = config.hidden_size, config.layer_norm_eps
        if config.cell == "standard":
            self.lstm = nn.LSTM(D, D, num_layers=config.num_layers, batch_first=True)
        else:
            self.cells = nn.ModuleList(LayerNormLSTMCell(D, eps) for _ in range(config.num_layers))
        self.embed_proj = nn.Linear(D, D, bias=False) if config.embed_linear else None
        self.ln_final = nn.LayerNorm(D, eps=eps)

    @classmethod
    def config_from_base(cls, text_config: Any) -> dict[str, Any]:
        return {"layer_norm_eps": text_config.layer_norm_eps}

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"num_layers": 2, "embed_linear": True}

    def init_from_base(self, text_model: ClipTextModel) -> None:
        copy_module(self.ln_final, text_model.final_layer_norm)

    def _start(self, e_rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_0, c_0) of every layer: [L, B, D] each."""
        h = e_rel[None].expand(self.config.num_layers, -1, -1).contiguous()
        return h, torch.zeros_like(h)

    def _run(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """Inputs [B, T, D] from `state` -> outputs [B, T, D] and the final state."""
        if self.config.cell == "standard":
            return self.lstm(x, state)
        hs, cs = list(state[0]), list(state[1])
        outputs = []
        for t in range(x.shape[1]):
            inp = x[:, t]
            for k, cell in enumerate(self.cells):
                hs[k], cs[k] = cell(inp, hs[k], cs[k])
                inp = hs[k]
            outputs.append(inp)
        return torch.stack(outputs, dim=1), (torch.stack(hs), torch.stack(cs))

    def _head(self, o: torch.Tensor, x: torch.Tensor, e_rel: torch.Tensor) -> torch.Tensor:
        y = o + x
        if self.embed_proj is not None:
            y = y + self.embed_proj(e_rel)[:, None]
        return self.ln_final(y)

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.zeros_like(e_rel)[:, None], prev_rel], dim=1)  # [B, T+1, D]
        o, _ = self._run(x, self._start(e_rel))
        return self._head(o, x, e_rel)

    def generation_steps(self, e_rel: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
        # One LSTM step per position, carrying (h, c): O(1) per position.
        B, D = e_rel.shape
        n = self.config.num_positions - 1
        state = self._start(e_rel)
        x = torch.zeros_like(e_rel)[:, None]  # [B, 1, D]
        for _ in range(n):
            o, state = self._run(x, state)
            s = yield self._head(o, x, e_rel)[:, 0]
            x = (s - self.null)[:, None]
