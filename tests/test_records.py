"""The records stages hand each other: each key constant is a field of its TypedDict."""

from __future__ import annotations

from typing import get_type_hints

from pipeline.metrics import records


def fields(record: type) -> set[str]:
    return set(get_type_hints(record))


def test_key_constants_are_fields_of_their_records():
    assert {records.ADHERENCE, records.CLIP_SCORE} == fields(records.PictureScores)
    assert {
        records.TEACHER_FORCED,
        records.AUTOREGRESSIVE,
        records.IMAGE_ROW_METRICS,
        records.COMBINATION,
    } == fields(records.RunMetrics)
    assert records.ROWS in fields(records.ImageRowMetrics)
    assert records.COSINE_MASKED in fields(records.Validation)
    assert {records.SEED_SPREAD, records.ADHERENCE} <= fields(records.Comparison)
    assert set(records.PICTURE_SCORES) == fields(records.PictureScores)


def test_seed_spread_fields_are_the_seed_metrics():
    from pipeline.metrics.significance import SEED_METRICS

    assert fields(records.SeedSpread) == {"runs", "seeds", *(key for key, _ in SEED_METRICS)}


def test_paired_difference_keys_follow_the_interval_convention():
    from pipeline.metrics.intervals import ci_key

    assert fields(records.PairedDifference) == {"difference", ci_key("difference"), "within_noise"}
