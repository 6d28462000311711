"""The world's Stable Diffusion: a small `AutoencoderKL` and `UNet2DConditionModel` trained as
SD 1.x was, saved as an ordinary `StableDiffusionPipeline` folder.

- VAE: 32 x 32 x 3 <-> 8 x 8 x 4, reconstruction (L1) plus a tiny KL term; the latent scaling
  factor is measured on the data (1 / std of the latents), as SD's 0.18215 was.
- UNet: noise (epsilon) prediction on scaled latents at SD 1.x's noise schedule, conditioned
  on the *frozen* CLIP text tower's last hidden state at all 77 positions (padded with EOS, no
  attention mask, exactly as the pipeline encodes prompts); the caption is dropped to "" a
  tenth of the time so classifier-free guidance works. The saved weights are an exponential
  moving average of the trained ones.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline.conventions import MAX_LENGTH
from pipeline.world import scenes as world
from pipeline.world.loop import step_generators, train_steps

# SD 1.x's noise schedule; every diffusers SD scheduler reads it from the saved config.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear")
UNCONDITIONAL_FRACTION = 0.1  # captions dropped to "" (classifier-free guidance)
EMA_DECAY = 0.999


@dataclass(frozen=True)
class DiffusionSizes:
    vae_channels: tuple[int, ...] = (16, 32, 32)  # three levels: 32 -> 8 px latents
    unet_channels: tuple[int, ...] = (32, 64, 64)
    head_dim: int = 8


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> float [N, 3, 32, 32] in [-1, 1], the pipeline's pixel range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- VAE ----------------------------------------------------------------------------------

def build_vae(sizes: DiffusionSizes, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    levels = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=sizes.vae_channels, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, sample_size=world.IMAGE_SIZE,
    )


def train_vae(vae: AutoencoderKL, images: np.ndarray, steps: int, batch: int, lr: float,
              seed: int, checkpoint: Path, kl_weight: float = 1e-6) -> list[float]:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def step_fn(step: int) -> torch.Tensor:
        rng, gen = step_generators(seed, step)
        x = to_unit(images[rng.choice(len(images), batch, replace=False)])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        reconstruction = vae.decode(z).sample
        # L1, as SD's autoencoder was trained with: sharper edges than squared error.
        return F.l1_loss(reconstruction, x) + kl_weight * posterior.kl().mean()

    vae.train()
    return train_steps("world: VAE", {"vae": vae}, optimizer, steps, lr, step_fn, checkpoint)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray,
                   batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, 4, 8, 8] of every image."""
    vae.eval()
    means, stds = [], []
    for begin in range(0, len(images), batch):
        posterior = vae.encode(to_unit(images[begin:begin + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def measure_scaling_factor(means: torch.Tensor, stds: torch.Tensor, seed: int) -> float:
    """1 / std of sampled latents, rounded to 5 digits (SD 1.x: 0.18215)."""
    gen = torch.Generator().manual_seed(seed)
    sample = means + stds * torch.randn(means.shape, generator=gen)
    return round(1.0 / sample.std().item(), 5)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    vae.eval()
    x = to_unit(images)
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((x - y) / 2).pow(2).mean().item()
    return round(10 * np.log10(1.0 / max(mse, 1e-12)), 3)


# --- UNet ---------------------------------------------------------------------------------

def build_unet(sizes: DiffusionSizes, cross_attention_dim: int, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    levels = len(sizes.unet_channels)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=sizes.unet_channels, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cross_attention_dim, attention_head_dim=sizes.head_dim,
    )


@torch.no_grad()
def text_states(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                texts: list[str]) -> torch.Tensor:
    """[N, 77, D]: what StableDiffusionPipeline.encode_prompt computes for each text."""
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt")["input_ids"]
    return text_encoder(ids)[0]


def caption_bank(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scenes: list[world.Scene], per_scene: int, seed: int,
                 batch: int = 256) -> torch.Tensor:
    """Text states [per_scene, N, 77, D] (float16) of `per_scene` captions of every scene.

    Encoding 77 positions per caption costs more than the UNet step itself, so captions are
    drawn and encoded once, not at every step.
    """
    captioner = random.Random(seed)
    texts = [world.caption(scene, captioner) for _ in range(per_scene) for scene in scenes]
    states = torch.empty(len(texts), MAX_LENGTH, text_encoder.config.hidden_size,
                         dtype=torch.float16)
    for begin in tqdm(range(0, len(texts), batch), desc="world: caption bank", unit="batch"):
        states[begin:begin + batch] = text_states(text_encoder, tokenizer,
                                                  texts[begin:begin + batch]).half()
    return states.view(per_scene, len(scenes), MAX_LENGTH, -1)


def train_unet(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
               latent_means: torch.Tensor, latent_stds: torch.Tensor, scaling_factor: float,
               scenes: list[world.Scene], captions_per_scene: int, steps: int, batch: int,
               lr: float, seed: int, checkpoint: Path) -> tuple[UNet2DConditionModel, list[float]]:
    """Train `unet`; returns the moving average of its weights and the losses."""
    noise_schedule = DDPMScheduler(**SD_SCHEDULE)
    text_encoder.eval().requires_grad_(False)
    bank = caption_bank(text_encoder, tokenizer, scenes, captions_per_scene, seed)
    unconditional = text_states(text_encoder, tokenizer, [""])[0]
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)

    def step_fn(step: int) -> torch.Tensor:
        rng, gen = step_generators(seed, step)
        rows = torch.from_numpy(rng.choice(len(scenes), batch, replace=False))
        which = torch.from_numpy(rng.integers(0, captions_per_scene, batch))
        drop = torch.from_numpy(rng.random(batch) < UNCONDITIONAL_FRACTION)
        cond = torch.where(drop[:, None, None], unconditional, bank[which, rows].float())
        mean, std = latent_means[rows], latent_stds[rows]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, SD_SCHEDULE["num_train_timesteps"], (batch,), generator=gen)
        noisy = noise_schedule.add_noise(latents, noise, t)
        return F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)

    @torch.no_grad()
    def update_ema(step: int) -> None:
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        for averaged, current in zip(ema.parameters(), unet.parameters(), strict=True):
            averaged.lerp_(current, 1 - decay)

    unet.train()
    losses = train_steps("world: UNet", {"unet": unet, "ema": ema}, optimizer, steps, lr,
                         step_fn, checkpoint, after_step=update_ema)
    return ema.eval(), losses


def save_pipeline(folder: Path, vae: AutoencoderKL, unet: UNet2DConditionModel,
                  text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> None:
    """An ordinary SD 1.x pipeline folder; PNDM with SD 1.5's settings is the default."""
    scheduler = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    # SD 1.5's scheduler config says clip_sample: false too. Without it DDIM (whose default is
    # true) clips its x0 estimates to [-1, 1], but scaled latents have unit std.
    scheduler.register_to_config(clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
