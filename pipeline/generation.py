"""What the picture stages share: every row's prompt encoder, and images from conditioning
(the base SD pipeline with the chosen scheduler, seeded per image)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pipeline.base_checks import check_cross_attention
from pipeline.base_models import load_clip, load_sd_pipeline
from pipeline.errors import DeprojectorError
from pipeline.image_prompts import ImageTower, ModalityGap
from pipeline.models import load_deprojector
from pipeline.names import REFERENCE
from pipeline.params import SCHEDULERS, Params, RenderParams
from pipeline.prompt_encoder import PromptEncoder


class GenerationError(DeprojectorError, ValueError):
    """Conditioning that cannot be drawn (not finite)."""


def load_encoders(params: Params, models_dir: Path, gap_dir: Path | None = None,
                  device: str = "cpu") -> dict[str, PromptEncoder]:
    """The prompt encoder of every row: REFERENCE (base.clip alone, no deprojector), then one
    per run of `models:` (models_dir/NAME, checked against base.clip). With gap_dir: the
    vision tower and the modality-gap statistics, for image prompts."""
    clip = load_clip(params.base.clip, device=device)
    tower = ImageTower.load(params.base.clip, device) if gap_dir is not None else None
    gap = ModalityGap.load(gap_dir).with_bridge(params.gap.bridge) \
        if gap_dir is not None else None
    reference = PromptEncoder(clip, None, tower, gap)
    return {REFERENCE: reference,
            **{name: reference.with_deprojector(load_deprojector(models_dir / name, device))
               for name in params.models}}


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
