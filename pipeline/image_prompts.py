"""Images as prompts: the base CLIP's vision tower, the modality-gap correction, and its stats.

An image enters the deprojector's pooled space as (docs/architectures.md, "Prompts beyond one
text")

    image_embeds  = visual_projection(vision tower(image))            [P]
    corrected     = image_embeds − mean_image + mean_text              (shift across the gap)
    corrected    *= text_norm / |corrected|                            (norm of text embeds)
    pooled        = corrected @ deprojection.T                          [D]

CLIP's image and text embeddings of the same thing sit in different regions of the projected
space (the "modality gap"); the shift and the norm are measured on paired data by the `gap`
stage: the world's drawn scenes and their captions for the builtin base, a folder of
image/caption pairs for a real CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from pipeline.base_files import BaseModelError
from pipeline.base_models import base_source, load_or_explain
from pipeline.errors import DeprojectorError
from pipeline.world.config import WORLD_DIR

GAP_FILE = "modality_gap.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImagePromptError(DeprojectorError, ValueError):
    """An image prompt that cannot be used; the message names the file and what is wrong."""


def load_image(path: str | Path) -> Image.Image:
    """An RGB image file, or an ImagePromptError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ImagePromptError(f"image prompt {str(path)!r}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ImagePromptError(f"image prompt {str(path)!r}: not an image file Pillow can "
                               f"read ({err})") from err
    return checked_rgb(image, str(path))


def checked_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode != "RGB":
        raise ImagePromptError(
            f"image prompt {name!r} has mode {image.mode!r} "
            f"({'an alpha channel' if 'A' in image.mode else 'not three colour channels'}), "
            "not RGB: convert it first, e.g. Image.open(path).convert('RGB').save(new_path)")
    return image


@dataclass
class ImageTower:
    """The base CLIP's vision tower with projection and its image processor."""

    model: object  # transformers.CLIPVisionModelWithProjection
    processor: object  # transformers.CLIPImageProcessor

    @classmethod
    def load(cls, name: str, device: str = "cpu", base_dir: Path = WORLD_DIR) -> ImageTower:
        """The vision tower of `base.clip`; a text-only checkpoint fails naming the fix."""
        from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

        source = base_source(name, "clip", base_dir)
        config = load_or_explain(AutoConfig.from_pretrained, source, "clip")
        if getattr(config, "vision_config", None) is None:
            raise BaseModelError(
                f"base.clip {name!r} has no vision tower (its config.json is a "
                f"{config.model_type!r}, not a full 'clip' model): image prompts need a "
                "CLIPModel checkpoint with both towers, e.g. openai/clip-vit-large-patch14")
        model = load_or_explain(CLIPVisionModelWithProjection.from_pretrained, source, "clip")
        processor = load_or_explain(CLIPImageProcessor.from_pretrained, source, "clip")
        return cls(model.to(device).eval(), processor)

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """image_embeds [N, P] (projected, not normalised) of RGB images."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(self.model.device)).image_embeds.float().cpu()


@dataclass
class ModalityGap:
    """Means of paired text and image embeddings [P] and the mean text-embedding norm."""

    mean_text: torch.Tensor
    mean_image: torch.Tensor
    text_norm: float

    def correct(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[..., P] image embeddings moved across the gap and scaled to the text norm."""
        shifted = image_embeds - self.mean_image + self.mean_text
        return shifted * (self.text_norm / shifted.norm(dim=-1, keepdim=True))

    @classmethod
    def measure(cls, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> ModalityGap:
        return cls(text_embeds.mean(0), image_embeds.mean(0),
                   text_embeds.norm(dim=-1).mean().item())

    def save(self, path: Path) -> None:
        save_file({"mean_text": self.mean_text.float().contiguous(),
                   "mean_image": self.mean_image.float().contiguous(),
                   "text_norm": torch.tensor([self.text_norm])}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> ModalityGap:
        path = Path(path)
        file = path / GAP_FILE if path.is_dir() else path
        if not file.is_file():
            raise ImagePromptError(
                f"{file}: no modality-gap statistics; run `deprojector gap` (the `gap` stage) "
                "for this base.clip, or turn the correction off (--no-gap-correction)")
        tensors = load_file(str(file))
        missing = {"mean_text", "mean_image", "text_norm"} - set(tensors)
        if missing:
            raise ImagePromptError(f"{file}: missing tensors {sorted(missing)}")
        return cls(tensors["mean_text"], tensors["mean_image"], tensors["text_norm"].item())


# --- paired data ------------------------------------------------------------------------------

def pair_images(folder: Path) -> list[Path]:
    """The image files of `folder`, sorted ([] if it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def folder_pairs(folder: Path, limit: int) -> tuple[list[Image.Image], list[str]]:
    """Image files of `folder` (sorted) with the caption in the .txt file of the same stem."""
    files = pair_images(folder)[:limit]
    if not files:
        raise ImagePromptError(f"gap.folder {str(folder)!r} has no images "
                               f"({', '.join(IMAGE_SUFFIXES)}) with captions beside them")
    images, captions = [], []
    for file in files:
        caption_file = file.with_suffix(".txt")
        if not caption_file.is_file():
            raise ImagePromptError(f"{file}: no caption file {caption_file.name} beside it "
                                   "(gap.folder pairs each image with NAME.txt)")
        caption = caption_file.read_text(encoding="utf-8").strip()
        if not caption:
            raise ImagePromptError(f"{caption_file}: empty caption")
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
        captions.append(caption)
    return images, captions
