"""The `evaluate` stage: test-set metrics of every trained deprojector.

The metrics are described in docs/architectures.md (training data and loss).

For each model: loss and cosine similarity, teacher-forced and autoregressive; the
combination test (does deprojecting Σ(e_k − null) + null beat blending hidden states, or
looking it up among the training rows?); the autoregressive cosine per position for a DVC
plot. Two baselines are scored the same way: `null-baseline`, the trivial predictor that
outputs `null` at every position, and `retrieval`, the mean hidden states of the nearest
training rows (pipeline/metrics/retrieval.py). Every mean comes with its 95 % bootstrap interval
over
the test rows (pipeline/metrics/intervals.py), and `comparison.json` says which rows are within the
noise of the best run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config.params import Params
from pipeline.config.runs import check_runs
from pipeline.core.conventions import MAX_LENGTH
from pipeline.core.jsonio import write_json
from pipeline.core.names import (
    ADHERENCE,
    COMPARISON,
    IMAGE_PROMPTS,
    NULL_BASELINE,
    REFERENCE,
    RETRIEVAL,
)
from pipeline.data.captions import read_split
from pipeline.data.shards import ShardReader, load_constants
from pipeline.metrics.adherence import Scorer, evaluate_adherence, evaluate_image_prompts
from pipeline.metrics.retrieval import Retrieval
from pipeline.metrics.scores import (
    IMAGE_ROW_METRICS,
    VALIDATION_FRACTION,
    Scores,
    choose_k,
    combination_pairs,
    combination_scores,
    null_answer,
    score_answers,
    score_model,
)
from pipeline.metrics.significance import comparison, seed_replicates, seed_spread
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.encoders import load_encoders
from pipeline.sampling.sd import load_pipeline
from pipeline.world.embedded import World


def run_evaluate_stage(params: Params, shards_dir: Path = Path("data/shards"),
                       captions_dir: Path = Path("data/captions"),
                       models_dir: Path = Path("models"),
                       metrics_dir: Path = Path("reports/metrics"),
                       plots_dir: Path = Path("reports/plots"),
                       gap_dir: Path = Path("data/gap")) -> dict:
    check_runs(params.models)
    e, t = params.evaluate, params.train
    constants = load_constants(shards_dir / "constants.safetensors")
    null = constants["null"]
    reader = ShardReader(shards_dir / "test")
    world = World.of(params.base.clip, params.base.sd)
    image_prompts = world is not None and e.image_prompts > 0
    # Models first: one of another base fails here, before any baseline is computed.
    encoders = load_encoders(params, models_dir, gap_dir if image_prompts else None)
    train = ShardReader(shards_dir / "train", reader.hidden_size)
    k, validation = choose_k(train, null, e.seed, e.batch_size, t.mask_weight)
    retrieval = Retrieval(train, null)
    clip = encoders[REFERENCE].clip
    models = {name: encoder.deprojector for name, encoder in encoders.items()
              if encoder.deprojector is not None}
    pairs = combination_pairs(read_split(captions_dir, "test"), e.combination_pairs,
                              e.seed, clip)
    combination = combination_scores(models, retrieval, k, pairs, clip, null, e.seed) \
        if pairs else {}

    def score(rows: np.ndarray, what: str) -> tuple[dict[str, Scores], dict[str, Scores]]:
        """(teacher-forced, autoregressive) scores of every run and baseline on `rows`."""
        # The baselines answer from the embedding alone: one score serves both modes.
        free = {NULL_BASELINE: score_answers(null_answer(constants), reader, e.batch_size,
                                             t.mask_weight, rows),
                RETRIEVAL: score_answers(lambda embeds: retrieval.answer(embeds, k), reader,
                                         e.batch_size, t.mask_weight, rows)}
        forced = dict(free)
        for name in tqdm(params.models, desc=f"evaluate {what}", unit="model"):
            forced[name], free[name] = score_model(models[name], reader, e.batch_size,
                                                   t.mask_weight, rows)
        return forced, free

    # Caption rows give the text metrics; image rows (augment.image), scored apart, how well
    # an image's embedding is deprojected to its caption's states.
    forced, free = score(reader.rows_of(image=False), "caption rows")
    results = {name: {"teacher_forced": forced[name].result(e.seed),
                      "autoregressive": scores.result(e.seed)} for name, scores in free.items()}
    image_rows = reader.rows_of(image=True)
    if len(image_rows):
        image_forced, image_free = score(image_rows, "image rows")
        for name, scores in image_free.items():
            results[name][IMAGE_ROW_METRICS] = {"rows": len(image_rows),
                                         "teacher_forced": image_forced[name].result(e.seed),
                                         "autoregressive": scores.result(e.seed)}
    for name, combined in combination.items():
        results[name]["combination"] = combined
    results[RETRIEVAL] = {
        "k": k, "teacher_forcing": False, "training_rows": len(train),
        "validation": {"fraction": VALIDATION_FRACTION, "seed": e.seed,
                       "cosine_masked": {str(c): v for c, v in validation.items()}},
        **results[RETRIEVAL]}
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for name, metrics in results.items():
        write_json(metrics_dir / f"{name}.json", metrics)
    plots_dir.mkdir(parents=True, exist_ok=True)
    curves = {name: scores.per_position() for name, scores in free.items()}
    rows = [{"position": i + 1, **{n: c[i] for n, c in curves.items()}}
            for i in range(MAX_LENGTH - 1)]
    write_json(plots_dir / "cosine_per_position.json", rows, indent=1)
    pictures, held_out = run_pictures(params, encoders, world)
    for name in (ADHERENCE, IMAGE_PROMPTS):
        (metrics_dir / f"{name}.json").unlink(missing_ok=True)
        if name in pictures:
            results[name] = pictures[name]
            write_json(metrics_dir / f"{name}.json", pictures[name])
    groups = seed_replicates(params.models, t.seed)
    replicates = {name for runs in groups.values() for name in runs[1:]}
    terms = {name: scores.masked_terms() for name, scores in free.items()}
    results[COMPARISON] = comparison(terms, list(params.models),
                                     [name for name in params.models if name not in replicates],
                                     held_out, e.seed)
    if groups:
        judged = {name: results[name] | {ADHERENCE: {
            kind: rows[name]["adherence"] for kind, rows in results.get(ADHERENCE, {}).items()
            if "adherence" in rows.get(name, {})}} for name in params.models}
        seeds = {name: spec.train.get("seed", t.seed) for name, spec in params.models.items()}
        results[COMPARISON]["seed_spread"] = seed_spread(judged, groups, seeds)
    write_json(metrics_dir / f"{COMPARISON}.json", results[COMPARISON])
    return results


def run_pictures(params: Params, encoders: dict[str, PromptEncoder],
                 world: World | None) -> tuple[dict, dict | None]:
    """Pictures of held-out prompts and of drawn scenes as prompts (the world only), judged
    (see pipeline/metrics/adherence.py), and the held-out prompts' per-prompt scores {kind: {row:
    [...]}} (None when they are off)."""
    e = params.evaluate
    image_prompts = world is not None and e.image_prompts > 0
    if not e.adherence_prompts and not image_prompts:
        return {}, None
    pipe = load_pipeline(params.base.sd, params.render)
    scorer = Scorer.load(params.base.clip, world)
    single, multi = params.render.prompts(world is not None)
    exclude = set(single) | set(multi)
    results, held_out = {}, None
    if e.adherence_prompts:
        results[ADHERENCE], held_out = evaluate_adherence(params, encoders, pipe, scorer,
                                                          exclude)
    if image_prompts:
        results[IMAGE_PROMPTS] = evaluate_image_prompts(params, encoders, pipe, scorer, world,
                                                        exclude)
    return results, held_out
