"""Images as prompts: the base CLIP's vision tower and the bridge across the modality gap.

An image enters the deprojector's pooled space as (docs/architectures.md, "Prompts beyond one
text")

    image_embeds  = visual_projection(vision tower(image))            [P]
    bridged       = bridge(image_embeds)                               [P], text space
    pooled        = bridged @ deprojection.T                           [D]

CLIP's image and text embeddings of the same thing sit in different regions of the projected
space (the "modality gap"). The bridges (`ModalityGap.correct`: none, mean shift, a linear map,
projection onto training captions' text embeddings) are fitted on paired data by the `gap`
stage: the world's drawn scenes and their captions for the builtin base, a folder or hub
dataset of image/caption pairs for a real CLIP (pipeline/pairs.py).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.atomic import save_tensors
from pipeline.base_files import BaseModelError
from pipeline.base_models import base_source, load_or_explain
from pipeline.errors import DeprojectorError, read_safetensors, special_kind
from pipeline.names import BRIDGES
from pipeline.world.config import WORLD_DIR

GAP_FILE = "modality_gap.safetensors"
GAP_SUMMARY = "modality_gap.json"  # the gap stage's summary (`computed`), written last


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
    if special_kind(path):
        raise ImagePromptError(f"{name}: is {special_kind(path)}, not a regular file; refused "
                               "without reading it")
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


def checked_rgb(image: Image.Image, name: str, what: str = "image prompt") -> Image.Image:
    """`image` if it is RGB, else an ImagePromptError naming `what` `name` and the mode."""
    if image.mode != "RGB":
        raise ImagePromptError(
            f"{what} {name!r} has mode {image.mode!r} "
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


# The linear bridge's ridge: λ = RIDGE · mean variance of the centred image embeddings; it keeps
# the fit stable when there are fewer pairs than dimensions (a small folder for CLIP-L).
RIDGE = 1e-2


@dataclass
class ModalityGap:
    """Statistics of paired text and image embeddings [P] and the bridges they define.

    A bridge maps image_embeds [N, P] to where the text_embeds of their captions lie:
    - `none`: as they are;
    - `mean-shift`: x − mean_image + mean_text (Liang et al. 2022, "Mind the Gap");
    - `linear`: (x − mean_image) A + mean_text, A [P, P] least squares of the centred text
      embeddings on the centred image embeddings with a ridge, in closed form;
    - `text-projection`: Σ_i softmax(cos(mean-shift(x), t_i) / temperature) t_i over `bank`
      [M, P], the unit text embeddings of training captions (DeCap, Li et al. 2023, projects
      onto its text memory the same way, on the raw image embedding);
    every bridge but `none` then scaled to the mean text norm. `bridge` is the default.
    """

    mean_text: torch.Tensor
    mean_image: torch.Tensor
    text_norm: float
    linear: torch.Tensor | None = None  # [P, P]
    bank: torch.Tensor | None = None  # [M, P], unit rows
    temperature: float = 0.01
    bridge: str = "mean-shift"

    def __post_init__(self) -> None:
        if self.bridge not in BRIDGES:
            raise ImagePromptError(f"unknown bridge {self.bridge!r} (known: "
                                   f"{', '.join(BRIDGES)})")

    def correct(self, image_embeds: torch.Tensor, bridge: str | None = None) -> torch.Tensor:
        """[..., P] image embeddings brought across the gap by `bridge` (None: the default)."""
        kind = bridge or self.bridge
        if kind not in BRIDGES:
            raise ImagePromptError(f"unknown bridge {kind!r} (known: {', '.join(BRIDGES)})")
        if kind == "none":
            return image_embeds
        centred = image_embeds - self.mean_image
        if kind == "mean-shift":
            bridged = centred + self.mean_text
        elif kind == "linear":
            bridged = centred @ self._needs("linear") + self.mean_text
        else:
            bank = self._needs("bank").to(centred)
            query = torch.nn.functional.normalize(centred + self.mean_text, dim=-1)
            bridged = torch.softmax(query @ bank.T / self.temperature, dim=-1) @ bank
        return bridged * (self.text_norm / bridged.norm(dim=-1, keepdim=True))

    def _needs(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ImagePromptError(f"these modality-gap statistics have no {name!r} tensor "
                                   "(written before that bridge existed): run `deprojector "
                                   "gap` again")
        return value

    @classmethod
    def measure(cls, text_embeds: torch.Tensor, image_embeds: torch.Tensor,
                bank: torch.Tensor | None = None, temperature: float = 0.01,
                bridge: str = "mean-shift") -> ModalityGap:
        """Fit every bridge on paired [N, P] embeddings; bank: text embeddings [M, P] of
        training captions for `text-projection` (normalised here)."""
        text, image = text_embeds.double(), image_embeds.double()
        x, y = image - image.mean(0), text - text.mean(0)
        gram = x.T @ x
        ridge = RIDGE * gram.trace() / gram.shape[0]
        linear = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype),
                                    x.T @ y)
        units = torch.nn.functional.normalize(bank.float(), dim=-1) if bank is not None else None
        return cls(text_embeds.mean(0), image_embeds.mean(0),
                   text_embeds.norm(dim=-1).mean().item(), linear.float(), units, temperature,
                   bridge)

    def save(self, path: Path) -> None:
        tensors = {"mean_text": self.mean_text.float().contiguous(),
                   "mean_image": self.mean_image.float().contiguous(),
                   "text_norm": torch.tensor([self.text_norm]),
                   "temperature": torch.tensor([self.temperature])}
        if self.linear is not None:
            tensors["linear"] = self.linear.float().contiguous()
        if self.bank is not None:  # unit vectors: half precision keeps them to 1e-3
            tensors["bank"] = self.bank.half().contiguous()
        save_tensors(path, tensors, metadata={"bridge": self.bridge})

    @classmethod
    def load(cls, path: str | Path) -> ModalityGap:
        path = Path(path)
        file = path / GAP_FILE if path.is_dir() else path
        if not file.is_file():
            raise ImagePromptError(
                f"{file}: no modality-gap statistics; run `deprojector gap` (the `gap` stage) "
                "for this base.clip, or use no bridge (--bridge none)")
        advice = "run `deprojector gap` again to rewrite it"
        tensors = read_safetensors(file, ImagePromptError, advice)
        missing = {"mean_text", "mean_image", "text_norm"} - set(tensors)
        if missing:
            raise ImagePromptError(f"{file}: missing tensors {sorted(missing)}; {advice}")
        shapes = {k: tuple(v.shape) for k, v in sorted(tensors.items())}
        width = shapes["mean_text"]
        if len(width) != 1 or shapes["mean_image"] != width \
                or tensors["text_norm"].numel() != 1 \
                or shapes.get("linear", width * 2) != width * 2 \
                or shapes.get("bank", (1, *width))[1:] != width:
            raise ImagePromptError(f"{file}: tensors of shapes {shapes}, expected mean_text "
                                   f"[P], mean_image [P], text_norm [1], linear [P, P] and "
                                   f"bank [M, P]; {advice}")
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            bridge = (handle.metadata() or {}).get("bridge", "mean-shift")
        temperature = tensors["temperature"].item() if "temperature" in tensors else 0.01
        bank = tensors["bank"].float() if "bank" in tensors else None
        return cls(tensors["mean_text"], tensors["mean_image"], tensors["text_norm"].item(),
                   tensors.get("linear"), bank, temperature, bridge)

    def with_bridge(self, bridge: str) -> ModalityGap:
        """The same statistics with another default bridge."""
        return dataclasses.replace(self, bridge=bridge)
