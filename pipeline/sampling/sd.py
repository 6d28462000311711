"""Images from conditioning: the base SD pipeline with the chosen scheduler, seeded per image."""

from __future__ import annotations

import torch
from PIL import Image

from pipeline.base.checks import check_cross_attention
from pipeline.base.loaders import load_sd_pipeline
from pipeline.config.params import SCHEDULERS, RenderParams
from pipeline.core.errors import DeprojectorError


class GenerationError(DeprojectorError, ValueError):
    """Conditioning that cannot be drawn (not finite)."""


def load_pipeline(sd: str, r: RenderParams):
    """The SD pipeline of `base.sd` in float32 with the scheduler `render.scheduler`."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # its loading bar would cut into ours
    pipe = load_sd_pipeline(sd, device=r.device, dtype=torch.float32)
    scheduler_class = getattr(diffusers, SCHEDULERS[r.scheduler])
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe


def generate_images(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                    r: RenderParams, seeds: list[int] | None = None,
                    batch: int = 64) -> list[Image.Image]:
    """One image per row of prompt_embeds [N, 77, D], from seed `r.seed` (or seeds[i])."""
    # A UNet of another width would fail deep inside diffusers with a matmul shape error.
    for what, embeds in (("prompt_embeds", prompt_embeds),
                         ("negative_prompt_embeds", negative_embeds)):
        if not torch.isfinite(embeds).all():  # would draw an all-black picture
            raise GenerationError(f"{what} contain NaN or Inf values; nothing was drawn")
    check_cross_attention(pipe.unet.config.cross_attention_dim, prompt_embeds.shape[-1])
    timesteps = pipe.scheduler.config.num_train_timesteps
    if r.steps > timesteps:
        raise GenerationError(f"{r.steps} steps: the {r.scheduler} scheduler of this UNet takes "
                              f"at most {timesteps} (its training timesteps)")
    seeds = seeds if seeds is not None else [r.seed] * len(prompt_embeds)
    device = pipe.device
    images: list[Image.Image] = []
    for begin in range(0, len(prompt_embeds), batch):
        chunk = prompt_embeds[begin:begin + batch]
        # One generator per image: each image starts from the noise it would get if generated
        # alone with generator=torch.Generator().manual_seed(seed).
        # As tensors, checked, then made pictures as output_type="pil" would (same pixels):
        # latents that overflowed (an extreme guidance scale) would be drawn all black.
        pixels = pipe(
            prompt_embeds=chunk.to(device),
            negative_prompt_embeds=negative_embeds.to(device).expand(len(chunk), -1, -1),
            generator=[torch.Generator().manual_seed(s) for s in seeds[begin:begin + batch]],
            num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale,
            height=r.height,
            width=r.width,
            output_type="pt",
        ).images
        if not torch.isfinite(pixels).all():
            raise GenerationError(
                f"the sampler's result is not finite (NaN or Inf) with guidance scale "
                f"{r.guidance_scale:g}, {r.steps} steps, {r.scheduler}: the latents "
                f"overflowed; nothing was drawn (a smaller guidance scale?)")
        processor = pipe.image_processor
        images += processor.numpy_to_pil(processor.pt_to_numpy(pixels.cpu()))
    return images
