"""Images from conditioning: the base SD pipeline with the chosen scheduler, seeded per image."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
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


def generate_images(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    r: RenderParams,
    seeds: list[int] | None = None,
    batch: int | None = None,
) -> list[Image.Image]:
    """One image per row of prompt_embeds [N, 77, D], from seed `r.seed` (or seeds[i])."""
    return [
        Image.fromarray(image)
        for image in generate_pixels(pipe, prompt_embeds, negative_embeds, r, seeds, batch)
    ]


def generate_pixels(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    r: RenderParams,
    seeds: list[int] | None = None,
    batch: int | None = None,
) -> np.ndarray:
    """uint8 [N, H, W, 3]: one picture per row of prompt_embeds [N, 77, D] (what
    `generate_images` returns, without the PIL images), `batch` pictures per UNet call (twice
    as many rows with classifier-free guidance; default `default_batch`).

    StableDiffusionPipeline's own loop (pipeline_stable_diffusion.py, steps 4-7, decode and
    postprocess), called directly on batched latents: the same noise (one generator per
    image), scheduler, guidance and VAE decode, without the per-call prompt handling and
    PIL round trip, and with each cross-attention's keys and values of the conditioning
    computed once per batch instead of once per step (`cross_attention_cache`)."""
    # A UNet of another width would fail deep inside diffusers with a matmul shape error.
    for what, embeds in (
        ("prompt_embeds", prompt_embeds),
        ("negative_prompt_embeds", negative_embeds),
    ):
        if not torch.isfinite(embeds).all():  # would draw an all-black picture
            raise GenerationError(f"{what} contain NaN or Inf values; nothing was drawn")
    check_cross_attention(pipe.unet.config.cross_attention_dim, prompt_embeds.shape[-1])
    timesteps = pipe.scheduler.config.num_train_timesteps
    if r.steps > timesteps:
        raise GenerationError(
            f"{r.steps} steps: the {r.scheduler} scheduler of this UNet takes "
            f"at most {timesteps} (its training timesteps)"
        )
    seeds = seeds if seeds is not None else [r.seed] * len(prompt_embeds)
    batch = batch or default_batch(r)
    chunks = []
    with torch.inference_mode(), cross_attention_cache(pipe.unet):
        for begin in range(0, len(prompt_embeds), batch):
            latents = denoise(
                pipe,
                prompt_embeds[begin : begin + batch],
                negative_embeds,
                r,
                seeds[begin : begin + batch],
            )
            chunks.append(decode(pipe, latents, r))
    if not chunks:
        return np.zeros((0, r.height, r.width, 3), dtype=np.uint8)
    return np.concatenate(chunks)


def default_batch(r: RenderParams) -> int:
    """Pictures per UNet call: 256 at the world's 32 x 32 px (8 x 8 latents; larger batches
    gain little), 64 (what StableDiffusionPipeline calls had) for larger pictures."""
    return 256 if r.height * r.width <= 32 * 32 else 64


def guided(pipe, r: RenderParams) -> bool:
    """Classifier-free guidance, as StableDiffusionPipeline decides it."""
    return r.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def denoise(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    r: RenderParams,
    seeds: list[int],
    stop: int | None = None,
) -> torch.Tensor:
    """The final latents [N, C, h, w] of len(seeds) pictures: StableDiffusionPipeline.__call__'s
    loop; with `stop`, the latents after its first `stop` steps (0: the initial noise), those
    the sampler feeds the UNet at step `stop` (its timestep: pipe.scheduler.timesteps[stop])."""
    unet, scheduler, device = pipe.unet, pipe.scheduler, pipe.device
    dtype = unet.dtype
    cond = prompt_embeds.to(device=device, dtype=dtype)
    negative = negative_embeds.to(device=device, dtype=dtype).expand(len(cond), -1, -1)
    cfg = guided(pipe, r)
    embeds = torch.cat([negative, cond]) if cfg else cond
    scheduler.set_timesteps(r.steps, device=device)
    # One generator per image: each image starts from the noise it would get if generated
    # alone with generator=torch.Generator().manual_seed(seed).
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = pipe.prepare_latents(
        len(cond), unet.config.in_channels, r.height, r.width, dtype, device, generators
    )
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
    for t in scheduler.timesteps[:stop]:
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + r.guidance_scale * (text - uncond)
        latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
    return latents


def decode(pipe, latents: torch.Tensor, r: RenderParams) -> np.ndarray:
    """uint8 [N, H, W, 3]: the VAE's pictures of the latents, as the pipeline's `pil`
    output has them (denormalised, clamped, x 255 rounded). Latents that overflowed (an
    extreme guidance scale) raise GenerationError: clamped, they would be drawn all black."""
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    if not torch.isfinite(image).all():
        raise GenerationError(
            f"the sampler's result is not finite (NaN or Inf) with guidance scale "
            f"{r.guidance_scale:g}, {r.steps} steps, {r.scheduler}: the latents "
            f"overflowed; nothing was drawn (a smaller guidance scale?)"
        )
    image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (image * 255).round().astype("uint8")


class CachedCrossAttention:
    """AttnProcessor2_0 for a cross-attention whose keys and values are computed once per
    conditioning tensor: the conditioning is the same at every sampler step, so to_k / to_v
    of it are too (bit for bit; only their repetition is saved). Self-attention, and any
    attention with a mask, norms or a residual, goes to the processor it replaced."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.cached: tuple | None = None  # (conditioning, keys, values): the latest only

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        plain = (
            attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and not attn.norm_cross
            and not attn.residual_connection
            and hidden_states.ndim == 3
            and attn.norm_q is None
            and attn.norm_k is None
            and not args
            and not kwargs
        )
        if encoder_hidden_states is None or not plain:
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if self.cached is None or self.cached[0] is not encoder_hidden_states:
            rows = len(encoder_hidden_states)
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            head_dim = key.shape[-1] // attn.heads
            self.cached = (
                encoder_hidden_states,
                *(x.view(rows, -1, attn.heads, head_dim).transpose(1, 2) for x in (key, value)),
            )
        _, key, value = self.cached
        rows, head_dim = len(hidden_states), key.shape[-1]
        query = attn.to_q(hidden_states).view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@contextmanager
def cross_attention_cache(unet):
    """The UNet's AttnProcessor2_0 processors wrapped in CachedCrossAttention while inside;
    the cache is dropped and the processors restored on leaving."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    before = unet.attn_processors
    if not all(type(p) is AttnProcessor2_0 for p in before.values()):
        yield  # another processor (xformers, LoRA, ...): left as it is
        return
    unet.set_attn_processor({name: CachedCrossAttention(p) for name, p in before.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(before)
