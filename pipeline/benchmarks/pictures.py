"""Where a judged picture's time goes, and pictures per second at the default settings.

The reference row (the builtin world's CLIP states of held-out prompts, no deprojector) is
drawn and judged twice per repeat, interleaved in one process:

- `pipeline`: what `evaluate` and `render` did before: diffusers' StableDiffusionPipeline
  called per 64 prompts with `output_type="pil"`, the PIL images judged and CLIP-scored;
- `direct`: what they do now (pipeline.sampling.sd.generate_pixels): the same UNet,
  scheduler and VAE called on batched latents (256 pictures per UNet call), each
  cross-attention's keys and values of the conditioning computed once per batch instead of
  once per step, the uint8 pictures judged without PIL.

Segments are taken with perf_counter by wrapping what both paths call (nothing in the
library changes for this): `unet` (UNet forward, both halves of classifier-free guidance),
`scheduler` (its step), `vae` (decode), `judge`, `clip_score`, and `other` (the rest:
latents, guidance arithmetic, postprocessing, PIL). `guidance` is measured, not assumed: the
direct path once more at guidance_scale 1 (no unconditional half), and `guidance_share` =
1 − unguided / guided time. `pixels_equal`: whether both paths drew the same bytes.

`stages` counts the pictures each default stage draws (params.yaml: evaluate's held-out
prompts and image prompts, render's grids and interpolation strips) and their time at the
measured direct rate, as shares of the two stages' pictures.

    python -m pipeline.benchmarks.pictures [--prompts 64] [--repeats 2] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.base.loaders import load_clip
from pipeline.config.params import Params, RenderParams, load_params
from pipeline.core.conventions import BUILTIN
from pipeline.core.names import BRIDGES
from pipeline.metrics.adherence import KINDS, Scorer
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.sd import generate_pixels, load_pipeline
from pipeline.world.embedded import World

SEGMENTS = ("unet", "scheduler", "vae", "judge", "clip_score", "other")
PIPELINE_BATCH = 64  # pictures per StableDiffusionPipeline call, as evaluate had it
TINY = {"prompts": 2, "repeats": 1, "steps": 2}
PROMPT_SEED = 7  # the benchmark's prompts: another seed than evaluate's held-out ones


def pipeline_pictures(
    pipe, embeds: torch.Tensor, negative: torch.Tensor, r: RenderParams, seeds: list[int]
) -> list:
    """The path before: StableDiffusionPipeline per PIPELINE_BATCH prompts, PIL images."""
    images = []
    with torch.no_grad():
        for begin in range(0, len(embeds), PIPELINE_BATCH):
            chunk = embeds[begin : begin + PIPELINE_BATCH]
            images += pipe(
                prompt_embeds=chunk,
                negative_prompt_embeds=negative.expand(len(chunk), -1, -1),
                generator=[
                    torch.Generator().manual_seed(s) for s in seeds[begin : begin + PIPELINE_BATCH]
                ],
                num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale,
                height=r.height,
                width=r.width,
                output_type="pil",
            ).images
    return images


@contextlib.contextmanager
def timed(times: dict[str, float], pipe, scorer: Scorer) -> Iterator[None]:
    """Adds each segment's seconds to `times` while inside (instance attributes wrap the
    methods; removed on leaving)."""
    targets = [
        (pipe.unet, "forward", "unet"),
        (pipe.vae, "decode", "vae"),
        (scorer, "adherence", "judge"),
        (scorer, "clip_scores", "clip_score"),
    ]

    def wrap(f, key):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                times[key] += time.perf_counter() - start

        return timed_call

    scheduler_class = type(pipe.scheduler)
    step = scheduler_class.step  # the scheduler is replaced per call: wrap its class's step
    for obj, name, key in targets:
        setattr(obj, name, wrap(getattr(obj, name), key))
    scheduler_class.step = wrap(step, "scheduler")
    try:
        yield
    finally:
        for obj, name, _ in targets:
            delattr(obj, name)
        scheduler_class.step = step


def profile_once(
    path: str,
    pipe,
    scorer: Scorer,
    embeds: torch.Tensor,
    negative: torch.Tensor,
    r: RenderParams,
    seeds: list[int],
    texts: list[str],
) -> tuple[dict, np.ndarray]:
    """One path's segment seconds (`total` included) and its pictures, uint8 [N, H, W, 3]."""
    times: dict[str, float] = defaultdict(float)
    with timed(times, pipe, scorer):
        start = time.perf_counter()
        if path == "pipeline":
            images = pipeline_pictures(pipe, embeds, negative, r, seeds)
            scorer.score(images, texts)
            pixels = np.stack([np.asarray(image) for image in images])
        else:
            pixels = generate_pixels(pipe, embeds, negative, r, seeds)
            scorer.score(pixels, texts)
        times["total"] = time.perf_counter() - start
    times["other"] = times["total"] - sum(times[k] for k in SEGMENTS if k != "other")
    return dict(times), pixels


