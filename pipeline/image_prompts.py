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

import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.base_models import (
    BASE_DIR,
    BUILTIN,
    BaseModelError,
    ClipText,
    _from_pretrained,
    _source,
)
from pipeline.clip_encode import encode_texts
from pipeline.errors import DeprojectorError, read_safetensors

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
    def load(cls, name: str, device: str = "cpu", base_dir: Path = BASE_DIR) -> ImageTower:
        """The vision tower of `base.clip`; a text-only checkpoint fails naming the fix."""
        from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

        source = _source(name, "clip", base_dir)
        config = _from_pretrained(AutoConfig.from_pretrained, source, "clip")
        if getattr(config, "vision_config", None) is None:
            raise BaseModelError(
                f"base.clip {name!r} has no vision tower (its config.json is a "
                f"{config.model_type!r}, not a full 'clip' model): image prompts need a "
                "CLIPModel checkpoint with both towers, e.g. openai/clip-vit-large-patch14")
        model = _from_pretrained(CLIPVisionModelWithProjection.from_pretrained, source, "clip")
        processor = _from_pretrained(CLIPImageProcessor.from_pretrained, source, "clip")
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


# --- the gap stage --------------------------------------------------------------------------

def world_pairs(count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """`count` drawn world scenes with a caption each (a seed the world's training never used)."""
    from pipeline.world import scenes as world

    images, scenes = world.draw_scenes(count, seed)
    captioner = random.Random(seed)
    return ([Image.fromarray(image) for image in images],
            [world.caption(scene, captioner) for scene in scenes])


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


def measure_gap(clip: ClipText, tower: ImageTower, images: list[Image.Image],
                captions: list[str], batch: int = 64) -> tuple[ModalityGap, dict]:
    """The statistics and a summary: paired cosine before and after the correction."""
    text, image = [], []
    for begin in tqdm(range(0, len(images), batch), desc="gap", unit="batch"):
        text.append(encode_texts(clip, captions[begin:begin + batch]).text_embeds.float().cpu())
        image.append(tower.embed(images[begin:begin + batch]))
    text_embeds, image_embeds = torch.cat(text), torch.cat(image)
    gap = ModalityGap.measure(text_embeds, image_embeds)
    summary = {
        "pairs": len(captions),
        "gap_norm": (gap.mean_text - gap.mean_image).norm().item(),
        "text_norm": gap.text_norm,
        "image_norm": image_embeds.norm(dim=-1).mean().item(),
        "paired_cosine": F.cosine_similarity(text_embeds, image_embeds).mean().item(),
        "paired_cosine_corrected":
            F.cosine_similarity(text_embeds, gap.correct(image_embeds)).mean().item(),
    }
    return gap, summary


def run_gap_stage(base_clip: str, pairs: int, seed: int, folder: str, out_dir: Path,
                  device: str = "cpu") -> dict:
    """Write out_dir/modality_gap.safetensors and .json. Builtin: world scenes; a real CLIP:
    the pairs in `folder`, and without any only the .json saying so (image prompts then
    need --no-gap-correction)."""
    from pipeline.base_models import load_clip
    from pipeline.jsonio import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / GAP_FILE).unlink(missing_ok=True)
    builtin = base_clip == BUILTIN
    if not builtin and not pair_images(Path(folder)):
        summary = {"base_clip": base_clip, "computed": False,
                   "why": f"gap.folder {folder!r} has no image/caption pairs: image prompts "
                          "with this base.clip need --no-gap-correction until it has"}
        write_json(out_dir / "modality_gap.json", summary)
        return summary
    clip = load_clip(base_clip, device=device)
    tower = ImageTower.load(base_clip, device=device)
    images, captions = world_pairs(pairs, seed) if builtin \
        else folder_pairs(Path(folder), pairs)
    gap, summary = measure_gap(clip, tower, images, captions)
    gap.save(out_dir / GAP_FILE)
    summary = {"base_clip": base_clip, "computed": True,
               "source": f"world scenes (seed {seed})" if builtin else folder, **summary}
    write_json(out_dir / "modality_gap.json", summary)
    return summary


def scene_image(prompt: str, seed: int) -> Image.Image:
    """A drawn world scene that has everything `prompt` states (background, colours, shapes)."""
    from pipeline.world import scenes as world

    required = world.required_bits(world.parse_prompt(prompt))
    rng = random.Random(seed)
    for _ in range(200_000):
        scene = world.random_scene(rng)
        if world.scene_bits(scene) & required == required:
            offsets = [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in scene.things]
            return Image.fromarray(world.draw(scene, offsets))
    raise ImagePromptError(f"no world scene has everything {prompt!r} states")
