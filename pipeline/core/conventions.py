"""Conventions every stage and every deprojector shares (docs/architectures.md).

- The base model's constants saved with shards and models, by name: `sos` (the start-of-text
  state H[0], the same for every prompt), `null` (the pooled embedding of ""), and
  `deprojection` (the pseudo-inverse of CLIP's text projection).
- Several pooled embeddings combine as Σ_k w_k (e_k − null) + null (w_k = 1 by default).
- Interpolation between two embeddings is centred on null too: linear, or spherical (slerp)
  on the offsets a = e_A − null and b = e_B − null.
"""

from __future__ import annotations

import torch

CONSTANT_NAMES = ("sos", "null", "deprojection")
MAX_LENGTH = 77  # CLIP's context: BOS + 75 tokens + EOS; SD 1.x conditions on all 77 states
BUILTIN = "builtin"  # base.clip / base.sd value naming the embedded world's models


def combine_embeddings(
    pooled: torch.Tensor, null: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_k w_k (e_k − null) + null over dim -2: [..., K, D] -> [..., D] (K = 1, w = 1: e).

    weights [K] (or broadcastable to [..., K]); None means 1 for every part."""
    offsets = pooled - null
    if weights is not None:
        offsets = offsets * weights.to(offsets)[..., None]
    return offsets.sum(dim=-2) + null


def interpolate_embeddings(
    a: torch.Tensor, b: torch.Tensor, null: torch.Tensor, t: float, spherical: bool = False
) -> torch.Tensor:
    """The embedding a fraction t of the way from a to b (both [..., D]), centred on null.

    Linear: null + (1 − t)(a − null) + t (b − null) = (1 − t) a + t b.
    Spherical: with u = a − null, v = b − null and Ω the angle between them,
    null + sin((1 − t) Ω) / sin Ω · u + sin(t Ω) / sin Ω · v; it keeps |u| when |u| = |v|
    where the straight line cuts the corner. Nearly parallel u, v fall back to linear.
    """
    u, v = a - null, b - null
    if spherical:
        cos = torch.nn.functional.cosine_similarity(u, v, dim=-1).clamp(-1, 1)[..., None]
        omega = torch.arccos(cos)
        sin = torch.sin(omega)
        if (sin.abs() > 1e-4).all():
            return null + (torch.sin((1 - t) * omega) * u + torch.sin(t * omega) * v) / sin
    return null + (1 - t) * u + t * v
