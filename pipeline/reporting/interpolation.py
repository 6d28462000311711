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
from pipeline.sampling.sd import generate_images


def fractions(steps: int) -> list[float]:
    return [k / (steps - 1) for k in range(steps)]


def interpolate_run(pipe, encoder: PromptEncoder, scorer: Scorer,
                    r: RenderParams) -> tuple[dict, list[Image.Image]]:
    """The judged curve of one run's encoder and its strip (one image per t, seed
    render.seed)."""
    start = encoder.embedding(r.interpolation_from)
    end = encoder.embedding(r.interpolation_to)
    ts = fractions(r.interpolation_steps)
    seeds = [r.seed + k for k in range(r.interpolation_seeds)]
    embeds = encoder.interpolate(start, end, ts, r.interpolation_slerp)  # [T, 77, D]
    repeated = embeds.repeat_interleave(len(seeds), dim=0)  # t-major: T x seeds
    images = generate_images(pipe, repeated, encoder.encode_negative("", deproject=False), r,
                             seeds * len(ts))
    found_a = np.array(scorer.adherence(images, [r.interpolation_from] * len(images)))
    found_b = np.array(scorer.adherence(images, [r.interpolation_to] * len(images)))
    a = found_a.reshape(len(ts), len(seeds)).mean(1)
    b = found_b.reshape(len(ts), len(seeds)).mean(1)
    balance = b - a
    steps = np.diff(balance)
    curve = {"t": ts, "from": a.tolist(), "to": b.tolist(), "balance": balance.tolist(),
             "max_jump": float(np.abs(steps).max()), "reversals": int((steps < 0).sum())}
    return curve, images[::len(seeds)]


def run_interpolation(pipe, encoders: dict[str, PromptEncoder], scorer: Scorer,
                      r: RenderParams) -> tuple[dict[str, dict], dict[str, list[Image.Image]]]:
    """The curve and strip of each run's encoder."""
    curves, strips = {}, {}
    with torch.no_grad():
        for name, encoder in encoders.items():
            curves[name], strips[name] = interpolate_run(pipe, encoder, scorer, r)
    return curves, strips
