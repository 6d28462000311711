"""The retrieval baseline and the bootstrap intervals of the evaluate stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.shards import ShardReader, load_constants
from pipeline.metrics.intervals import (
    ci_key,
    interval,
    mean_with_ci,
    paired_difference,
    ratio_of_sums,
    ratio_with_ci,
)
from pipeline.metrics.retrieval import K_CANDIDATES, Retrieval
from pipeline.metrics.scores import VALIDATION_FRACTION, choose_k, validation_split

# --- intervals ------------------------------------------------------------------------------


def test_intervals_contain_their_estimate_and_are_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(0.6, 0.1, 200)
    counts = rng.integers(2, 20, 200).astype(float)
    totals = counts * rng.uniform(0.3, 0.9, 200)
    for result, key in (
        (mean_with_ci("cosine", values, seed=3), "cosine"),
        (ratio_with_ci("cosine_masked", totals, counts, seed=3), "cosine_masked"),
    ):
        low, high = result[ci_key(key)]
        assert low < result[key] < high
        assert high - low < 0.1
    assert mean_with_ci("cosine", values, seed=3) == mean_with_ci("cosine", values, seed=3)
    assert mean_with_ci("cosine", values, seed=4) != mean_with_ci("cosine", values, seed=3)
    assert interval(np.mean, [values[:1]], seed=0) is None  # one row: nothing to resample
    # A ratio whose denominator is 0 in some resamples (one text picture of six judged
    # right) is unbounded there: no interval, rather than NaN in the file.
    one = np.array([0.0, 0, 0, 0, 0, 1])
    assert ratio_with_ci("image_to_text", one, one, seed=0) == {
        "image_to_text": 1.0,
        "image_to_text_ci95": None,
    }


def test_a_ratio_of_sums_is_bootstrapped_as_a_ratio_not_as_a_mean_of_row_ratios() -> None:
    # Half the rows: 1 of 1 position; half: 0 of 99. Σ/Σ = 0.01, the mean of ratios 0.5.
    totals = np.array([1.0, 0.0] * 50)
    counts = np.array([1.0, 99.0] * 50)
    result = ratio_with_ci("cosine_masked", totals, counts, seed=0)
    assert result["cosine_masked"] == pytest.approx(0.01)
    low, high = result[ci_key("cosine_masked")]
    assert 0.005 < low < 0.01 < high < 0.02


def test_paired_difference_is_zero_for_equal_scores_and_clear_for_different_ones() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 100)  # rows differ a lot from each other ...
    same = paired_difference(np.mean, [base], [base.copy()], seed=0)
    assert same == {"difference": 0.0, "difference_ci95": [0.0, 0.0], "within_noise": True}
    better = base + 0.02 + rng.normal(0, 0.005, 100)  # ... a run beats the other on each row
    clear = paired_difference(np.mean, [better], [base], seed=0)
    assert clear["difference"] == pytest.approx(0.02, abs=0.002)
    assert 0 < clear["difference_ci95"][0] < clear["difference"] < clear["difference_ci95"][1]
    assert clear["within_noise"] is False
    # Unpaired, the two means' intervals overlap: only the pairing shows the difference.
    assert interval(np.mean, [better], 0)[0] < interval(np.mean, [base], 0)[1]
    noise = paired_difference(np.mean, [base + rng.normal(0, 0.2, 100)], [base], seed=0)
    assert noise["within_noise"] is True
    counts = np.full(100, 5.0)
    ratio = paired_difference(
        ratio_of_sums, [better * counts, counts], [base * counts, counts], seed=0
    )
    assert ratio["difference"] == pytest.approx(clear["difference"])
    assert ratio["within_noise"] is False


# --- retrieval ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train(small_shards) -> ShardReader:
    return ShardReader(small_shards / "train")


@pytest.fixture(scope="module")
def null(small_shards) -> torch.Tensor:
    return load_constants(small_shards / "constants.safetensors")["null"]


def test_a_training_rows_own_embedding_with_k_1_returns_its_states(train, null) -> None:
    rows = np.arange(0, len(train), 7)
    batch = train.batch(rows)
    retrieval = Retrieval(train, null)
    assert (retrieval.neighbours(batch.embeds, 1)[:, 0] == rows).all()
    assert torch.equal(retrieval.answer(batch.embeds, 1), batch.hidden)
    # k = 2: the mean of the row and its nearest other row.
    nearest = retrieval.neighbours(batch.embeds, 2)
    expected = (batch.hidden + train.batch(nearest[:, 1]).hidden) / 2
    torch.testing.assert_close(retrieval.answer(batch.embeds, 2), expected)


def test_k_is_chosen_on_a_validation_split_of_the_training_rows(train, null) -> None:
    validation, database = validation_split(len(train), seed=0)
    assert len(validation) == round(len(train) * VALIDATION_FRACTION)
    assert not set(validation) & set(database)
    assert sorted([*validation, *database]) == list(range(len(train)))
    assert not np.array_equal(validation_split(len(train), seed=1)[0], validation)
    read = []
    real_batch = train.batch

    def spy(indices):
        read.append(np.asarray(indices).copy())
        return real_batch(indices)

    train.batch = spy  # every row the selection reads
    try:
        k, scores = choose_k(train, null, seed=0, batch_size=4, mask_weight=25.0)
    finally:
        del train.batch
    assert k in K_CANDIDATES and k in scores
    assert list(scores) == [c for c in K_CANDIDATES if c <= len(database)]
    assert scores[k] == max(scores.values())
    # Each read is a batch of validation rows (the queries) or of database rows (answers).
    queries = [r for r in read if set(r) <= set(validation)]
    answers = [r for r in read if set(r) <= set(database)]
    assert len(queries) + len(answers) == len(read) and answers
    assert sorted(np.concatenate(queries)) == sorted(validation)
    assert choose_k(train, null, seed=0, batch_size=4, mask_weight=25.0) == (k, scores)
