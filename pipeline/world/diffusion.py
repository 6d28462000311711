"""The world's Stable Diffusion UNet: a small `UNet2DConditionModel` trained as SD 1.x's was,
saved with the VAE (pipeline/world/vae.py) as an ordinary `StableDiffusionPipeline` folder.

Noise (epsilon) prediction on scaled latents at SD 1.x's noise schedule, conditioned on the
*frozen* CLIP text tower's last hidden state at all 77 positions (padded with EOS, no
attention mask, exactly as the pipeline encodes prompts); the caption is dropped to "" a
tenth of the time so classifier-free guidance works. The recipe's levers (`UnetRecipe`): the
min-SNR-gamma loss weighting, learning-rate warm-up (then cosine decay), the EMA decay of the
saved weights, batch size and channel widths.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline.core.conventions import MAX_LENGTH
from pipeline.world import scenes as world
from pipeline.world.loop import step_generators, train_steps

# SD 1.x's noise schedule; every diffusers SD scheduler reads it from the saved config.
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
UNCONDITIONAL_FRACTION = 0.1  # captions dropped to "" (classifier-free guidance)
HEAD_DIM = 8  # attention head width at every level


@dataclass(frozen=True)
class UnetRecipe:
    """How the UNet is trained (world.unet_*): the levers of the recipe ablation."""

    steps: int = 3600
    batch: int = 48
    lr: float = 5e-4
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr / 10
    ema_decay: float = 0.999  # of the saved moving average (with the usual 1 + t / 10 + t ramp)
    # min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    # Weighting Strategy"): epsilon-loss weight min(SNR(t), gamma) / SNR(t); 0 = plain MSE.
    min_snr_gamma: float = 0.0


def unet_channels(width: int) -> tuple[int, int, int]:
    """Three levels (8, 4, 2 px) of width, 2 x width, 2 x width channels."""
    return (width, 2 * width, 2 * width)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """[B] loss weights of timesteps t for epsilon prediction: min(SNR, gamma) / SNR, where
    SNR(t) = alpha_bar_t / (1 - alpha_bar_t); all ones for gamma = 0."""
    if gamma == 0:
        return torch.ones(len(t))
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return snr.clamp(max=gamma) / snr


# --- UNet ---------------------------------------------------------------------------------


def build_unet(width: int, cross_attention_dim: int, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    channels = unet_channels(width)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=HEAD_DIM,
    )


@torch.no_grad()
def text_states(
    text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: list[str]
) -> torch.Tensor:
    """[N, 77, D]: what StableDiffusionPipeline.encode_prompt computes for each text."""
    ids = tokenizer(
        texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )["input_ids"]
    return text_encoder(ids)[0]


def caption_bank(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scenes: list[world.Scene],
    per_scene: int,
    seed: int,
    batch: int = 256,
) -> torch.Tensor:
    """Text states [per_scene, N, 77, D] (float16) of `per_scene` captions of every scene.

    Encoding 77 positions per caption costs more than the UNet step itself, so captions are
    drawn and encoded once, not at every step.
    """
    captioner = random.Random(seed)
    texts = [world.caption(scene, captioner) for _ in range(per_scene) for scene in scenes]
    states = torch.empty(
        len(texts), MAX_LENGTH, text_encoder.config.hidden_size, dtype=torch.float16
    )
    for begin in tqdm(range(0, len(texts), batch), desc="world: caption bank", unit="batch"):
        states[begin : begin + batch] = text_states(
            text_encoder, tokenizer, texts[begin : begin + batch]
        ).half()
    return states.view(per_scene, len(scenes), MAX_LENGTH, -1)


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latent_means: torch.Tensor,
    latent_stds: torch.Tensor,
    scaling_factor: float,
    scenes: list[world.Scene],
    captions_per_scene: int,
    recipe: UnetRecipe,
    seed: int,
    checkpoint: Path,
    device: str = "cpu",
) -> tuple[UNet2DConditionModel, list[float]]:
    """Train `unet` on `device`; returns the moving average of its weights and the losses.
    Batches, noise and timesteps are drawn on the CPU, so a seed draws the same on every
    device."""
    noise_schedule = DDPMScheduler(**SD_SCHEDULE)
    text_encoder.eval().requires_grad_(False)
    bank = caption_bank(text_encoder, tokenizer, scenes, captions_per_scene, seed)
    unconditional = text_states(text_encoder, tokenizer, [""])[0]
    unet.to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.01)

    def step_fn(step: int) -> torch.Tensor:
        rng, gen = step_generators(seed, step)
        rows = torch.from_numpy(rng.choice(len(scenes), recipe.batch, replace=False))
        which = torch.from_numpy(rng.integers(0, captions_per_scene, recipe.batch))
        drop = torch.from_numpy(rng.random(recipe.batch) < UNCONDITIONAL_FRACTION)
        cond = torch.where(drop[:, None, None], unconditional, bank[which, rows].float())
        mean, std = latent_means[rows], latent_stds[rows]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, SD_SCHEDULE["num_train_timesteps"], (recipe.batch,), generator=gen)
        noisy = noise_schedule.add_noise(latents, noise, t)
        weights = min_snr_weights(noise_schedule.alphas_cumprod, t, recipe.min_snr_gamma)
        predicted = unet(
            noisy.to(device), t.to(device), encoder_hidden_states=cond.to(device)
        ).sample
        per_sample = (predicted - noise.to(device)).pow(2).mean(dim=(1, 2, 3))  # [B]
        return (weights.to(device) * per_sample).mean()

    @torch.no_grad()
    def update_ema(step: int) -> None:
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        for averaged, current in zip(ema.parameters(), unet.parameters(), strict=True):
            averaged.lerp_(current, 1 - decay)

    unet.train()
    losses = train_steps(
        "world: UNet",
        {"unet": unet, "ema": ema},
        optimizer,
        recipe.steps,
        recipe.lr,
        step_fn,
        checkpoint,
        warmup=recipe.warmup,
        after_step=update_ema,
    )
    return ema.eval(), losses


@torch.no_grad()
def denoising_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latents: torch.Tensor,
    scenes: list[world.Scene],
    seed: int,
    device: str = "cpu",
    batch: int = 250,
) -> float:
    """Mean epsilon-prediction MSE (unweighted) of `unet` on scaled latents [N, 4, 8, 8] of
    `scenes`, each with the caption the caption bank of `seed` gives it when they are its first
    scenes; noise and timesteps come from `seed` alone, so two sets of N scenes are scored on
    the same draws (training against held-out scenes: the gap is memorisation)."""
    noise_schedule = DDPMScheduler(**SD_SCHEDULE)
    captioner = random.Random(seed)
    texts = [world.caption(scene, captioner) for scene in scenes]
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, SD_SCHEDULE["num_train_timesteps"], (len(latents),), generator=gen)
    noisy = noise_schedule.add_noise(latents, noise, t)
    unet.eval().to(device)
    total = 0.0
    for begin in range(0, len(latents), batch):
        end = begin + batch
        cond = text_states(text_encoder, tokenizer, texts[begin:end])
        predicted = unet(
            noisy[begin:end].to(device),
            t[begin:end].to(device),
            encoder_hidden_states=cond.to(device),
        ).sample
        total += (predicted.cpu() - noise[begin:end]).pow(2).mean(dim=(1, 2, 3)).sum().item()
    return round(total / len(latents), 6)


def save_pipeline(
    folder: Path,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
) -> None:
    """An ordinary SD 1.x pipeline folder; PNDM with SD 1.5's settings is the default."""
    scheduler = PNDMScheduler(
        **SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
    )
    # SD 1.5's scheduler config says clip_sample: false too. Without it DDIM (whose default is
    # true) clips its x0 estimates to [-1, 1], but scaled latents have unit std.
    scheduler.register_to_config(clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
