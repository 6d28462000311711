"""Does the picture change gradually along an interpolation? The world's judge answers.

For each run, prompt A = render.interpolation_from and B = render.interpolation_to are
combined embeddings; e(t) interpolates them around null (conventions.interpolate_embeddings)
at t = 0, 1/(n−1), ..., 1; each e(t) is deprojected and generated from
render.interpolation_seeds noise seeds. The judge's adherence to A and to B is averaged per t,
and balance(t) = adherence_B − adherence_A runs from about −1 to +1 when the picture turns
from A into B. `max_jump` (largest change of balance between neighbouring t) is small for a
gradual change; `reversals` counts the steps where the balance moves back towards A.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.config.params import RenderParams
from pipeline.metrics.adherence import Scorer
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.sd import generate_pixels


def fractions(steps: int) -> list[float]:
    return [k / (steps - 1) for k in range(steps)]


def interpolate_run(
    pipe, encoder: PromptEncoder, scorer: Scorer, r: RenderParams
) -> tuple[dict, list[Image.Image]]:
    """The judged curve of one run's encoder and its strip (one image per t, seed
    render.seed)."""
    curves, strips = run_interpolation(pipe, {"run": encoder}, scorer, r)
    return curves["run"], strips["run"]


def interpolation_embeds(encoder: PromptEncoder, r: RenderParams) -> torch.Tensor:
    """[T x seeds, 77, D]: the deprojected e(t), each repeated once per seed (t-major)."""
    start = encoder.embedding(r.interpolation_from)
    end = encoder.embedding(r.interpolation_to)
    embeds = encoder.interpolate(
        start, end, fractions(r.interpolation_steps), r.interpolation_slerp
    )  # [T, 77, D]
    return embeds.repeat_interleave(r.interpolation_seeds, dim=0)


def judged_curve(images: np.ndarray, scorer: Scorer, r: RenderParams) -> dict:
    """The judge's adherence to A and to B per t (mean over the seeds) of one run's pictures
    (t-major: T x seeds), their balance, its largest jump and its reversals."""
    ts = fractions(r.interpolation_steps)
    found_a = np.array(scorer.adherence(images, [r.interpolation_from] * len(images)))
    found_b = np.array(scorer.adherence(images, [r.interpolation_to] * len(images)))
    a = found_a.reshape(len(ts), r.interpolation_seeds).mean(1)
    b = found_b.reshape(len(ts), r.interpolation_seeds).mean(1)
    balance = b - a
    steps = np.diff(balance)
    return {
        "t": ts,
        "from": a.tolist(),
        "to": b.tolist(),
        "balance": balance.tolist(),
        "max_jump": float(np.abs(steps).max()),
        "reversals": int((steps < 0).sum()),
    }


def run_interpolation(
    pipe, encoders: dict[str, PromptEncoder], scorer: Scorer, r: RenderParams
) -> tuple[dict[str, dict], dict[str, list[Image.Image]]]:
    """The curve and strip (one image per t, seed render.seed) of each run's encoder; every
    run's pictures drawn in shared UNet batches."""
    seeds = [r.seed + k for k in range(r.interpolation_seeds)]
    with torch.no_grad():
        embeds = {name: interpolation_embeds(encoder, r) for name, encoder in encoders.items()}
        negative = next(iter(encoders.values())).encode_negative("", deproject=False)
        per_run = r.interpolation_steps * len(seeds)
        pixels = generate_pixels(
            pipe,
            torch.cat(list(embeds.values())),
            negative,
            r,
            seeds * r.interpolation_steps * len(embeds),
        )
    curves, strips = {}, {}
    for k, name in enumerate(embeds):
        images = pixels[k * per_run : (k + 1) * per_run]
        curves[name] = judged_curve(images, scorer, r)
        strips[name] = [Image.fromarray(image) for image in images[:: len(seeds)]]
    return curves, strips
