"""Each run's PromptEncoder: a deprojector folder wired to the base CLIP (and its vision tower and
bridges when it takes image prompts)."""

from __future__ import annotations

from pathlib import Path

from pipeline.base.loaders import load_clip
from pipeline.base.vision import ImageTower
from pipeline.config.params import Params
from pipeline.core.names import REFERENCE
from pipeline.models import load_deprojector
from pipeline.prompting.bridges import ModalityGap
from pipeline.prompting.encoder import PromptEncoder


def load_encoders(
    params: Params, models_dir: Path, gap_dir: Path | None = None, device: str = "cpu"
) -> dict[str, PromptEncoder]:
    """The prompt encoder of every row: REFERENCE (base.clip alone, no deprojector), then one
    per run of `models:` (models_dir/NAME, checked against base.clip and extract.clip_skip: a
    run trained on another clip skip is refused). With gap_dir: the
    vision tower and the modality-gap statistics, for image prompts."""
    clip = load_clip(params.base.clip, device=device, clip_skip=params.extract.clip_skip)
    tower = ImageTower.load(params.base.clip, device) if gap_dir is not None else None
    gap = ModalityGap.load(gap_dir).with_bridge(params.gap.bridge) if gap_dir is not None else None
    reference = PromptEncoder(clip, None, tower, gap)
    return {
        REFERENCE: reference,
        **{
            name: reference.with_deprojector(load_deprojector(models_dir / name, device))
            for name in params.models
        },
    }
