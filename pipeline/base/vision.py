"""The base CLIP's vision tower: images -> projected image embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.base.files import BaseModelError
from pipeline.base.loaders import base_source, load_or_explain, quiet_loading
from pipeline.world.config import WORLD_DIR


@dataclass
class ImageTower:
    """The base CLIP's vision tower with projection and its image processor."""

    model: object  # transformers.CLIPVisionModelWithProjection
    processor: object  # transformers.CLIPImageProcessor

    @classmethod
    def load(cls, name: str, device: str = "cpu", base_dir: Path = WORLD_DIR) -> ImageTower:
        """The vision tower of `base.clip`; a text-only checkpoint fails naming the fix."""
        with quiet_loading():  # transformers 5 without torchvision: a fallback notice
            from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

        source = base_source(name, "clip", base_dir)
        config = load_or_explain(AutoConfig.from_pretrained, source, "clip")
        if getattr(config, "vision_config", None) is None:
            raise BaseModelError(
                f"base.clip {name!r} has no vision tower (its config.json is a "
                f"{config.model_type!r}, not a full 'clip' model): image prompts need a "
                "CLIPModel checkpoint with both towers, e.g. openai/clip-vit-large-patch14"
            )
        model = load_or_explain(CLIPVisionModelWithProjection.from_pretrained, source, "clip")
        processor = load_or_explain(CLIPImageProcessor.from_pretrained, source, "clip")
        return cls(model.to(device).eval(), processor)

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """image_embeds [N, P] (projected, not normalised) of RGB images, on the CPU in the
        tower's dtype (float32 unless the caller converted the model)."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.model.device, self.model.dtype)
        return self.model(pixel_values=pixels).image_embeds.cpu()
