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

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import save_file

from pipeline.base_files import BaseModelError
from pipeline.base_models import base_source, load_or_explain
from pipeline.errors import DeprojectorError, read_safetensors
from pipeline.world.config import WORLD_DIR

GAP_FILE = "modality_gap.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImagePromptError(DeprojectorError, ValueError):
    """An image prompt that cannot be used; the message names the file and what is wrong."""


# Pillow's own limit (about 89.5 million pixels); larger images are refused before decoding.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def read_image(path: str | Path, what: str = "image") -> Image.Image:
    """The one way the project reads an image file: decoded, and turned upright as its EXIF
    orientation says (a phone photo stored sideways is embedded the way it is shown).

    A missing file, a folder, a file Pillow cannot decode and a header claiming more than
    MAX_IMAGE_PIXELS pixels raise ImagePromptError naming `what` and the file."""
    path = Path(path)
    name = f"{what} {str(path)!r}"
    if path.is_dir():
        raise ImagePromptError(f"{name}: is a folder, expected an image file")
    if not path.is_file():
        raise ImagePromptError(f"{name}: no such file")
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it (we refuse those below, naming the
            # size) and raises above twice it, in open(), before we see the size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImagePromptError(_too_large(name, f"{width} × {height} = ",
                                                      width * height))
                image.load()
                upright = ImageOps.exif_transpose(image)
    except ImagePromptError:
        raise
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow checks in open()
        raise ImagePromptError(_too_large(name, "", int(found.group(1)) if found else None)) \
            from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImagePromptError(f"{name}: not an image file Pillow can read ({err})") from err
    return upright


def _too_large(name: str, size: str, pixels: int | None) -> str:
    claimed = f"{size}{pixels:,} pixels" if pixels else "a larger image"
    return (f"{name}: its header claims {claimed}, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} pixels (a corrupt or hostile file, or a picture far larger "
            "than CLIP's input: scale it down first)")


def load_image(path: str | Path) -> Image.Image:
    """An RGB image prompt, upright (read_image), or an ImagePromptError naming the file."""
    return checked_rgb(read_image(path, "image prompt"), str(path))


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
        advice = "run `deprojector gap` again to rewrite it"
        tensors = read_safetensors(file, ImagePromptError, advice)
        missing = {"mean_text", "mean_image", "text_norm"} - set(tensors)
        if missing:
            raise ImagePromptError(f"{file}: missing tensors {sorted(missing)}; {advice}")
        shapes = {k: tuple(v.shape) for k, v in sorted(tensors.items())}
        if len(shapes["mean_text"]) != 1 or shapes["mean_image"] != shapes["mean_text"] \
                or tensors["text_norm"].numel() != 1:
            raise ImagePromptError(f"{file}: tensors of shapes {shapes}, expected mean_text "
                                   f"[P], mean_image [P] and text_norm [1]; {advice}")
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
        caption = read_caption_text(caption_file)
        if not caption:
            raise ImagePromptError(f"{caption_file}: empty caption")
        images.append(read_image(file, "gap.folder image").convert("RGB"))
        captions.append(caption)
    return images, captions


def read_caption_text(path: Path) -> str:
    """The caption of a gap.folder pair: UTF-8 text without NUL bytes, whitespace-stripped."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ImagePromptError(
            f"{path}:{line}: not valid UTF-8 (byte offset {err.start} is "
            f"{data[err.start:err.start + 1]!r}); re-encode the caption as UTF-8") from err
    if "\x00" in text:
        offset = data.index(b"\x00")
        line = data.count(b"\n", 0, offset) + 1
        raise ImagePromptError(f"{path}:{line}: contains a NUL byte (byte offset {offset}); "
                               "expected UTF-8 text")
    return text.removeprefix("\ufeff").strip()
