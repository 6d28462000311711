"""Images from conditioning: the base SD pipeline with the chosen scheduler, seeded per image."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pipeline.base_checks import check_cross_attention, check_deprojector_fits
from pipeline.base_models import ClipText, load_sd_pipeline
from pipeline.models import Deprojector, load_deprojector
from pipeline.params import SCHEDULERS, RenderParams


def load_pipeline(sd: str, r: RenderParams):
    """The SD pipeline of `base.sd` in float32 with the scheduler `render.scheduler`."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # its loading bar would cut into ours
    pipe = load_sd_pipeline(sd, device=r.device, dtype=torch.float32)
    scheduler_class = getattr(diffusers, SCHEDULERS[r.scheduler])
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe


def load_checked_deprojector(path: Path, clip: ClipText, device: str = "cpu") -> Deprojector:
    model = load_deprojector(path, device=device)
    check_deprojector_fits(model, clip)
    return model


def generate_images(pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                    r: RenderParams, seeds: list[int] | None = None,
                    batch: int = 64) -> list[Image.Image]:
    """One image per row of prompt_embeds [N, 77, D], from seed `r.seed` (or seeds[i])."""
    # A UNet of another width would fail deep inside diffusers with a matmul shape error.
    check_cross_attention(pipe.unet.config.cross_attention_dim, prompt_embeds.shape[-1])
    seeds = seeds if seeds is not None else [r.seed] * len(prompt_embeds)
    device = pipe.device
    images: list[Image.Image] = []
    for begin in range(0, len(prompt_embeds), batch):
        chunk = prompt_embeds[begin:begin + batch]
        # One generator per image: each image starts from the noise it would get if generated
        # alone with generator=torch.Generator().manual_seed(seed).
        images += pipe(
            prompt_embeds=chunk.to(device),
            negative_prompt_embeds=negative_embeds.to(device).expand(len(chunk), -1, -1),
            generator=[torch.Generator().manual_seed(s) for s in seeds[begin:begin + batch]],
            num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale,
            height=r.height,
            width=r.width,
            output_type="pil",
        ).images
    return images
