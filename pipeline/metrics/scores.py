"""States metrics of a deprojector or a baseline on the test shards: autoregressive and
teacher-forced cosine, combination, retrieval's k chosen on validation rows."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch

from pipeline.base.clip_encode import encode_texts, token_counts
from pipeline.base.loaders import ClipText
from pipeline.core.conventions import MAX_LENGTH, combine_embeddings
from pipeline.core.names import (
    RETRIEVAL,
)
from pipeline.data.shards import ShardReader
from pipeline.metrics.intervals import mean_with_ci, ratio_of_sums, ratio_with_ci
from pipeline.metrics.losses import (
    cosine_per_position,
    masked_cosine_terms,
    mse,
    weighted_mse,
)
from pipeline.metrics.records import (
    COSINE_MASKED,
    CombinationScores,
    StatesMetrics,
)
from pipeline.metrics.retrieval import K_CANDIDATES, Retrieval
from pipeline.models import Deprojector

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
            key: [] for key in ("mse", "weighted_mse", "cosine", "masked_total", "masked_count")
        }
        self.cosine = torch.zeros(MAX_LENGTH)  # per position, summed over rows
        self.rows = 0

    def add(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mask_weight: float
    ) -> None:
        cos = cosine_per_position(pred, target)
        total, count = masked_cosine_terms(cos, mask)
        values = {
            "mse": mse(pred, target, per_row=True),
            "weighted_mse": weighted_mse(pred, target, mask, mask_weight, per_row=True),
            "cosine": cos[:, 1:].mean(dim=1),
            "masked_total": total,
            "masked_count": count,
        }
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

    def result(self, seed: int) -> StatesMetrics:
        """Each metric and its interval (KEY_ci95) over test rows resampled with `seed`."""
        out: StatesMetrics = {}
        for key in ("mse", "weighted_mse", "cosine"):
            out |= mean_with_ci(key, self.values(key), seed)
        return out | ratio_with_ci(COSINE_MASKED, *self.masked_terms(), seed)

    def per_position(self) -> list[float]:
        return (self.cosine[1:] / self.rows).tolist()


@torch.no_grad()
def score_model(
    model: Deprojector,
    reader: ShardReader,
    batch_size: int,
    mask_weight: float,
    rows: np.ndarray | None = None,
) -> tuple[Scores, Scores]:
    """Teacher-forced and autoregressive scores of a deprojector on `rows` of `reader` (None:
    every row)."""
    forced, free = Scores(), Scores()
    for batch in reader.iter_batches(batch_size, rows=rows):
        forced.add(model(batch.embeds, batch.hidden), batch.hidden, batch.mask, mask_weight)
        free.add(model.generate(batch.embeds), batch.hidden, batch.mask, mask_weight)
    return forced, free


@torch.no_grad()
def score_answers(
    answer: Callable[[torch.Tensor], torch.Tensor],
    reader: ShardReader,
    batch_size: int,
    mask_weight: float,
    rows: np.ndarray | None = None,
) -> Scores:
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
def choose_k(
    train: ShardReader, null: torch.Tensor, seed: int, batch_size: int, mask_weight: float
) -> tuple[int, dict[int, float]]:
    """The retrieval's k and each candidate's validation score: the k of K_CANDIDATES (those
    the database holds) with the best masked cosine (autoregressive-equivalent: no teacher
    forcing) on a validation split of the training rows answered from the other training
    rows (validation_split). Only the training split is read; ties go to the smaller k."""
    validation, database = validation_split(len(train), seed)
    retrieval = Retrieval(train, null, database)
    candidates = [k for k in K_CANDIDATES if k <= len(retrieval)]
    scores = {k: Scores() for k in candidates}
    for begin in range(0, len(validation), batch_size):
        batch = train.batch(validation[begin : begin + batch_size])
        for k, pred in retrieval.answers(batch.embeds, candidates).items():
            scores[k].add(pred, batch.hidden, batch.mask, mask_weight)
    values = {k: s.cosine_masked() for k, s in scores.items()}
    return max(values, key=values.__getitem__), values


def combination_pairs(
    captions: list[str], count: int, seed: int, clip: ClipText
) -> list[tuple[str, str]]:
    """Held-out pairs (A, B) of test captions whose joined text "A B" fits the context."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    for _ in range(count * 4):
        if len(pairs) == count or len(captions) < 2:
            break
        a, b = rng.sample(captions, 2)
        if token_counts(clip, [f"{a} {b}"])[0] <= MAX_LENGTH:
            pairs.append((a, b))
    return pairs


@torch.no_grad()
def combination_scores(
    models: dict[str, Deprojector],
    retrieval: Retrieval,
    k: int,
    pairs: list[tuple[str, str]],
    clip: ClipText,
    null: torch.Tensor,
    seed: int,
) -> dict[str, CombinationScores]:
    """Against H("A B") of held-out pairs: each run's deprojection of Σ(e_k − null) + null
    (`deprojector_cosine`), the averaged states of A and B (`blend_cosine`) and the
    retrieval's answer to the combined embedding, the mean states of its k nearest training
    rows (`retrieval_cosine`); masked cosines with intervals over resampled pairs. Per run,
    and for RETRIEVAL its own and the blend."""
    a = encode_texts(clip, [p[0] for p in pairs])
    b = encode_texts(clip, [p[1] for p in pairs])
    joined = encode_texts(clip, [f"{x} {y}" for x, y in pairs])
    embeds = combine_embeddings(torch.stack([a.pooled, b.pooled], dim=1), null)

    def masked(key: str, pred: torch.Tensor) -> CombinationScores:
        total, count = masked_cosine_terms(cosine_per_position(pred, joined.hidden), joined.mask)
        return ratio_with_ci(key, total.double().numpy(), count.double().numpy(), seed)

    baselines = (
        masked("blend_cosine", (a.hidden + b.hidden) / 2)
        | masked("retrieval_cosine", retrieval.answer(embeds, k))
        | {"pairs": len(pairs)}
    )
    result = {
        name: masked("deprojector_cosine", model.generate(embeds)) | baselines
        for name, model in models.items()
    }
    return result | {RETRIEVAL: baselines}
