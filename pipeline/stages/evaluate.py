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

from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config.params import Params
from pipeline.config.runs import check_runs
from pipeline.core.conventions import MAX_LENGTH
from pipeline.core.jsonio import write_json
from pipeline.core.names import (
    ADHERENCE,
    BLEND,
    COMPARISON,
    HEADLINE,
    IMAGE_PROMPTS,
    NULL_BASELINE,
    REFERENCE,
    RETRIEVAL,
)
from pipeline.data.captions import read_split
from pipeline.data.shards import ShardReader, load_constants
from pipeline.metrics.adherence import (
    BaselineRow,
    Scorer,
    evaluate_adherence,
    evaluate_image_prompts,
)
from pipeline.metrics.headline import headline
from pipeline.metrics.records import (
    COMBINATION,
    IMAGE_ROW_METRICS,
    SEED_SPREAD,
    AdherenceResults,
    CombinationScores,
    Comparison,
    HeldOutScores,
    ImagePromptResults,
    ImageRowMetrics,
    Kind,
    RetrievalMetrics,
    RunMetrics,
    Validation,
)
from pipeline.metrics.retrieval import Retrieval
from pipeline.metrics.scores import (
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
from pipeline.models import Deprojector
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.encoders import load_encoders
from pipeline.sampling.sd import load_pipeline
from pipeline.world.embedded import World


class Pictures(TypedDict, total=False):
    """Held-out pictures judged, where they ran: ADHERENCE and IMAGE_PROMPTS (file names)."""

    adherence: AdherenceResults
    image_prompts: ImagePromptResults


# What the stage wrote, by file name: each run's and baseline's metrics, Pictures, COMPARISON.
EvaluateResults = dict[str, RunMetrics | AdherenceResults | ImagePromptResults | Comparison]


@dataclass
class Inputs:
    """What every step reads: the shards, the base models' world, each row's encoder."""

    constants: dict[str, torch.Tensor]
    test: ShardReader
    train: ShardReader
    world: World | None
    encoders: dict[str, PromptEncoder]  # the reference row's (no deprojector) first

    @property
    def null(self) -> torch.Tensor:
        return self.constants["null"]

    @property
    def models(self) -> dict[str, Deprojector]:
        return {
            name: encoder.deprojector
            for name, encoder in self.encoders.items()
            if encoder.deprojector is not None
        }


@dataclass
class StatesScores:
    """Step 3's scores: every run and baseline, teacher-forced and autoregressive, on the
    caption rows and (where the test split has them) on the image rows."""

    forced: dict[str, Scores]
    free: dict[str, Scores]
    image_rows: int
    image_forced: dict[str, Scores]
    image_free: dict[str, Scores]


def run_evaluate_stage(
    params: Params,
    shards_dir: Path = Path("data/shards"),
    captions_dir: Path = Path("data/captions"),
    models_dir: Path = Path("models"),
    metrics_dir: Path = Path("reports/metrics"),
    plots_dir: Path = Path("reports/plots"),
    gap_dir: Path = Path("data/gap"),
) -> EvaluateResults:
    """Writes metrics_dir/RUN.json (runs and baselines), adherence.json, image_prompts.json,
    comparison.json, plots_dir/cosine_per_position.json and, read from those records, the
    headline beside metrics_dir (reports/headline.json, pipeline/metrics/headline.py);
    returns the records by name."""
    e = params.evaluate
    # 1. Inputs: the shards, the world, every run's encoder.
    inputs = load_inputs(params, shards_dir, models_dir, gap_dir)
    # 2. The retrieval baseline: its k chosen on validation rows of the training split.
    k, validation = choose_k(
        inputs.train, inputs.null, e.seed, e.batch_size, params.train.mask_weight
    )
    retrieval = Retrieval(inputs.train, inputs.null)
    # 3. States metrics: the combination test, then every run and baseline on the test rows.
    combination = combination_test(params, inputs, retrieval, k, captions_dir)
    scores = score_states(params, inputs, retrieval, k)
    metrics = run_metrics(params, scores, combination, k, len(inputs.train), validation)
    # 4. Written: each run's metrics and the autoregressive cosine per position.
    write_states(metrics, scores.free, metrics_dir, plots_dir)
    # 5. Pictures of held-out prompts and drawn scenes, judged (the world only).
    pictures, held_out = run_pictures(
        params, inputs.encoders, inputs.world, baseline_rows(inputs, retrieval, k)
    )
    write_pictures(pictures, metrics_dir)
    # 6. Which differences are inside the noise: comparison.json.
    compared = compare(params, scores.free, metrics, pictures.get(ADHERENCE), held_out)
    write_json(metrics_dir / f"{COMPARISON}.json", compared)
    results: EvaluateResults = {**metrics}
    if ADHERENCE in pictures:
        results[ADHERENCE] = pictures[ADHERENCE]
    if IMAGE_PROMPTS in pictures:
        results[IMAGE_PROMPTS] = pictures[IMAGE_PROMPTS]
    results[COMPARISON] = compared
    # 7. The headline: a handful of numbers per row, copied from the records above.
    write_json(metrics_dir.parent / f"{HEADLINE}.json", headline(results))
    return results


def load_inputs(params: Params, shards_dir: Path, models_dir: Path, gap_dir: Path) -> Inputs:
    """Step 1: the runs checked, the shards opened and every row's encoder loaded (models
    first: one of another base fails here, before any baseline is computed)."""
    check_runs(params.models)
    constants = load_constants(shards_dir / "constants.safetensors")
    test = ShardReader(shards_dir / "test")
    world = World.of(params.base.clip, params.base.sd)
    image_prompts = world is not None and params.evaluate.image_prompts > 0
    encoders = load_encoders(params, models_dir, gap_dir if image_prompts else None)
    train = ShardReader(shards_dir / "train", test.hidden_size)
    return Inputs(constants, test, train, world, encoders)


def combination_test(
    params: Params, inputs: Inputs, retrieval: Retrieval, k: int, captions_dir: Path
) -> dict[str, CombinationScores]:
    """Step 3a: per run (and RETRIEVAL), deprojected Σ(e_k − null) + null of held-out caption
    pairs against H("A B"), beside blending and retrieval; {} without pairs."""
    e = params.evaluate
    clip = inputs.encoders[REFERENCE].clip
    pairs = combination_pairs(read_split(captions_dir, "test"), e.combination_pairs, e.seed, clip)
    return (
        combination_scores(inputs.models, retrieval, k, pairs, clip, inputs.null, e.seed)
        if pairs
        else {}
    )


def score_states(params: Params, inputs: Inputs, retrieval: Retrieval, k: int) -> StatesScores:
    """Step 3b: caption rows give the text metrics; image rows (augment.image), scored apart,
    how well an image's embedding is deprojected to its caption's states."""
    e, mask_weight = params.evaluate, params.train.mask_weight
    models, reader = inputs.models, inputs.test

    def score(rows: np.ndarray, what: str) -> tuple[dict[str, Scores], dict[str, Scores]]:
        """(teacher-forced, autoregressive) scores of every run and baseline on `rows`."""
        # The baselines answer from the embedding alone: one score serves both modes.
        free = {
            NULL_BASELINE: score_answers(
                null_answer(inputs.constants), reader, e.batch_size, mask_weight, rows
            ),
            RETRIEVAL: score_answers(
                lambda embeds: retrieval.answer(embeds, k), reader, e.batch_size, mask_weight, rows
            ),
        }
        forced = dict(free)
        for name in tqdm(params.models, desc=f"evaluate {what}", unit="model"):
            forced[name], free[name] = score_model(
                models[name], reader, e.batch_size, mask_weight, rows
            )
        return forced, free

    forced, free = score(reader.rows_of(image=False), "caption rows")
    image_rows = reader.rows_of(image=True)
    image_forced, image_free = score(image_rows, "image rows") if len(image_rows) else ({}, {})
    return StatesScores(forced, free, len(image_rows), image_forced, image_free)


def run_metrics(
    params: Params,
    scores: StatesScores,
    combination: dict[str, CombinationScores],
    k: int,
    training_rows: int,
    validation: dict[int, float],
) -> dict[str, RunMetrics]:
    """Step 3c: each run's and baseline's metrics file, in the order it is written:
    teacher-forced, autoregressive, image rows, combination; the retrieval's after its k,
    the training rows it answers from and each k's validation score."""
    seed = params.evaluate.seed
    results: dict[str, RunMetrics] = {
        name: RunMetrics(
            teacher_forced=scores.forced[name].result(seed), autoregressive=free.result(seed)
        )
        for name, free in scores.free.items()
    }
    for name, free in scores.image_free.items():
        results[name][IMAGE_ROW_METRICS] = ImageRowMetrics(
            rows=scores.image_rows,
            teacher_forced=scores.image_forced[name].result(seed),
            autoregressive=free.result(seed),
        )
    for name, combined in combination.items():
        results[name][COMBINATION] = combined
    results[RETRIEVAL] = RetrievalMetrics(
        k=k,
        teacher_forcing=False,
        training_rows=training_rows,
        validation=Validation(
            fraction=VALIDATION_FRACTION,
            seed=seed,
            cosine_masked={str(c): v for c, v in validation.items()},
        ),
        **results[RETRIEVAL],
    )
    return results


def write_states(
    metrics: dict[str, RunMetrics], free: dict[str, Scores], metrics_dir: Path, plots_dir: Path
) -> None:
    """Step 4: metrics_dir/RUN.json and plots_dir/cosine_per_position.json (one row per
    position 1..76, a column per run and baseline)."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for name, record in metrics.items():
        write_json(metrics_dir / f"{name}.json", record)
    plots_dir.mkdir(parents=True, exist_ok=True)
    curves = {name: scores.per_position() for name, scores in free.items()}
    rows = [
        {"position": i + 1, **{n: c[i] for n, c in curves.items()}} for i in range(MAX_LENGTH - 1)
    ]
    write_json(plots_dir / "cosine_per_position.json", rows, indent=1)


def write_pictures(pictures: Pictures, metrics_dir: Path) -> None:
    """Step 5's files: adherence.json and image_prompts.json where they were judged (a stale
    one removed where they were not)."""
    records = {ADHERENCE: pictures.get(ADHERENCE), IMAGE_PROMPTS: pictures.get(IMAGE_PROMPTS)}
    for name, record in records.items():
        (metrics_dir / f"{name}.json").unlink(missing_ok=True)
        if record is not None:
            write_json(metrics_dir / f"{name}.json", record)


def compare(
    params: Params,
    free: dict[str, Scores],
    metrics: dict[str, RunMetrics],
    adherence: AdherenceResults | None,
    held_out: HeldOutScores | None,
) -> Comparison:
    """Step 6: paired differences to the best run, between the runs that are not seed
    replicates, and of held-out adherence to the reference row; the seed replicates' spread."""
    e, t = params.evaluate, params.train
    groups = seed_replicates(params.models, t.seed)
    replicates = {name for runs in groups.values() for name in runs[1:]}
    terms = {name: scores.masked_terms() for name, scores in free.items()}
    out = comparison(
        terms,
        list(params.models),
        [name for name in params.models if name not in replicates],
        held_out,
        e.seed,
    )
    if groups:
        judged = {
            name: {
                **metrics[name],
                ADHERENCE: {
                    kind: rows[name][ADHERENCE]
                    for kind, rows in (adherence or {}).items()
                    if ADHERENCE in rows.get(name, {})
                },
            }
            for name in params.models
        }
        seeds = {name: spec.train.get("seed", t.seed) for name, spec in params.models.items()}
        out[SEED_SPREAD] = seed_spread(judged, groups, seeds)
    return out


