"""Training losses measured where the UNet reads the conditioning (`train.loss`).

SD 1.x's UNet reads the 77 x D states only through the key and value projections of its
cross-attention layers (`attn2.to_k`, `attn2.to_v` of every transformer block: 16 in SD 1.5,
7 in the world's UNet). Stacking all of them,

    W = [W_k^1; W_v^1; ...; W_k^L; W_v^L]       [M, D], M = 2 * sum of the layers' widths

the squared error of a state error d = s_pred - s_true in that space is |W d|^2 = d' G d with
G = W'W [D, D] (to_k / to_v have no bias in SD; a bias would cancel in d anyway). The loss
uses the metric scaled to mean eigenvalue 1, G_hat = D G / tr(G), and the position weights
of the states loss:

    cross_attention = mean over rows and positions of  w_i * d_i' G_hat d_i / D

which equals the states loss (mean of w_i * |d_i|^2 / D) when every projection is orthogonal
(identity included), and otherwise weighs the directions the UNet reads more. The scale
D / tr(G) is a constant (it keeps the loss comparable to `states` and lets `mix` average the
two); Adam is indifferent to it. `mix` = (states + cross_attention) / 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.base.files import BaseModelError
from pipeline.base.loaders import base_source, load_or_explain
from pipeline.metrics.losses import _check, position_weights, weighted_mse
from pipeline.world.config import WORLD_DIR

# (pred [B,77,D], target [B,77,D], mask [B,77]) -> the scalar loss
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_attention_weights(unet: torch.nn.Module) -> torch.Tensor:
    """[M, D]: the to_k and to_v weights of every cross-attention layer (attn2), stacked."""
    weights = [
        w
        for name, module in unet.named_modules()
        if name.endswith("attn2")
        for w in (module.to_k.weight, module.to_v.weight)
    ]
    if not weights:
        raise ValueError("the UNet has no cross-attention layers (attn2) to measure a loss in")
    return torch.cat(weights).detach()


def metric_of(weights: torch.Tensor) -> torch.Tensor:
    """G_hat = D W'W / tr(W'W) [D, D] of stacked projections W [M, D] (float64 inside)."""
    w = weights.double()
    gram = w.T @ w
    return (gram * (w.shape[1] / torch.trace(gram))).float()


def load_cross_attention_metric(
    sd: str, hidden_size: int, base_dir: Path = WORLD_DIR
) -> torch.Tensor:
    """G_hat of base.sd's UNet (loaded alone, as load_sd_pipeline finds it), checked to read
    states of width hidden_size."""
    from diffusers import UNet2DConditionModel

    def load(source: str, **kwargs):
        return UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)

    unet = load_or_explain(load, base_source(sd, "sd", base_dir), "sd")
    if unet.config.cross_attention_dim != hidden_size:
        raise BaseModelError(
            f"base.sd {sd!r}: its UNet reads states of width {unet.config.cross_attention_dim}, "
            f"base.clip's are {hidden_size} wide; train.loss cross_attention needs the UNet "
            "that base.clip's states condition"
        )
    return metric_of(cross_attention_weights(unet))


def cross_attention_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    metric: torch.Tensor,
    mask_weight: float = 25.0,
) -> torch.Tensor:
    """Mean over rows and positions of the position weight x d' G_hat d / D."""
    target = _check(pred, target)
    weights = position_weights(mask, mask_weight).to(pred)  # [B, 77]
    d = pred - target  # [B, 77, D]
    error = (d @ metric.to(pred)) * d  # [B, 77, D]; summed over D: d' G_hat d
    return (weights[..., None] * error).mean()


def training_loss(
    kind: str,
    mask_weight: float,
    sd: str = "",
    hidden_size: int = 0,
    metric: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Loss:
    """The `train.loss` of a run as a function of (pred, target, mask). `states` is the
    position-weighted squared error itself; the others load base.sd's UNet (or use
    `metric`, a G_hat [D, D]) and keep G_hat on `device`."""
    if kind == "states":
        return lambda pred, target, mask: weighted_mse(pred, target, mask, mask_weight)
    if kind not in ("cross_attention", "mix"):
        raise ValueError(f"train.loss {kind!r} is unknown (known: states, cross_attention, mix)")
    g = metric if metric is not None else load_cross_attention_metric(sd, hidden_size)
    g = g.to(device)
    if kind == "cross_attention":
        return lambda pred, target, mask: cross_attention_mse(pred, target, mask, g, mask_weight)
    return lambda pred, target, mask: (
        0.5
        * (
            weighted_mse(pred, target, mask, mask_weight)
            + cross_attention_mse(pred, target, mask, g, mask_weight)
        )
    )
