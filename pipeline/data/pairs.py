"""Paired images and captions: the bridge's statistics (`gap` stage) and image rows (`extract`).

Three sources, one interface (`Pairs`: an id, a caption and an RGB image per pair):
- the embedded world: drawn scenes with a caption each, for a seed (`WorldPairs`);
- a folder of images with a caption file beside each, NAME.png/.jpg + NAME.txt (`FolderPairs`);
- a `datasets` hub id with an image and a text column, e.g. a COCO-captions-style set
  (`HubPairs`; network needed, or the local `datasets` cache).

Captions are read and checked when the source opens; images when they are asked for, so a bad
image file fails the shard that needs it, naming the file, after every earlier shard is written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from pipeline.config.params import GapParams
from pipeline.core.errors import regular_file
from pipeline.prompting.images import ImagePromptError, checked_rgb, read_image
from pipeline.world.embedded import World

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Pairs:
    """`len(pairs)` pairs; `ids[k]` names pair k (with its content hash where it has a file),
    `captions[k]` its caption, `image(k)` its RGB image."""

    ids: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, k: int) -> Image.Image:
        raise NotImplementedError

    def images(self, ks: list[int]) -> list[Image.Image]:
        return [self.image(k) for k in ks]


class WorldPairs(Pairs):
    """`count` drawn world scenes of `seed` with a caption each (World.pairs)."""

    def __init__(self, count: int, seed: int) -> None:
        self._images, self.captions = World.pairs(count, seed)
        self.ids = [f"world scene {k} of seed {seed}" for k in range(count)]

    def image(self, k: int) -> Image.Image:
        return self._images[k]


def pair_images(folder: Path) -> list[Path]:
    """The image files of `folder`, sorted ([] if it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class FolderPairs(Pairs):
    """The images of `folder` (sorted by name) with the caption in NAME.txt beside each.

    Every caption is read when the folder opens: an image without its caption file, a
    caption file without its image, an empty or non-UTF-8 caption raise ImagePromptError
    naming the file (and line)."""

    def __init__(self, folder: Path, limit: int | None = None) -> None:
        folder = Path(folder)
        self.files = pair_images(folder)[:limit]
        if not self.files:
            raise ImagePromptError(
                f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) with "
                "a NAME.txt caption beside each"
            )
        if limit is None:
            with_image = {f.stem for f in self.files}
            orphans = sorted(
                p
                for p in folder.glob("*.txt")
                if p.stem not in with_image and p.name != "README.txt"
            )
            if orphans:
                raise ImagePromptError(
                    f"{orphans[0]}: a caption without an image {orphans[0].stem}.png/.jpg beside it"
                )
        self.captions = []
        for file in self.files:
            regular_file(file, ImagePromptError, "image")  # a FIFO or device is not read
            caption_file = file.with_suffix(".txt")
            if not caption_file.is_file():
                raise ImagePromptError(
                    f"{file}: no caption file {caption_file.name} beside "
                    "it (each image pairs with NAME.txt)"
                )
            caption = read_caption_text(caption_file)
            if not caption:
                raise ImagePromptError(f"{caption_file}:1: empty caption")
            self.captions.append(caption)
        self.ids = [f"{file.name} sha256:{_sha256(file)[:16]}" for file in self.files]

    def image(self, k: int) -> Image.Image:
        return checked_rgb(
            read_image(self.files[k], "paired image"), str(self.files[k]), "paired image"
        )


class HubPairs(Pairs):
    """Rows of a `datasets` hub dataset (split `split`) with an image and a text column."""

    def __init__(self, name: str, split: str, image_column: str, text_column: str) -> None:
        import datasets

        try:
            self.dataset = datasets.load_dataset(name, split=split)
        except Exception as err:  # datasets raises many types; all mean "cannot get it"
            raise ImagePromptError(
                f"gap.source: cannot load the hub dataset {name!r} (split {split!r}): {err}. "
                "Offline, save its images with a NAME.txt caption each into a folder and "
                "point gap.source to it"
            ) from err
        for column, key in ((image_column, "image_column"), (text_column, "text_column")):
            if column not in self.dataset.column_names:
                raise ImagePromptError(
                    f"gap.source {name!r}: no column {column!r} (columns: "
                    f"{', '.join(self.dataset.column_names)}); set gap.{key}"
                )
        self.name, self.image_column = name, image_column
        self.captions = []
        for row, text in enumerate(self.dataset[text_column]):
            if isinstance(text, list):  # COCO-style: several captions per image, take the first
                text = text[0] if text else ""
            if not isinstance(text, str) or not text.strip():
                raise ImagePromptError(
                    f"gap.source {name!r}: row {row}, column {text_column!r}: no caption ({text!r})"
                )
            self.captions.append(" ".join(text.split()))
        self.ids = [f"{name}[{split}][{row}]" for row in range(len(self.captions))]

    def image(self, k: int) -> Image.Image:
        image = self.dataset[k][self.image_column]
        if not isinstance(image, Image.Image):
            raise ImagePromptError(
                f"gap.source {self.name!r}: row {k}, column "
                f"{self.image_column!r} holds {type(image).__name__}, "
                "expected an image"
            )
        return checked_rgb(image, self.ids[k], "paired image")


def open_pairs(g: GapParams) -> Pairs | None:
    """A real CLIP's paired data: the folder or hub dataset `gap.source` (None when it is a
    folder without any image, or neither). The builtin base uses WorldPairs instead."""
    path = Path(g.source)
    if path.exists():
        return FolderPairs(path) if pair_images(path) else None
    if "/" in g.source and not g.source.startswith((".", "/")) and not path.parent.exists():
        return HubPairs(g.source, g.hub_split, g.image_column, g.text_column)
    return None


def _sha256(path: Path) -> str:
    """The content hash of a regular file, read in blocks (memory flat in its size)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_caption_text(path: Path) -> str:
    """The caption of a folder pair: UTF-8 text without NUL bytes, whitespace-stripped."""
    data = regular_file(path, ImagePromptError, "caption").read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ImagePromptError(
            f"{path}:{line}: not valid UTF-8 (byte offset {err.start} is "
            f"{data[err.start : err.start + 1]!r}); re-encode the caption as UTF-8"
        ) from err
    if "\x00" in text:
        offset = data.index(b"\x00")
        line = data.count(b"\n", 0, offset) + 1
        raise ImagePromptError(
            f"{path}:{line}: contains a NUL byte (byte offset {offset}); expected UTF-8 text"
        )
    return text.removeprefix("\ufeff").strip()
