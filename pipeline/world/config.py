"""Where the world lives and its settings (`world:` of params.yaml): sizes, steps and seeds.

Defined here, not with the pipeline's params, so the world imports nothing above itself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.core.sections import check

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
    # Where every part trains: cpu, cuda, cuda:N. Weights are byte-identical per device, not
    # across devices (float reductions differ); batches and noise are drawn on the CPU.
    device: str = "cpu"
    scenes: int = 20000  # drawn training scenes
    vocab_size: int = 1000  # BPE vocabulary trained on the captions
    width: int = 128  # D: the CLIP text tower's hidden size
    clip_steps: int = 1400
    clip_batch: int = 128
    clip_lr: float = 1e-3
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_width: int = 16  # channels (w, 2w, 2w) of the VAE's three levels
    vae_layers: int = 1  # ResNet blocks per level
    unet_steps: int = 3600
    unet_batch: int = 48
    unet_lr: float = 5e-4
    unet_width: int = 32  # channels (w, 2w, 2w) of the UNet's three levels
    unet_warmup: int = 100  # linear warm-up steps, then cosine decay to unet_lr / 10
    unet_ema_decay: float = 0.999  # of the saved moving average of the UNet's weights
    unet_min_snr_gamma: float = 0.0  # min-SNR-gamma loss weighting; 0 = plain MSE
    captions_per_scene: int = 1  # the UNet's caption bank, encoded once
    # Drawn scenes the UNet trains on: the first `scenes` of them are the CLIP's and VAE's,
    # the rest more of the same generator (fresh data against memorising the captions).
    unet_scenes: int = 20000
    judge_steps: int = 1500
    judge_batch: int = 64
    judge_lr: float = 1e-3
    # Share of the judge's training images that are VAE round trips (encode, decode) of the
    # drawn scenes instead of the drawings themselves: every picture passes through the VAE.
    judge_round_trips: float = 0.5
    held_out: int = 1000  # drawn scenes of another seed for the judge's and CLIP's accuracy

    def validate(self) -> WorldParams:
        """Raise ParamsError naming the first `world.KEY` out of range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("unet_min_snr_gamma", "judge_round_trips"):
                check(value >= 0, f"world.{f.name}", "at least 0", value)
            elif f.name not in ("seed", "device"):
                check(value > 0, f"world.{f.name}", "positive", value)
        check(
            self.device == "cpu" or self.device.split(":")[0] in ("cuda", "mps"),
            "world.device",
            "cpu, cuda, cuda:N or mps",
            self.device,
        )
        check(
            self.judge_round_trips <= 1,
            "world.judge_round_trips",
            "at most 1",
            self.judge_round_trips,
        )
        check(self.unet_ema_decay < 1, "world.unet_ema_decay", "below 1", self.unet_ema_decay)
        check(
            self.vae_width % 8 == 0,
            "world.vae_width",
            "a multiple of 8 (8 norm groups)",
            self.vae_width,
        )
        check(
            self.unet_width % 16 == 0,
            "world.unet_width",
            "a multiple of 16 (16 norm groups)",
            self.unet_width,
        )
        for part in ("clip", "vae", "unet", "judge"):
            batch, pool = (
                getattr(self, f"{part}_batch"),
                "unet_scenes" if part == "unet" else "scenes",
            )
            check(
                batch <= getattr(self, pool),
                f"world.{part}_batch",
                f"at most world.{pool} = {getattr(self, pool)}",
                batch,
            )
        check(self.width % 4 == 0, "world.width", "a multiple of 4 (4 attention heads)", self.width)
        return self