def baseline_rows(inputs: Inputs, retrieval: Retrieval, k: int) -> dict[str, BaselineRow]:
    """Step 5's adherence rows beside the runs: RETRIEVAL, the states of the k nearest
    training rows of the embedding a deprojector receives (the whole prompt's, or the comma
    parts combined), and BLEND (comma prompts): the parts' ordinary states averaged, as
    compel's `.blend()` computes them. Without runs there is no embedding to retrieve from."""
    reference = inputs.encoders[REFERENCE]
    runs = [encoder for name, encoder in inputs.encoders.items() if name != REFERENCE]

    def retrieved(texts: list[str], kind: Kind) -> torch.Tensor | None:
        if not runs:
            return None
        embeds = torch.cat([runs[0].embedding(t, combine=kind == "multi") for t in texts])
        return retrieval.answer(embeds, k)

    def blended(texts: list[str], kind: Kind) -> torch.Tensor | None:
        return torch.cat([reference.encode_blend(t) for t in texts]) if kind == "multi" else None

    return {RETRIEVAL: retrieved, BLEND: blended}


def run_pictures(
    params: Params,
    encoders: dict[str, PromptEncoder],
    world: World | None,
    baselines: dict[str, BaselineRow] | None = None,
) -> tuple[Pictures, HeldOutScores | None]:
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
    results: Pictures = {}
    held_out = None
    if e.adherence_prompts:
        results[ADHERENCE], held_out = evaluate_adherence(
            params, encoders, pipe, scorer, exclude, baselines
        )
    if world is not None and e.image_prompts > 0:
        results[IMAGE_PROMPTS] = evaluate_image_prompts(
            params, encoders, pipe, scorer, world, exclude
        )
    return results, held_out
