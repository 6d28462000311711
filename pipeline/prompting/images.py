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
dataset of image/caption pairs for a real CLIP (pipeline/data/pairs.py).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.errors import DeprojectorError, special_kind


class ImagePromptError(DeprojectorError, ValueError):
    """An image prompt that cannot be used; the message names the file and what is wrong."""


# Pillow's own limit (about 89.5 million pixels); larger images are refused before decoding.
# (Pillow's None, no limit, is never set here: its default then.)
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 1024 * 1024 * 1024 // 4 // 3


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
        raise ImagePromptError(
            f"{name}: is {special_kind(path)}, not a regular file; refused without reading it"
        )
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
                    raise ImagePromptError(
                        _too_large(name, f"{width} × {height} = ", width * height)
                    )
                image.load()
                upright = ImageOps.exif_transpose(image)
    except ImagePromptError:
        raise
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow checks in open()
        raise ImagePromptError(
            _too_large(name, "", int(found.group(1)) if found else None)
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImagePromptError(f"{name}: not an image file Pillow can read ({err})") from err
    return upright


def _too_large(name: str, size: str, pixels: int | None) -> str:
    claimed = f"{size}{pixels:,} pixels" if pixels else "a larger image"
    return (
        f"{name}: its header claims {claimed}, more than the limit of "
        f"{MAX_IMAGE_PIXELS:,} pixels (a corrupt or hostile file, or a picture far larger "
        "than CLIP's input: scale it down first)"
    )


def load_image(path: str | Path) -> Image.Image:
    """An RGB image prompt, upright (read_image), or an ImagePromptError naming the file."""
    return checked_rgb(read_image(path, "image prompt"), str(path))


def checked_rgb(image: Image.Image, name: str, what: str = "image prompt") -> Image.Image:
    """`image` if it is RGB, else an ImagePromptError naming `what` `name` and the mode."""
    if image.mode != "RGB":
        raise ImagePromptError(
            f"{what} {name!r} has mode {image.mode!r} "
            f"({'an alpha channel' if 'A' in image.mode else 'not three colour channels'}), "
            "not RGB: convert it first, e.g. Image.open(path).convert('RGB').save(new_path)"
        )
    return image
