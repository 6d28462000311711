"""Conventions every stage and every deprojector shares (docs/architectures.md).

- The base model's constants saved with shards and models, by name: `sos` (the start-of-text
  state H[0], the same for every prompt), `null` (the pooled embedding of ""), and
  `deprojection` (the pseudo-inverse of CLIP's text projection).
- Several pooled embeddings combine as Σ_k (e_k − null) + null.
"""

from __future__ import annotations

import torch

CONSTANT_NAMES = ("sos", "null", "deprojection")


def combine_embeddings(pooled: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """Σ_k (e_k − null) + null over dim -2: [..., K, D] -> [..., D] (K = 1 gives e itself)."""
    return (pooled - null).sum(dim=-2) + null
