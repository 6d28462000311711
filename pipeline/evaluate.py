"""The `evaluate` stage: test-set metrics of every trained deprojector.

The metrics are described in docs/architectures.md (training data and loss).

For each model: loss and cosine similarity, teacher-forced and autoregressive; the
combination test (does deprojecting Σ(e_k − null) + null beat blending hidden states, or
looking it up among the training rows?); the autoregressive cosine per position for a DVC
plot. Two baselines are scored the same way: `null-baseline`, the trivial predictor that
outputs `null` at every position, and `retrieval`, the mean hidden states of the nearest
training rows (pipeline/retrieval.py). Every mean comes with its 95 % bootstrap interval over
the test rows (pipeline/intervals.py), and `comparison.json` says which rows are within the
noise of the best run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.adherence import Scorer, evaluate_adherence, evaluate_image_prompts
from pipeline.base_models import ClipText
from pipeline.captions import read_split
from pipeline.clip_encode import encode_texts, token_counts
from pipeline.conventions import MAX_LENGTH, combine_embeddings
from pipeline.generation import load_encoders, load_pipeline
from pipeline.intervals import mean_with_ci, ratio_of_sums, ratio_with_ci
from pipeline.jsonio import write_json
from pipeline.losses import (
    cosine_per_position,
    masked_cosine_terms,
    mse,
    weighted_mse,
)
from pipeline.models import Deprojector
from pipeline.names import (
    ADHERENCE,
    COMPARISON,
    IMAGE_PROMPTS,
    NULL_BASELINE,
    REFERENCE,
    RETRIEVAL,
)
from pipeline.params import Params
from pipeline.prompt_encoder import PromptEncoder
from pipeline.retrieval import K_CANDIDATES, Retrieval
from pipeline.shards import ShardReader, load_constants
from pipeline.significance import comparison, seed_replicates, seed_spread
from pipeline.world.embedded import World

# The key of a run's metrics on the test split's image rows (augment.image).
IMAGE_ROW_METRICS = "image_rows"
# The share of the training rows that chooses the retrieval's k (answered from the rest).
VALIDATION_FRACTION = 0.1


class Scores:
    """Per-row metrics over batches, reduced once at the end to means with intervals.

    mse, weighted_mse and cosine (over positions 1..76) are means of per-row values;
    cosine_masked is Σ cos · mask / Σ mask over every row's in-mask positions 1..n (a row
    with more tokens weighs more), so its interval resamples rows and sums both.
    """

    def __init__(self) -> None:
        self.per_row: dict[str, list[torch.Tensor]] = {
            key: [] for key in ("mse", "weighted_mse", "cosine", "masked_total", "masked_count")}
        self.cosine = torch.zeros(MAX_LENGTH)  # per position, summed over rows
        self.rows = 0

    def add(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
            mask_weight: float) -> None:
        cos = cosine_per_position(pred, target)
        total, count = masked_cosine_terms(cos, mask)
        values = {"mse": mse(pred, target, per_row=True),
                  "weighted_mse": weighted_mse(pred, target, mask, mask_weight, per_row=True),
                  "cosine": cos[:, 1:].mean(dim=1), "masked_total": total, "masked_count": count}
        for key, value in values.items():
            self.per_row[key].append(value.double().cpu())
        self.cosine += cos.sum(dim=0).cpu()
        self.rows += len(target)

    def values(self, key: str) -> np.ndarray:
        """[rows]: one per-row value (a key of `per_row`) of every row scored, in order."""
        return torch.cat(self.per_row[key]).numpy()

    def masked_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """[rows] each: the in-mask cosine sum and the in-mask count of every row."""
        return self.values("masked_total"), self.values("masked_count")

    def cosine_masked(self) -> float:
        return float(ratio_of_sums(*self.masked_terms()))

    def result(self, seed: int) -> dict[str, float | list[float] | None]:
        """Each metric and its interval (KEY_ci95) over test rows resampled with `seed`."""
        out = {}
        for key in ("mse", "weighted_mse", "cosine"):
            out |= mean_with_ci(key, self.values(key), seed)
        return out | ratio_with_ci("cosine_masked", *self.masked_terms(), seed)

    def per_position(self) -> list[float]:
        return (self.cosine[1:] / self.rows).tolist()


@torch.no_grad()
def score_model(model: Deprojector, reader: ShardReader, batch_size: int,
                mask_weight: float, rows: np.ndarray | None = None) -> tuple[Scores, Scores]:
    """Teacher-forced and autoregressive scores of a deprojector on `rows` of `reader` (None:
    every row)."""
    forced, free = Scores(), Scores()
    for batch in reader.iter_batches(batch_size, rows=rows):
        forced.add(model(batch.embeds, batch.hidden), batch.hidden, batch.mask, mask_weight)
        free.add(model.generate(batch.embeds), batch.hidden, batch.mask, mask_weight)
    return forced, free


@torch.no_grad()
def score_answers(answer: Callable[[torch.Tensor], torch.Tensor], reader: ShardReader,
                  batch_size: int, mask_weight: float,
                  rows: np.ndarray | None = None) -> Scores:
    """Scores of a predictor that answers embeddings [b, D] with states [b, 77, D] from the
    embedding alone (a baseline: no teacher forcing), on `rows` of `reader` (None: all)."""
    scores = Scores()
    for batch in reader.iter_batches(batch_size, rows=rows):
        scores.add(answer(batch.embeds), batch.hidden, batch.mask, mask_weight)
    return scores


def null_answer(constants: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The null baseline: `null` at every position (after the sos)."""
    def answer(embeds: torch.Tensor) -> torch.Tensor:
        pred = constants["null"].expand(len(embeds), MAX_LENGTH, -1).clone()
        pred[:, 0] = constants["sos"]
        return pred
    return answer


