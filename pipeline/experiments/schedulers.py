"""Reference-row adherence of the builtin world per scheduler, steps and guidance scale.

The world's UNet is the limit of every adherence number; this shows how much of it the
sampling settings (`render.scheduler`, `render.steps`, `render.guidance_scale`) move, on
held-out prompts (ordinary CLIP states, no deprojector), with the same noise seeds throughout.

    python -m pipeline.experiments.schedulers [--prompts 96] [--seed 1] [--json]
    python -m pipeline.experiments.schedulers --tiny   # seconds: 2 prompts, at most 3 steps
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from pipeline.base.loaders import load_clip
from pipeline.config.params import RenderParams
from pipeline.core.conventions import BUILTIN
from pipeline.metrics.adherence import Scorer, summarise
from pipeline.metrics.records import ADHERENCE, ALL_PARTS, CLIP_SCORE
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.sd import generate_images, load_pipeline
from pipeline.world.embedded import World

SETTINGS = (  # scheduler, steps, guidance scale: params.yaml's render (pndm, 20, 2.5) first
    ("pndm", 20, 2.5), ("pndm", 50, 2.5), ("pndm", 20, 1.5), ("pndm", 20, 4.0),
    ("pndm", 20, 7.5), ("ddim", 50, 2.5), ("euler", 30, 2.5), ("dpm++", 20, 2.5),
)
# Every setting's code path in a few seconds; the adherence figures mean nothing at this size.
TINY = {"prompts": 2, "max_steps": 3}


def run(prompts: int = 96, seed: int = 1, max_steps: int | None = None) -> list[dict]:
    """One row per SETTINGS entry; `max_steps` caps the sampling steps (quick checks only)."""
    world = World.of(BUILTIN, BUILTIN)
    encoder = PromptEncoder(load_clip(BUILTIN))
    scorer = Scorer.load(BUILTIN, world)
    texts = world.held_out_prompts(prompts, seed, set())["single"]
    objects = [world.objects(t) for t in texts]
    embeds = encoder.encode_prompts(texts, deproject=False)
    negative = encoder.encode_negative("", deproject=False)
    rows = []
    for scheduler, steps, guidance in SETTINGS:
        steps = min(steps, max_steps or steps)
        r = dataclasses.replace(RenderParams(), scheduler=scheduler, steps=steps,
                                guidance_scale=guidance)
        images = generate_images(load_pipeline(BUILTIN, r), embeds, negative, r,
                                 list(range(prompts)))
        summary = summarise(scorer.score(images, texts), objects)
        rows.append({"scheduler": scheduler, "steps": steps, "guidance_scale": guidance,
                     **{k: round(v, 3) if isinstance(v, float) else v
                        for k, v in summary.items()}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="cap every setting's sampling steps (quick checks)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke-test sizes ({TINY}); overrides --prompts, --max-steps")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else {"prompts": args.prompts, "max_steps": args.max_steps}
    rows = run(seed=args.seed, **sizes)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print_report(rows)


def print_report(rows: list[dict]) -> None:
    """The text report of `run`'s result."""
    keys = (ADHERENCE, "adherence_1_object", "adherence_2_objects", "adherence_3_objects",
            ALL_PARTS, CLIP_SCORE)
    print("| scheduler | steps | guidance | " + " | ".join(keys) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(keys))
    for row in rows:
        # Few prompts may have no 3-object one: an empty cell, not a KeyError.
        print(f"| {row['scheduler']} | {row['steps']} | {row['guidance_scale']} | "
              + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in keys) + " |")


if __name__ == "__main__":
    main()