def stage_pictures(params: Params) -> dict[str, int]:
    """Pictures each default stage draws with the builtin world (params.yaml's runs)."""
    e, r = params.evaluate, params.render
    runs = len(params.models)
    single, multi = r.prompts(True)
    bridges = len(BRIDGES) if e.bridges == "all" else 1
    # Rows: the reference, every run and retrieval in both kinds; blend in comma prompts.
    return {
        "evaluate_adherence": (len(KINDS) * (2 + runs) + 1) * e.adherence_prompts,
        "evaluate_image_prompts": e.image_prompts * (1 + runs * (1 + bridges)),
        "render_grids": (1 + runs) * (len(single) + len(multi)) + len(single),
        "render_interpolation": runs * r.interpolation_steps * r.interpolation_seeds,
    }


def run(
    prompts: int = 64,
    repeats: int = 2,
    steps: int | None = None,
    params_file: Path = Path("params.yaml"),
) -> dict:
    """Both paths `repeats` times, interleaved; medians of each segment and of the ratios."""
    params = load_params(params_file)
    r = params.render if steps is None else dataclasses.replace(params.render, steps=steps)
    with contextlib.redirect_stdout(sys.stderr):
        world = World.of(BUILTIN, BUILTIN)
        encoder = PromptEncoder(load_clip(BUILTIN))
        scorer = Scorer.load(BUILTIN, world)
        pipe = load_pipeline(BUILTIN, r)
    texts = World.held_out_prompts(prompts, PROMPT_SEED, set(), distinct=True)["single"]
    seeds = list(range(prompts))
    embeds = encoder.encode_prompts(texts, deproject=False)
    negative = encoder.encode_negative("", deproject=False)
    unguided = dataclasses.replace(r, guidance_scale=1.0)
    runs: dict[str, list[dict]] = {"pipeline": [], "direct": [], "direct_unguided": []}
    pixels: dict[str, np.ndarray] = {}
    generate_pixels(pipe, embeds[:1], negative, r, seeds[:1])  # warm-up
    for _ in range(repeats):
        for path in ("pipeline", "direct"):
            times, pixels[path] = profile_once(
                path, pipe, scorer, embeds, negative, r, seeds, texts
            )
            runs[path].append(times)
        times, _ = profile_once("direct", pipe, scorer, embeds, negative, unguided, seeds, texts)
        runs["direct_unguided"].append(times)
    paths = {}
    for path in ("pipeline", "direct"):
        median = {k: statistics.median(t[k] for t in runs[path]) for k in ("total", *SEGMENTS)}
        paths[path] = {
            "seconds": median,
            "pictures_per_s": prompts / median["total"],
            "fractions": {k: median[k] / median["total"] for k in SEGMENTS},
        }
    guided = [t["total"] for t in runs["direct"]]
    plain = [t["total"] for t in runs["direct_unguided"]]
    speedup = statistics.median(
        p["total"] / d["total"] for p, d in zip(runs["pipeline"], runs["direct"], strict=True)
    )
    counts = stage_pictures(params)
    rate = paths["direct"]["pictures_per_s"]
    return {
        "prompts": prompts,
        "repeats": repeats,
        "steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "scheduler": r.scheduler,
        "size": [r.height, r.width],
        "threads": torch.get_num_threads(),
        "paths": paths,
        "speedup_median": speedup,
        "guidance_share": 1 - statistics.median(p / g for p, g in zip(plain, guided, strict=True)),
        "pixels_equal": bool(np.array_equal(pixels["pipeline"], pixels["direct"])),
        "stages": {
            "pictures": counts,
            "seconds_at_direct_rate": {k: n / rate for k, n in counts.items()},
            "shares": {k: n / sum(counts.values()) for k, n in counts.items()},
        },
    }


def print_report(result: dict) -> None:
    """The text report of `run`'s result."""
    print(
        f"{result['prompts']} prompts, {result['steps']} {result['scheduler']} steps, "
        f"guidance {result['guidance_scale']}, {result['size'][0]} x {result['size'][1]} px, "
        f"{result['threads']} threads, medians of {result['repeats']} interleaved repeats"
    )
    print("| path | pictures/s | " + " | ".join(SEGMENTS) + " |")
    print("| --- | ---: |" + " ---: |" * len(SEGMENTS))
    for path, entry in result["paths"].items():
        print(
            f"| {path} | {entry['pictures_per_s']:.2f} | "
            + " | ".join(f"{100 * entry['fractions'][k]:.1f} %" for k in SEGMENTS)
            + " |"
        )
    print(
        f"speedup (pipeline / direct time): {result['speedup_median']:.2f}x; "
        f"guidance share of the direct time: {100 * result['guidance_share']:.0f} %; "
        f"same pixels: {result['pixels_equal']}"
    )
    stages = result["stages"]
    for name, n in stages["pictures"].items():
        print(
            f"  {name}: {n} pictures, {stages['seconds_at_direct_rate'][name]:.0f} s at "
            f"this rate ({100 * stages['shares'][name]:.0f} % of the pictures)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--tiny", action="store_true", help=f"smoke-test sizes ({TINY})")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else {"prompts": args.prompts, "repeats": args.repeats}
    result = run(**sizes)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