def validation_split(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, database): a seeded VALIDATION_FRACTION of `rows` training rows (at
    least one) and the rest, each sorted."""
    order = np.random.default_rng(seed).permutation(rows)
    count = max(1, round(rows * VALIDATION_FRACTION))
    return np.sort(order[:count]), np.sort(order[count:])


@torch.no_grad()
def choose_k(train: ShardReader, null: torch.Tensor, seed: int, batch_size: int,
             mask_weight: float) -> tuple[int, dict[int, float]]:
    """The retrieval's k and each candidate's validation score: the k of K_CANDIDATES (those
    the database holds) with the best masked cosine (autoregressive-equivalent: no teacher
    forcing) on a validation split of the training rows answered from the other training
    rows (validation_split). Only the training split is read; ties go to the smaller k."""
    validation, database = validation_split(len(train), seed)
    retrieval = Retrieval(train, null, database)
    candidates = [k for k in K_CANDIDATES if k <= len(retrieval)]
    scores = {k: Scores() for k in candidates}
    for begin in range(0, len(validation), batch_size):
        batch = train.batch(validation[begin:begin + batch_size])
        for k, pred in retrieval.answers(batch.embeds, candidates).items():
            scores[k].add(pred, batch.hidden, batch.mask, mask_weight)
    values = {k: s.cosine_masked() for k, s in scores.items()}
    return max(values, key=values.get), values


def combination_pairs(captions: list[str], count: int, seed: int, clip: ClipText) -> list:
    """Held-out pairs (A, B) of test captions whose joined text "A B" fits the context."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count * 4):
        if len(pairs) == count or len(captions) < 2:
            break
        a, b = rng.sample(captions, 2)
        if token_counts(clip, [f"{a} {b}"])[0] <= MAX_LENGTH:
            pairs.append((a, b))
    return pairs


@torch.no_grad()
def combination_scores(models: dict[str, Deprojector], retrieval: Retrieval, k: int,
                       pairs: list, clip: ClipText, null: torch.Tensor,
                       seed: int) -> dict[str, dict]:
    """Against H("A B") of held-out pairs: each run's deprojection of Σ(e_k − null) + null
    (`deprojector_cosine`), the averaged states of A and B (`blend_cosine`) and the
    retrieval's answer to the combined embedding, the mean states of its k nearest training
    rows (`retrieval_cosine`); masked cosines with intervals over resampled pairs. Per run,
    and for RETRIEVAL its own and the blend."""
    a = encode_texts(clip, [p[0] for p in pairs])
    b = encode_texts(clip, [p[1] for p in pairs])
    joined = encode_texts(clip, [f"{x} {y}" for x, y in pairs])
    embeds = combine_embeddings(torch.stack([a.pooled, b.pooled], dim=1), null)

    def masked(key: str, pred: torch.Tensor) -> dict:
        total, count = masked_cosine_terms(cosine_per_position(pred, joined.hidden),
                                           joined.mask)
        return ratio_with_ci(key, total.double().numpy(), count.double().numpy(), seed)

    baselines = masked("blend_cosine", (a.hidden + b.hidden) / 2) \
        | masked("retrieval_cosine", retrieval.answer(embeds, k)) | {"pairs": len(pairs)}
    result = {name: masked("deprojector_cosine", model.generate(embeds)) | baselines
              for name, model in models.items()}
    return result | {RETRIEVAL: baselines}


def run_evaluate_stage(params: Params, shards_dir: Path = Path("data/shards"),
                       captions_dir: Path = Path("data/captions"),
                       models_dir: Path = Path("models"),
                       metrics_dir: Path = Path("reports/metrics"),
                       plots_dir: Path = Path("reports/plots"),
                       gap_dir: Path = Path("data/gap")) -> dict:
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
    (see pipeline/adherence.py), and the held-out prompts' per-prompt scores {kind: {row:
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
