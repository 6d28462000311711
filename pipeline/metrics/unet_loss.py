"""The `unet` training loss: a fine-tune through the frozen base UNet (`train.loss: unet`,
`train.unet_epochs`).

Sampling (pipeline/sampling/sd.py) reads states s through SD's UNet with classifier-free
guidance, g = render.guidance_scale and u the ordinary CLIP states of "":

    eps_g(x, t, s) = eps(x, t, u) + g (eps(x, t, s) - eps(x, t, u))

The loss follows the sampler's own path under the true states, as DistillT5's step-following
distillation does (Wang et al. 2025, "Scaling Down Text Encoders of Text-to-Image Diffusion
Models", arXiv 2503.19897; no images needed, so it works for SD 1.5 as for the world): per
batch a step k of render.steps is drawn uniformly, the sampler (render.scheduler) runs its
first k steps from seeded noise under the true states s (no gradient), and at the latents x_k
and timestep t_k it visits

    L = mean over rows and latent elements of (eps_g(x_k, t_k, s_hat) - eps_g(x_k, t_k, s))^2
      = g^2 * mean (eps(x_k, t_k, s_hat) - eps(x_k, t_k, s))^2

(the unconditional branch cancels; g = 1 where sampling does not guide). The UNet is frozen
(eval mode, no parameter gradients); the gradient reaches s_hat through its cross-attention.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.base.checks import check_cross_attention
from pipeline.base.clip_encode import encode_texts
from pipeline.base.loaders import load_clip
from pipeline.config.params import RenderParams
from pipeline.sampling.sd import denoise, guided, load_pipeline


class UnetLoss:
    """L above for base.sd's UNet at the sampling settings `render` (steps, scheduler,
    guidance, height, width). Call with (pred, target, mask) [B, 77, D] x 2, [B, 77] (the mask
    is not read: the UNet reads every position); `generator` draws k and the noise seeds
    (default: torch's global generator, which training seeds and checkpoints). The UNet runs
    in float32 on `device`, where training runs, whatever render.device says."""

    def __init__(
        self, sd: str, clip: str, render: RenderParams, device: torch.device | str = "cpu"
    ) -> None:
        self.render = replace(render, device=str(device))
        self.pipe = load_pipeline(sd, self.render)
        self.pipe.unet.eval().requires_grad_(False)
        # [1, 77, D]: the unconditional branch's states, as sampling gives it
        self.negative = encode_texts(load_clip(clip, str(device)), [""]).hidden.float()
        check_cross_attention(
            self.pipe.unet.config.cross_attention_dim, self.negative.shape[-1], sd, clip
        )
        self.scale = render.guidance_scale if guided(self.pipe, render) else 1.0
        self.pipe.scheduler.set_timesteps(render.steps)
        self.visited = len(self.pipe.scheduler.timesteps)  # PNDM: steps + 1

    def __call__(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(
                f"pred {list(pred.shape)} and target {list(target.shape)} differ in shape"
            )
        unet, scheduler = self.pipe.unet, self.pipe.scheduler
        draws = torch.randint(2**31 - 1, (1 + len(pred),), generator=generator).tolist()
        k, seeds = draws[0] % self.visited, draws[1:]
        target = target.to(pred)
        with torch.no_grad():
            latents = denoise(self.pipe, target, self.negative, self.render, seeds, stop=k)
            t = scheduler.timesteps[k]
            latents = scheduler.scale_model_input(latents, t)
            teacher = unet(latents, t, encoder_hidden_states=target, return_dict=False)[0]
        student = unet(latents, t, encoder_hidden_states=pred, return_dict=False)[0]
        return self.scale**2 * ((student - teacher) ** 2).mean()
