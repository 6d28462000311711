"""Losses and metrics over [B, 77, D] hidden-state sequences (docs/architectures.md).

Position 0 (sos) is prepended by every deprojector, never predicted, so it is left out.
Targets may be stored as float16; they are compared in the prediction's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} differ in shape")
    return target.to(pred.dtype)


def position_weights(mask: torch.Tensor, mask_weight: float = 25.0) -> torch.Tensor:
    """[B, 77] weights: mask_weight inside the attention mask, 1 on padding, 0 at position 0,
    each row scaled to mean 1 (so captions of any length weigh the same in a batch)."""
    weights = torch.where(mask.bool(), float(mask_weight), 1.0)
    weights[:, 0] = 0.0
    return weights / weights.mean(dim=1, keepdim=True)


def weighted_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    mask_weight: float = 25.0,
    per_row: bool = False,
) -> torch.Tensor:
    """Mean over batch, positions and D of position weight x squared error ([B]: each row's
    mean over positions and D, with per_row)."""
    target = _check(pred, target)
    weights = position_weights(mask, mask_weight).to(pred)
    error = weights[..., None] * (pred - target) ** 2
    return error.mean(dim=(1, 2)) if per_row else error.mean()


def mse(pred: torch.Tensor, target: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Unweighted mean squared error over positions 1..76 ([B] per row, with per_row)."""
    target = _check(pred, target)
    error = (pred[:, 1:] - target[:, 1:]) ** 2
    return error.mean(dim=(1, 2)) if per_row else error.mean()


def cosine_per_position(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, 77] cosine similarity along D."""
    target = _check(pred, target)
    return F.cosine_similarity(pred.float(), target.float(), dim=-1)


def predicted_in_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, 77] float: 1 at the in-mask positions a deprojector predicts (1..n; not sos)."""
    inside = mask.float().clone()
    inside[:, 0] = 0.0
    return inside


def masked_cosine_terms(
    cosine: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row [B]: the sum of the cosines [B, 77] over its in-mask positions 1..n, and n."""
    inside = predicted_in_mask(mask).to(cosine)
    return (cosine * inside).sum(dim=1), inside.sum(dim=1)


def masked_cosine(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over the in-mask positions 1..n of every row: Σ over rows of
    the in-mask cosine sums / Σ of their counts (a row with more tokens weighs more)."""
    total, count = masked_cosine_terms(cosine_per_position(pred, target), mask)
    return total.sum() / count.sum()
