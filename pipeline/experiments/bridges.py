"""The bridges from image to text space × training with and without image rows.

For each variant the runs named are trained on shards of their own and scored as the
`evaluate` stage scores them (pipeline/stages/evaluate.py), with everything else from params.yaml:
- `text only`: augment.image = 0, the pipeline before image rows; its image prompts are
  judged through every bridge (the bridge alone, without training on images);
- one variant per bridge with augment.image = --image-fraction: image rows built with that
  bridge, and image prompts judged through it.
Per run and variant: the autoregressive masked cosine on the test caption rows and on the
test image rows (for `text only`: on each bridge's image rows, `..._by_bridge`); the judged
adherence of held-out text prompts (single, multi), all variants on the same prompts and
seeds, with the paired difference to `text only` (`..._vs_text_only`: does training on image
rows cost text adherence?); and of drawn held-out scenes as image prompts through every
bridge with image / text. Each with its 95 % bootstrap interval.

    python -m pipeline.experiments.bridges [--runs vt-rollout vicinity-transformer]
        [--image-fraction 0.3] [--prompts 96] [--out docs/records/bridges.json]
    python -m pipeline.experiments.bridges --tiny   # a minute: toy sizes, every path

The world only (image prompts are judged by its judge). Each variant trains from scratch:
about 25 min for two runs and 96 prompts on 2 CPU cores at the default sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config.params import Params, load_params
from pipeline.core.jsonio import write_json
from pipeline.core.names import BRIDGES, IMAGE_PROMPTS, REFERENCE
from pipeline.data.shards import ShardReader
from pipeline.metrics.adherence import Scorer, column, evaluate_adherence
from pipeline.metrics.intervals import mean_with_ci, paired_difference
from pipeline.metrics.records import (
    ADHERENCE,
    AUTOREGRESSIVE,
    COSINE_MASKED,
    IMAGE_ROW_METRICS,
    IMAGE_TO_TEXT,
)
from pipeline.metrics.scores import score_model
from pipeline.models import load_deprojector
from pipeline.sampling.encoders import load_encoders
from pipeline.sampling.sd import load_pipeline
from pipeline.stages.captions import run_captions_stage
from pipeline.stages.evaluate import run_evaluate_stage
from pipeline.stages.extract import run_extract_stage
from pipeline.stages.gap import run_gap_stage
from pipeline.training.loop import train_model
from pipeline.world.embedded import World

TEXT_ONLY = "text only"


def variant_params(params: Params, runs: list[str], image: float, bridge: str) -> Params:
    return dataclasses.replace(
        params,
        augment=dataclasses.replace(params.augment, image=image),
        gap=dataclasses.replace(params.gap, bridge=bridge),
        models={name: params.models[name] for name in runs},
    )


def interval(metrics: dict, key: str) -> dict:
    return {key: metrics.get(key), f"{key}_ci95": metrics.get(f"{key}_ci95")}


def summary(results: dict, run: str) -> dict:
    """The figures of one run in one variant (see the module docstring)."""
    metrics = results[run]
    out = {COSINE_MASKED: interval(metrics[AUTOREGRESSIVE], COSINE_MASKED)}
    if IMAGE_ROW_METRICS in metrics:
        out["image_rows_cosine_masked"] = interval(
            metrics[IMAGE_ROW_METRICS][AUTOREGRESSIVE], COSINE_MASKED
        )
    images = results.get(IMAGE_PROMPTS, {}).get(run)
    if images:
        out["image_prompts"] = {
            "text": interval(images["text"], ADHERENCE),
            **{
                bridge: interval(rows, ADHERENCE) | interval(rows, IMAGE_TO_TEXT)
                for bridge, rows in images["bridges"].items()
            },
        }
    return out


def folder_of(work: Path, variant: str) -> Path:
    return work / variant.replace(" ", "-")


def run(
    params: Params,
    runs: list[str],
    image_fraction: float,
    bridges: list[str],
    work: Path,
    captions_dir: Path,
) -> dict:
    gap_dir = work / "gap"
    run_gap_stage(params, gap_dir, captions_dir)
    variants = [(TEXT_ONLY, 0.0, params.gap.bridge), *[(b, image_fraction, b) for b in bridges]]
    table = {}
    for name, image, bridge in variants:
        folder = folder_of(work, name)
        p = variant_params(params, runs, image, bridge)
        run_extract_stage(p, captions_dir, folder / "shards", gap_dir)
        for run_name in runs:
            train_model(
                run_name,
                p,
                folder / "shards",
                folder / "models" / run_name,
                folder / "train",
                folder / "checkpoints",
                gap_dir,
            )
        # Text prompts are judged once for every variant together (paired), below; image
        # prompts through every bridge side by side.
        p = dataclasses.replace(
            p, evaluate=dataclasses.replace(p.evaluate, adherence_prompts=0, bridges="all")
        )
        results = run_evaluate_stage(
            p,
            folder / "shards",
            captions_dir,
            folder / "models",
            folder / "metrics",
            folder / "plots",
            gap_dir,
        )
        table[name] = {
            "augment_image": image,
            "bridge": bridge,
            "runs": {r: summary(results, r) for r in runs},
        }
    # The runs trained without image rows, scored on each bridge's test image rows (the same
    # scenes and captions, brought to text space by that bridge).
    e, mask_weight = params.evaluate, params.train.mask_weight
    for run_name in runs:
        model = load_deprojector(folder_of(work, TEXT_ONLY) / "models" / run_name)
        by_bridge = table[TEXT_ONLY]["runs"][run_name]["image_rows_cosine_masked_by_bridge"] = {}
        for bridge in bridges:
            reader = ShardReader(folder_of(work, bridge) / "shards" / "test")
            _, free = score_model(
                model, reader, e.batch_size, mask_weight, reader.rows_of(image=True)
            )
            by_bridge[bridge] = interval(free.result(e.seed), COSINE_MASKED)
    judge_text_prompts(params, runs, [name for name, _, _ in variants], work, table)
    return table


def judge_text_prompts(
    params: Params, runs: list[str], variants: list[str], work: Path, table: dict
) -> None:
    """Held-out text prompts (evaluate.adherence_prompts per kind) judged for every run of
    every variant on the same prompts and seeds: each one's adherence, and its paired
    difference to the same run trained without image rows (`..._vs_text_only`)."""
    p = dataclasses.replace(params, models={})
    reference = load_encoders(p, work)[REFERENCE]
    encoders = {REFERENCE: reference}
    for variant in variants:
        for run_name in runs:
            model = load_deprojector(folder_of(work, variant) / "models" / run_name)
            encoders[f"{variant} / {run_name}"] = reference.with_deprojector(model)
    world = World.of(params.base.clip, params.base.sd)
    single, multi = params.render.prompts(world is not None)
    _, per_prompt = evaluate_adherence(
        p,
        encoders,
        load_pipeline(params.base.sd, params.render),
        Scorer.load(params.base.clip, world),
        set(single) | set(multi),
    )
    seed = params.evaluate.seed
    for kind, scores in per_prompt.items():
        for variant in variants:
            for run_name in runs:
                mine = column(scores[f"{variant} / {run_name}"], ADHERENCE)
                out = table[variant]["runs"][run_name]
                out[f"text_adherence_{kind}"] = mean_with_ci(ADHERENCE, mine, seed)
                if variant != TEXT_ONLY:
                    before = column(scores[f"{TEXT_ONLY} / {run_name}"], ADHERENCE)
                    out[f"text_adherence_{kind}_vs_text_only"] = paired_difference(
                        np.mean, [mine], [before], seed
                    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["vt-rollout", "vicinity-transformer"])
    parser.add_argument("--image-fraction", type=float, default=0.3)
    parser.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="Held-out text prompts per kind and drawn scenes judged "
        "(default: evaluate.adherence_prompts and evaluate.image_prompts).",
    )
    parser.add_argument("--bridges", nargs="+", default=list(BRIDGES), choices=BRIDGES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=None, help="Write the table here (JSON).")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="Toy sizes (60 captions, 1 epoch, 4 scenes): every path, fast.",
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.prompts:
        params = dataclasses.replace(
            params,
            evaluate=dataclasses.replace(
                params.evaluate,
                adherence_prompts=args.prompts,
                image_prompts=args.prompts,
            ),
        )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        captions_dir = Path("data/captions")
        if args.tiny:
            params = dataclasses.replace(
                params,
                captions=dataclasses.replace(params.captions, train_size=60, test_size=10),
                train=dataclasses.replace(params.train, epochs=1),
                gap=dataclasses.replace(params.gap, pairs=20, bank=60),
                evaluate=dataclasses.replace(
                    params.evaluate, adherence_prompts=2, image_prompts=4, combination_pairs=4
                ),
                render=dataclasses.replace(params.render, steps=2),
            )
            captions_dir = work / "captions"
            run_captions_stage(params, captions_dir)
        table = run(params, args.runs, args.image_fraction, args.bridges, work, captions_dir)
    if args.out:
        write_json(args.out, table)
    print(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
