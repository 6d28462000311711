"""The world's VAE: a small `AutoencoderKL`, 32 x 32 x 3 <-> 8 x 8 x 4, trained as SD's was.

Reconstruction (L1) plus a tiny KL term; the latent scaling factor is measured on the data
(1 / std of the latents), as SD's 0.18215 was. `round_trip` is what every generated picture
passes through last (decode), and what the judge trains on beside the crisp drawings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from pipeline.world import scenes as world
from pipeline.world.loop import step_generators, train_steps


def vae_channels(width: int) -> tuple[int, int, int]:
    """Three levels (32 -> 8 px latents) of width, 2 x width, 2 x width channels."""
    return (width, 2 * width, 2 * width)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> float [N, 3, 32, 32] in [-1, 1], the pipeline's pixel range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, 32, 32] in [-1, 1] -> uint8 [N, 32, 32, 3], rounded as the pipeline's
    image processor rounds."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def build_vae(width: int, layers: int, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    channels = vae_channels(width)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=layers,
        block_out_channels=channels,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        sample_size=world.IMAGE_SIZE,
    )


def train_vae(
    vae: AutoencoderKL,
    images: np.ndarray,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    checkpoint: Path,
    kl_weight: float = 1e-6,
    device: str = "cpu",
) -> list[float]:
    """Train on `device`; batches and noise are drawn on the CPU (the same on every device)."""
    vae.to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def step_fn(step: int) -> torch.Tensor:
        rng, gen = step_generators(seed, step)
        x = to_unit(images[rng.choice(len(images), batch, replace=False)]).to(device)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=gen).to(device)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        # L1, as SD's autoencoder was trained with: sharper edges than squared error.
        return F.l1_loss(reconstruction, x) + kl_weight * posterior.kl().mean()

    vae.train()
    return train_steps("world: VAE", {"vae": vae}, optimizer, steps, lr, step_fn, checkpoint)


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images: np.ndarray, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, 4, 8, 8] of every image (on the CPU)."""
    vae.eval()
    means, stds = [], []
    for begin in range(0, len(images), batch):
        x = to_unit(images[begin : begin + batch]).to(vae.device)
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def measure_scaling_factor(means: torch.Tensor, stds: torch.Tensor, seed: int) -> float:
    """1 / std of sampled latents, rounded to 5 digits (SD 1.x: 0.18215)."""
    gen = torch.Generator().manual_seed(seed)
    sample = means + stds * torch.randn(means.shape, generator=gen)
    return round(1.0 / sample.std().item(), 5)


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 [N, 32, 32, 3]: each image encoded (posterior mean) and decoded."""
    vae.eval()
    out = []
    for begin in range(0, len(images), batch):
        x = to_unit(images[begin : begin + batch]).to(vae.device)
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images, rounded to 3 decimals."""
    mse = np.mean((images.astype(np.float64) - reconstructions.astype(np.float64)) ** 2)
    return round(float(10 * np.log10(255.0**2 / max(mse, 1e-12))), 3)
