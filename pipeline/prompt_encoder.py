"""The Python API: weighted text parts, images, interpolation and negatives -> prompt_embeds.

    from pipeline import PromptEncoder
    encoder = PromptEncoder.from_pretrained("models/vicinity-batch", clip="builtin")
    embeds = encoder.encode_prompt("red circle:1.2, blue square")          # [1, 77, D]
    image = pipe(prompt_embeds=embeds,
                 negative_prompt_embeds=encoder.encode_negative("")).images[0]

Every input becomes one pooled embedding e = Σ_k w_k (e_k − null) + null over its text parts
(prompt grammar: pipeline/prompts.py) and image parts (pipeline/image_prompts.py), which the
deprojector turns into the 77 hidden states a StableDiffusionPipeline takes as prompt_embeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.base_models import BASE_DIR, BUILTIN, ClipText, load_clip
from pipeline.conventions import combine_embeddings, interpolate_embeddings
from pipeline.image_prompts import (
    ImagePromptError,
    ImageTower,
    ModalityGap,
    checked_rgb,
    load_image,
)
from pipeline.models import Deprojector
from pipeline.prompts import (
    WEIGHT_NUMBER,
    ConditioningInfo,
    PromptError,
    conditioning,
    negative_conditioning,
    parse_weighted,
    weighted_embedding,
)

DEFAULT_GAP = Path("data/gap")  # where the `gap` stage writes the statistics


@dataclass
class ImagePart:
    """An image prompt: a file path or an RGB PIL image, and its weight."""

    image: str | Path | Image.Image
    weight: float = 1.0

    @classmethod
    def parse(cls, argument: str) -> ImagePart:
        """`PATH[:WEIGHT]` as the CLI's --image takes it (a path's own colons are kept
        unless what follows the last one is a number)."""
        path, colon, weight = argument.rpartition(":")
        if colon and path and WEIGHT_NUMBER.fullmatch(weight.strip()):
            return cls(path, float(weight))
        return cls(argument)

    @property
    def name(self) -> str:
        return "<PIL image>" if isinstance(self.image, Image.Image) else str(self.image)

    def load(self) -> Image.Image:
        if isinstance(self.image, Image.Image):
            return checked_rgb(self.image, self.name)
        return load_image(self.image)


class PromptEncoder:
    """A base CLIP (text tower; vision tower and gap statistics for image prompts) and a
    deprojector, turning prompts of any kind into Stable Diffusion conditioning."""

    def __init__(self, clip: ClipText, deprojector: Deprojector,
                 tower: ImageTower | None = None, gap: ModalityGap | None = None) -> None:
        deprojector.check_base(clip.hidden_size, clip.projection_size)
        self.clip, self.deprojector, self.tower, self.gap = clip, deprojector, tower, gap

    @classmethod
    def from_pretrained(cls, model: str | Path, clip: str = BUILTIN,
                        gap: str | Path | None = DEFAULT_GAP, images: bool = True,
                        device: str = "cpu", base_dir: Path = BASE_DIR) -> PromptEncoder:
        """The deprojector folder `model` with the base CLIP `clip` (`builtin`, a folder or
        a hub id). images: also load the vision tower and, when `gap` has them, the
        modality-gap statistics (image prompts without them need gap_correction=False)."""
        from pipeline.generation import load_checked_deprojector

        text = load_clip(clip, device=device, base_dir=base_dir)
        deprojector = load_checked_deprojector(Path(model), text, device)
        tower = ImageTower.load(clip, device, base_dir) if images else None
        stats = None
        if images and gap is not None and Path(gap).exists():
            stats = ModalityGap.load(gap)
        return cls(text, deprojector, tower, stats)

    # --- pooled space ---------------------------------------------------------------------

    def image_embedding(self, images: list[Image.Image], gap_correction: bool = True
                        ) -> torch.Tensor:
        """Pooled-space embeddings [N, D] of RGB images (vision tower, gap, pseudo-inverse)."""
        if self.tower is None:
            raise ImagePromptError("this PromptEncoder has no vision tower: load it with "
                                   "images=True (a base CLIP with both towers)")
        projected = self.tower.embed(images)
        if gap_correction:
            if self.gap is None:
                raise ImagePromptError(
                    "image prompts need the modality-gap statistics of this base CLIP: run "
                    "`deprojector gap` (writes data/gap/) and load them, or turn the "
                    "correction off (gap_correction=False, --no-gap-correction)")
            projected = self.gap.correct(projected)
        # image_embeds live where text_embeds = pooled @ W.T do: pooled = embeds @ pinv(W).T.
        return projected.to(self.deprojector.null) @ self.deprojector.deprojection.T

    def embedding(self, prompt: str = "", images: Sequence[ImagePart] = (),
                  gap_correction: bool = True) -> tuple[torch.Tensor, ConditioningInfo]:
        """e = Σ_k w_k (e_k − null) + null over the text parts and images: [1, D]."""
        null = self.deprojector.null
        info = ConditioningInfo("combined", [])
        pooled, weights = [], []
        if prompt.strip() or not images:
            parts = parse_weighted(prompt)
            info.parts = [p.text for p in parts]
            text_pooled, text_weights = weighted_embedding(parts, self.clip, null, info)
            pooled.append(text_pooled)
            weights.append(text_weights)
        if images:
            loaded = [part.load() for part in images]
            pooled.append(self.image_embedding(loaded, gap_correction))
            weights.append(torch.tensor([part.weight for part in images]).to(null))
            info.parts += [f"image {part.name}" for part in images]
        info.embeds = combine_embeddings(torch.cat(pooled), null, torch.cat(weights))[None]
        return info.embeds, info

    # --- conditioning ---------------------------------------------------------------------

    def encode_prompt(self, prompt: str = "", images: Sequence[ImagePart] = (),
                      gap_correction: bool = True) -> torch.Tensor:
        """prompt_embeds [1, 77, D] of a weighted prompt and/or image prompts."""
        return self.deprojector.generate(self.embedding(prompt, images, gap_correction)[0])

    def interpolate(self, start: torch.Tensor, end: torch.Tensor, ts: Sequence[float],
                    spherical: bool = False) -> torch.Tensor:
        """prompt_embeds [len(ts), 77, D] along start -> end (pooled [1, D] each), centred on
        null: linear, or spherical with `spherical`."""
        null = self.deprojector.null
        embeds = torch.cat([interpolate_embeddings(start, end, null, t, spherical) for t in ts])
        return self.deprojector.generate(embeds)

    def encode_negative(self, prompt: str = "", deproject: bool = True) -> torch.Tensor:
        """negative_prompt_embeds [1, 77, D]: deprojected like a prompt (weights allowed), or
        with deproject=False the ordinary CLIP states, as the pipeline's negative_prompt."""
        if not deproject:
            return conditioning(prompt, self.clip, None)[0] if prompt.strip() \
                else negative_conditioning(self.clip)
        if not prompt.strip():
            return self.deprojector.generate(self.deprojector.null[None])
        return self.encode_prompt(prompt)


__all__ = ["ImagePart", "PromptEncoder", "PromptError", "ImagePromptError"]
