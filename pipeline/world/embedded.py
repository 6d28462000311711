"""The embedded world as the pipeline sees it: one object, asked once per stage.

`World.of(base.clip, base.sd)` says whether the base models are the world's (both `builtin`)
and, if so, provides what only the world has: its captions, held-out scenes and prompts,
drawn scenes for image prompts, image/caption pairs and where its judge is. Stages never test
`== "builtin"` themselves, and the world imports nothing of the pipeline above it.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from pipeline.core.conventions import BUILTIN
from pipeline.core.errors import DeprojectorError
from pipeline.world import scenes
from pipeline.world.config import WORLD_DIR, locate


class WorldError(DeprojectorError, ValueError):
    """A request the world cannot serve (e.g. a prompt no drawn scene can show)."""


class World:
    """The trained world in `folder` (clip/, sd/, judge/, world.json)."""

    def __init__(self, folder: str | Path = WORLD_DIR) -> None:
        self.folder = locate(folder)

    @staticmethod
    def named(clip: str, sd: str) -> bool:
        """Do base.clip and base.sd name the world? (The one rule: both `builtin`.)"""
        return clip == BUILTIN and sd == BUILTIN

    @classmethod
    def of(cls, clip: str, sd: str, folder: str | Path = WORLD_DIR) -> World | None:
        return cls(folder) if cls.named(clip, sd) else None

    @property
    def judge_folder(self) -> Path:
        """The judge (pipeline.world.judge.Judge.from_pretrained). Not loaded here: the
        stages that use the world's text and scenes alone (captions, gap, extract) do not
        import, and so do not depend on, the judge's code."""
        return self.folder / "judge"

    # --- text -----------------------------------------------------------------------------

    @staticmethod
    def captions(count: int, seed: int) -> list[str]:
        """`count` captions of fresh random scenes (duplicates possible), seeded."""
        return scenes.generate_captions(count, seed)

    @staticmethod
    def describe(scene: scenes.Scene, separator: str) -> str:
        """Every object's colour and shape, then the background, as tags joined by
        `separator` (" ": one embedding; ", ": comma-combined parts)."""
        tags = [f"{t.color} {t.shape}" for t in scene.things]
        return separator.join([*tags, f"{scene.background} background"])

    @classmethod
    def held_out_scenes(
        cls, count: int, seed: int, exclude: set[str], distinct: bool = False
    ) -> list[scenes.Scene]:
        """`count` fresh scenes whose full descriptions are not in `exclude`; `distinct`: and
        differ from each other (a repeated description is skipped; the first 48 of seeds 0
        and 1 have none, so they are the same either way)."""
        rng = random.Random(f"adherence-{seed}")
        found: list[scenes.Scene] = []
        seen: set[str] = set()
        while len(found) < count:
            scene = scenes.random_scene(rng)
            text = cls.describe(scene, " ")
            if (
                text not in exclude
                and not (distinct and text in seen)
                and cls.describe(scene, ", ") not in exclude
            ):
                found.append(scene)
                seen.add(text)
        return found

    @classmethod
    def held_out_prompts(
        cls, count: int, seed: int, exclude: set[str], distinct: bool = False
    ) -> dict[str, list[str]]:
        """`count` prompts per kind describing fresh scenes in full: tags without commas
        (`single`) and with commas (`multi`). Plain text prompts: any base CLIP can take them."""
        held_out = cls.held_out_scenes(count, seed, exclude, distinct)
        return {
            "single": [cls.describe(s, " ") for s in held_out],
            "multi": [cls.describe(s, ", ") for s in held_out],
        }

    # --- pictures -------------------------------------------------------------------------

    @staticmethod
    def draw(drawn: list[scenes.Scene], seed: int) -> list[Image.Image]:
        """The scenes drawn with seeded jitter of each object's place (32 x 32 RGB)."""
        rng = random.Random(seed)
        return [
            Image.fromarray(
                scenes.draw(scene, [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in scene.things])
            )
            for scene in drawn
        ]

    @staticmethod
    def scene_for(prompt: str, seed: int) -> Image.Image:
        """A drawn scene that has everything `prompt` states (background, colours, shapes)."""
        required = scenes.required_bits(scenes.parse_prompt(prompt))
        rng = random.Random(seed)
        for _ in range(200_000):
            scene = scenes.random_scene(rng)
            if scenes.scene_bits(scene) & required == required:
                offsets = [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in scene.things]
                return Image.fromarray(scenes.draw(scene, offsets))
        raise WorldError(f"no world scene has everything {prompt!r} states")

    @staticmethod
    def pairs(count: int, seed: int) -> tuple[list[Image.Image], list[str]]:
        """`count` drawn scenes with a caption each (for a seed the world never trained on)."""
        images, drawn = scenes.draw_scenes(count, seed)
        captioner = random.Random(seed)
        return (
            [Image.fromarray(image) for image in images],
            [scenes.caption(scene, captioner) for scene in drawn],
        )

    @staticmethod
    def objects(prompt: str) -> int:
        """How many objects `prompt` states."""
        return len(scenes.parse_prompt(prompt).objects)
