"""Scenes of the embedded world: drawn images with their ground truth, captions, prompt parsing.

A scene is a background colour and 1-3 objects, each a shape of a colour, a size and a place.
Captions describe scenes in the article's styles (tag lists with and without commas, short
phrases), with varying word order, synonyms and detail, so the comma-separated parts of a
prompt are captions on their own. `parse_prompt` reads any of them back into the attributes
it states; the judge's adherence score and CLIP's contrastive targets are built on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32  # px, square
SUPERSAMPLE = 4  # shapes are drawn 4x larger and averaged down: anti-aliased edges

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 5.0, "big": 8.0}  # radius in px
PLACES = {
    "left": (8, 16),
    "right": (24, 16),
    "top": (16, 8),
    "bottom": (16, 24),
    "centre": (16, 16),
}
COLOR_NAMES = tuple(COLORS)
PAIRS = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)  # the judge's object classes

# Words captions may use for a size or place; parse_prompt maps them back.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
PLACE_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on top"),
    "bottom": ("at the bottom", "below"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
RELATIONS = {  # (place of the first object, place of the second) -> phrase between them
    ("left", "right"): ("left of", "to the left of"),
    ("right", "left"): ("right of", "to the right of"),
    ("top", "bottom"): ("above", "over"),
    ("bottom", "top"): ("below", "under"),
}


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    size: str
    place: str


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]


@dataclass
class Stated:
    """What a prompt asks for: a background colour and objects (colour and/or shape)."""

    background: str | None = None
    objects: list[tuple[str | None, str | None]] = field(default_factory=list)

    def count(self) -> int:
        return int(self.background is not None) + len(self.objects)


# --- drawing ----------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r  # about the area of the circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def draw(scene: Scene, offsets: list[tuple[float, float]] | None = None) -> np.ndarray:
    """The scene as a uint8 [32, 32, 3] image; `offsets` jitter each object's centre (px)."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[scene.background])
    pen = ImageDraw.Draw(image)
    for k, thing in enumerate(scene.things):
        dx, dy = offsets[k] if offsets else (0.0, 0.0)
        x, y = PLACES[thing.place]
        cx, cy, r = (
            (x + dx) * SUPERSAMPLE,
            (y + dy) * SUPERSAMPLE,
            SIZES[thing.size] * SUPERSAMPLE,
        )
        if thing.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[thing.color])
        else:
            pen.polygon(_polygon(thing.shape, cx, cy, r), fill=COLORS[thing.color])
    small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def _fits(things: list[Thing]) -> bool:
    """No two objects overlap (their circles of radius `size` stay 1 px apart)."""
    for i, a in enumerate(things):
        for b in things[i + 1 :]:
            (ax, ay), (bx, by) = PLACES[a.place], PLACES[b.place]
            if np.hypot(ax - bx, ay - by) < SIZES[a.size] + SIZES[b.size] + 1:
                return False
    return True


def random_scene(rng: random.Random, max_things: int = 3) -> Scene:
    """A background and 1..max_things objects of distinct colour-shape pairs, not overlapping."""
    background = rng.choice(COLOR_NAMES)
    count = rng.randint(1, max_things)
    while True:
        places = rng.sample(list(PLACES), count)
        pairs = rng.sample([p for p in PAIRS if p[0] != background], count)
        things = [
            Thing(c, s, rng.choice(list(SIZES)), place)
            for (c, s), place in zip(pairs, places, strict=True)
        ]
        if _fits(things):
            return Scene(background, tuple(things))


def draw_scenes(count: int, seed: int, max_things: int = 3) -> tuple[np.ndarray, list[Scene]]:
    """`count` scenes and their images [count, 32, 32, 3] uint8; same seed, same scenes."""
    rng = random.Random(seed)
    scenes, images = [], np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(count):
        scene = random_scene(rng, max_things)
        offsets = [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in scene.things]
        images[i] = draw(scene, offsets)
        scenes.append(scene)
    return images, scenes


# --- captions -----------------------------------------------------------------------------


def _object_words(rng: random.Random, thing: Thing, p_size: float) -> str:
    size = rng.choice(SIZE_WORDS[thing.size]) + " " if rng.random() < p_size else ""
    return f"{size}{thing.color} {thing.shape}"


