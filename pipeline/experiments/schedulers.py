"""Reference-row adherence of the builtin world per scheduler, steps and guidance scale.

The world's UNet is the limit of every adherence number; this shows how much of it the
sampling settings (`render.scheduler`, `render.steps`, `render.guidance_scale`) move, on
held-out prompts (ordinary CLIP states, no deprojector), with the same noise seeds throughout.

    python -m pipeline.experiments.schedulers [--prompts 96] [--seed 1] [--json]
    python -m pipeline.experiments.schedulers --tiny   # seconds: 2 prompts, at most 3 steps
    python -m pipeline.experiments.schedulers --steps 20 15 12 10 8 [--per-objects 64]

`--steps`: params.yaml's render settings (pndm, guidance 2.5) at each number of steps, on the
validation prompts of `world_recipes --guidance` (none of them a prompt evaluate, the grids
or `--world` score; `--per-objects` of 1, 2 and 3 objects each), the reference row of both
kinds (`single`, `multi`), the same noise seeds at every count; each row's per-prompt
adherence paired against the first count's (`vs_first`: difference, its 95 % interval,
within_noise) and its sampling time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from pipeline.base.loaders import load_clip
from pipeline.config.params import RenderParams, load_params
from pipeline.core.conventions import BUILTIN
from pipeline.core.jsonio import write_json
from pipeline.experiments.world_recipes import VALIDATION_SEED, validation_prompts
from pipeline.metrics.adherence import KINDS, Scorer, column, prompt_seeds, summarise
from pipeline.metrics.intervals import paired_difference
from pipeline.metrics.records import ADHERENCE, ALL_PARTS, CLIP_SCORE
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.sd import generate_images, generate_pixels, load_pipeline
from pipeline.world.embedded import World

SETTINGS = (  # scheduler, steps, guidance scale: params.yaml's render (pndm, 20, 2.5) first
    ("pndm", 20, 2.5),
    ("pndm", 50, 2.5),
    ("pndm", 20, 1.5),
    ("pndm", 20, 4.0),
    ("pndm", 20, 7.5),
    ("ddim", 50, 2.5),
    ("euler", 30, 2.5),
    ("dpm++", 20, 2.5),
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
        r = dataclasses.replace(
            RenderParams(), scheduler=scheduler, steps=steps, guidance_scale=guidance
        )
        images = generate_images(
            load_pipeline(BUILTIN, r), embeds, negative, r, list(range(prompts))
        )
        summary = summarise(scorer.score(images, texts), objects)
        rows.append(
            {
                "scheduler": scheduler,
                "steps": steps,
                "guidance_scale": guidance,
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()},
            }
        )
    return rows


def run_steps(
    steps: tuple[int, ...] = (20, 15, 12, 10, 8),
    per_objects: int = 64,
    params_file: Path = Path("params.yaml"),
) -> dict:
    """params.yaml's render settings at each number of `steps` (the first is the baseline),
    on `per_objects` validation prompts with 1, 2 and 3 objects per kind."""
    params = load_params(params_file)
    seed = params.evaluate.seed + VALIDATION_SEED
    by_objects = validation_prompts(params, max(per_objects, params.evaluate.adherence_prompts))
    texts = {
        kind: [p for k in sorted(by_objects) for p in by_objects[k][kind][:per_objects]]
        for kind in KINDS
    }
    objects = [World.objects(t) for t in texts["single"]]
    world = World.of(BUILTIN, BUILTIN)
    encoder = PromptEncoder(load_clip(BUILTIN))
    scorer = Scorer.load(BUILTIN, world)
    embeds = {
        kind: encoder.encode_prompts(texts[kind], combine=kind == "multi", deproject=False)
        for kind in KINDS
    }
    negative = encoder.encode_negative("", deproject=False)
    seeds = prompt_seeds(seed, len(objects))
    pipe = load_pipeline(BUILTIN, params.render)
    rows, first = [], {}
    for count in steps:
        r = dataclasses.replace(params.render, steps=count)
        row: dict = {"steps": count}
        for kind in KINDS:
            start = time.perf_counter()
            pixels = generate_pixels(pipe, embeds[kind], negative, r, seeds)
            seconds = time.perf_counter() - start
            adherence = column(scorer.score(pixels, texts[kind]), "adherence")
            first.setdefault(kind, adherence)
            row[kind] = {
                **{
                    k: v
                    for k, v in summarise(
                        [{"adherence": a, "clip_score": 0.0} for a in adherence], objects, seed
                    ).items()
                    if not k.startswith("clip_score")
                },
                "sampling_s": seconds,
                "vs_first": paired_difference(np.mean, [adherence], [first[kind]], seed),
            }
        rows.append(row)
    return {
        "scheduler": params.render.scheduler,
        "guidance_scale": params.render.guidance_scale,
        "seed": seed,
        "prompts_per_kind": len(objects),
        "rows": rows,
    }


def print_steps_report(result: dict) -> None:
    """The text report of `run_steps`' result."""
    print(
        f"{result['scheduler']}, guidance {result['guidance_scale']}, "
        f"{result['prompts_per_kind']} validation prompts per kind (seed {result['seed']})"
    )
    print(
        "| steps | kind | adherence | 95 % interval | vs first | its 95 % interval "
        "| within noise | sampling s |"
    )
    print("| ---: | --- | ---: | --- | ---: | --- | --- | ---: |")
    for row in result["rows"]:
        for kind in KINDS:
            k = row[kind]
            d = k["vs_first"]
            low, high = d["difference_ci95"] or (float("nan"), float("nan"))
            a_low, a_high = k["adherence_ci95"] or (float("nan"), float("nan"))
            print(
                f"| {row['steps']} | {kind} | {k['adherence']:.3f} | [{a_low:.3f}, "
                f"{a_high:.3f}] | {d['difference']:+.3f} | [{low:+.3f}, {high:+.3f}] | "
                f"{d['within_noise']} | {k['sampling_s']:.1f} |"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="cap every setting's sampling steps (quick checks)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke-test sizes ({TINY}); overrides --prompts, --max-steps",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="the step-count sweep instead (the first is the baseline)",
    )
    parser.add_argument(
        "--per-objects",
        type=int,
        default=64,
        help="--steps: validation prompts with 1, 2 and 3 objects each",
    )
    parser.add_argument("--out", type=Path, default=None, help="--steps: also write the JSON")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.steps:
        result = run_steps(tuple(args.steps), args.per_objects)
        if args.out:
            write_json(args.out, result)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_steps_report(result)
        return
    sizes = TINY if args.tiny else {"prompts": args.prompts, "max_steps": args.max_steps}
    rows = run(seed=args.seed, **sizes)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print_report(rows)


def print_report(rows: list[dict]) -> None:
    """The text report of `run`'s result."""
    keys = (
        ADHERENCE,
        "adherence_1_object",
        "adherence_2_objects",
        "adherence_3_objects",
        ALL_PARTS,
        CLIP_SCORE,
    )
    print("| scheduler | steps | guidance | " + " | ".join(keys) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(keys))
    for row in rows:
        # Few prompts may have no 3-object one: an empty cell, not a KeyError.
        print(
            f"| {row['scheduler']} | {row['steps']} | {row['guidance_scale']} | "
            + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in keys)
            + " |"
        )


if __name__ == "__main__":
    main()
