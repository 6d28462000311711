"""Where the world lives and its settings (`world:` of params.yaml): sizes, steps and seeds.

Defined here, not with the pipeline's params, so the world imports nothing above itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.sections import check

WORLD_DIR = Path("models/world")  # the world stage's output, in the project's root
# The world of the checkout this package runs from: where `builtin` resolves outside a
# project root, so that a saved deprojector of the builtin base loads from any directory.
CHECKOUT_WORLD_DIR = Path(__file__).resolve().parents[2] / WORLD_DIR


def locate(folder: str | Path = WORLD_DIR) -> Path:
    """`folder`; the default models/world falls back to the checkout's when the working
    directory has none."""
    folder = Path(folder)
    if folder == WORLD_DIR and not folder.is_dir() and CHECKOUT_WORLD_DIR.is_dir():
        return CHECKOUT_WORLD_DIR
    return folder


@dataclass(frozen=True)
class WorldParams:
    """The embedded world (pipeline/world/): sizes, steps and seeds of its trained parts."""

    seed: int = 0
    scenes: int = 20000  # drawn training scenes
    vocab_size: int = 1000  # BPE vocabulary trained on the captions
    width: int = 128  # D: the CLIP text tower's hidden size
    clip_steps: int = 1400
    clip_batch: int = 128
    clip_lr: float = 1e-3
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 3600
    unet_batch: int = 48
    unet_lr: float = 5e-4
    captions_per_scene: int = 1  # the UNet's caption bank, encoded once
    judge_steps: int = 1500
    judge_batch: int = 64
    judge_lr: float = 1e-3
    held_out: int = 1000  # drawn scenes of another seed for the judge's and CLIP's accuracy

    def validate(self) -> WorldParams:
        """Raise ParamsError naming the first `world.KEY` out of range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "seed":
                check(value > 0, f"world.{f.name}", "positive", value)
        for part in ("clip", "vae", "unet", "judge"):
            batch = getattr(self, f"{part}_batch")
            check(batch <= self.scenes, f"world.{part}_batch",
                  f"at most world.scenes = {self.scenes}", batch)
        check(self.width % 4 == 0, "world.width", "a multiple of 4 (4 attention heads)",
              self.width)
        return self