def _tags(rng: random.Random, scene: Scene) -> str:
    """`red circle blue square white background` or the same with commas, in varied order."""
    if rng.random() < 0.05:
        return f"{scene.background} background"  # a partial caption: only the background
    things = list(scene.things)
    rng.shuffle(things)
    if len(things) == 1 and rng.random() < 0.4:
        # One object: its attributes may come as separate tags (`star, yellow, big`), or only
        # some of them (`circle`, `red`, `big`), so single words are captions too.
        thing = things[0]
        attributes = [thing.shape, thing.color, rng.choice(SIZE_WORDS[thing.size])]
        tags = rng.sample(attributes, rng.randint(1, 3))
    else:
        tags = [_object_words(rng, t, 0.3) for t in things]
    if rng.random() < 0.7:
        background = f"{scene.background} background"
        tags = [background, *tags] if rng.random() < 0.3 else [*tags, background]
    return rng.choice([" ", ", "]).join(tags)


def _phrase(rng: random.Random, scene: Scene) -> str:
    """`a big red circle left of a small blue square on a white background` and the like."""
    things = list(scene.things)
    rng.shuffle(things)
    article = rng.choice(["a ", "one ", ""])
    pieces = []
    for k, thing in enumerate(things):
        words = f"{article}{_object_words(rng, thing, 0.5)}"
        if (
            k + 1 < len(things)
            and (thing.place, things[k + 1].place) in RELATIONS
            and rng.random() < 0.6
        ):
            relation = rng.choice(RELATIONS[(thing.place, things[k + 1].place)])
            pieces.append(f"{words} {relation}")
            continue
        if rng.random() < 0.4:
            words += " " + rng.choice(PLACE_PHRASES[thing.place])
        pieces.append(words + ("" if k + 1 == len(things) else " and"))
    text = " ".join(pieces)
    if rng.random() < 0.7:
        text += rng.choice([" on a ", " on ", ", "]) + f"{scene.background} background"
    return text


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of the scene in a random style."""
    return _tags(rng, scene) if rng.random() < 0.6 else _phrase(rng, scene)


def generate_captions(count: int, seed: int) -> list[str]:
    """`count` captions of fresh random scenes (duplicates possible); same seed, same list."""
    rng = random.Random(seed)
    return [caption(random_scene(rng), rng) for _ in range(count)]


# --- reading prompts back -----------------------------------------------------------------


def parse_prompt(prompt: str) -> Stated:
    """The background and objects a prompt of any caption style states.

    A colour before `background` is the background; a colour before a shape binds to it.
    Colours and shapes left unbound (`star, yellow`) pair up in order, and what remains is
    an object of only a colour or only a shape.
    """
    words = prompt.lower().replace(",", " ").split()
    stated = Stated()
    pending: str | None = None
    loose_colors: list[str] = []
    for k, word in enumerate(words):
        if word in COLORS:
            if k + 1 < len(words) and words[k + 1] == "background":
                stated.background = word
            else:
                if pending:
                    loose_colors.append(pending)
                pending = word
        elif word in SHAPES:
            stated.objects.append((pending, word))
            pending = None
    if pending:
        loose_colors.append(pending)
    objects = []
    for color, shape in stated.objects:
        if color is None and loose_colors:
            color = loose_colors.pop(0)
        objects.append((color, shape))
    stated.objects = objects + [(c, None) for c in loose_colors]
    return stated


# Each attribute a prompt can state is one bit: background colour, colour-shape pair, colour
# alone, shape alone. A scene satisfies a prompt when it has every bit the prompt requires.
_BITS = {("bg", c): i for i, c in enumerate(COLOR_NAMES)}
_BITS.update({("pair", c, s): len(_BITS) + i for i, (c, s) in enumerate(PAIRS)})
_BITS.update({("color", c): len(_BITS) + i for i, c in enumerate(COLOR_NAMES)})
_BITS.update({("shape", s): len(_BITS) + i for i, s in enumerate(SHAPES)})


def required_bits(stated: Stated) -> int:
    bits = 1 << _BITS[("bg", stated.background)] if stated.background else 0
    for color, shape in stated.objects:
        key = (
            ("pair", color, shape)
            if color and shape
            else ("color", color)
            if color
            else ("shape", shape)
        )
        bits |= 1 << _BITS[key]
    return bits


def scene_bits(scene: Scene) -> int:
    bits = 1 << _BITS[("bg", scene.background)]
    for t in scene.things:
        for key in (("pair", t.color, t.shape), ("color", t.color), ("shape", t.shape)):
            bits |= 1 << _BITS[key]
    return bits


def satisfies(scene_bits_: np.ndarray, required: np.ndarray) -> np.ndarray:
    """[S], [P] int64 bit sets -> [P, S] bool: does scene s have everything prompt p states."""
    return (scene_bits_[None, :] & required[:, None]) == required[:, None]
