"""What the architectures that start from CLIP's encoder layers share (no architecture here).

`clip_shape` reads the hyperparameters that must match the base CLIP text model,
`check_clip_layer_config` checks those settings, `check_clip_shape` refuses a base model of
another shape, and `split_heads` reshapes for multi-head attention. See
docs/architectures.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import ClipTextModel, check_activation

# Our config field -> the CLIP text config attribute it must equal to copy CLIP's weights.
CLIP_FIELDS = {
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "layer_norm_eps": "layer_norm_eps",
    "activation": "hidden_act",
}


def clip_shape(text_config: Any) -> dict[str, Any]:
    """The CLIP text config's values of CLIP_FIELDS, under our names."""
    return {ours: getattr(text_config, theirs) for ours, theirs in CLIP_FIELDS.items()}


def check_clip_layer_config(config: Any) -> None:
    """Raise if the CLIP-layer settings of `config` (CLIP_FIELDS) cannot build a layer."""
    if config.num_heads < 1 or config.hidden_size % config.num_heads:
        raise ValueError(
            f"num_heads={config.num_heads} must be >= 1 and divide hidden_size={config.hidden_size}"
        )
    if config.intermediate_size < 1:
        raise ValueError(f"intermediate_size must be >= 1, got {config.intermediate_size}")
    if config.layer_norm_eps <= 0:
        raise ValueError(f"layer_norm_eps must be > 0, got {config.layer_norm_eps}")
    check_activation(config.activation)


def check_clip_shape(config: Any, text_model: ClipTextModel, layers: int = 1) -> None:
    """Raise if `config` cannot take the weights of `text_model`'s last `layers` layers."""
    clip = text_model.config
    for ours, theirs in {"hidden_size": "hidden_size", **CLIP_FIELDS}.items():
        if getattr(clip, theirs) != getattr(config, ours):
            raise ValueError(
                f"CLIP text model has {theirs}={getattr(clip, theirs)!r}, the "
                f"{config.model_type} deprojector was built with {ours}={getattr(config, ours)!r}"
            )
    if layers > clip.num_hidden_layers:
        raise ValueError(
            f"{config.model_type}: {layers} layers wanted, the CLIP text model "
            f"has only {clip.num_hidden_layers}"
        )


@torch.no_grad()
def copy_module(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy weights in place (requires_grad of ours is kept)."""
    ours.load_state_dict(theirs.state_dict())


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, H, T, D/H]."""
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads).transpose(1, 2)
