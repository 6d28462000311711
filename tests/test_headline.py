"""The headline (reports/headline.json): numbers copied from the evaluate records, generic
over the rows and kinds they hold; the committed one is the committed records' own."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.jsonio import dumps
from pipeline.metrics.headline import headline
from pipeline.reporting.compare import WORKSPACE, read_params, resolve, revision_headline

ROOT = Path(__file__).resolve().parents[1]


def states(cosine: float) -> dict:
    return {"cosine_masked": cosine, "cosine_masked_ci95": [cosine - 0.01, cosine + 0.01]}


def summary(adherence: float, ratio: float, all_parts: float) -> dict:
    return {
        "adherence": adherence,
        "adherence_ci95": [0.0, 1.0],
        "all_parts": all_parts,
        "adherence_ratio": ratio,
        "adherence_ratio_ci95": [0.0, 2.0],
        "prompts": 48,
    }


RECORDS = {
    "null-baseline": {"autoregressive": states(0.2)},
    "retrieval": {
        "autoregressive": states(0.6),
        "combination": {"blend_cosine": 0.74, "retrieval_cosine": 0.66, "pairs": 100},
        "k": 64,
    },
    "queries": {  # a run added by another architecture: no combination, no pictures
        "autoregressive": states(0.5),
    },
    "vt-rollout": {
        "teacher_forced": states(0.9),
        "autoregressive": states(0.7),
        "combination": {"deprojector_cosine": 0.67, "blend_cosine": 0.74, "pairs": 100},
    },
    "adherence": {
        "single": {
            "reference": summary(0.9, 1.0, 0.7),
            "vt-rollout": summary(0.75, 0.83, 0.46),
            "blend": summary(0.6, 0.66, 0.3),  # rows other than runs are kept
        },
        "comma": {"vt-rollout": summary(0.72, 0.8, 0.4)},  # so is a new kind
    },
    "image_prompts": {"vt-rollout": {"image_to_text": 1.01, "image_to_text_ci95": [0.9, 1.1]}},
    "comparison": {
        "pairs": {
            "metric": "autoregressive cosine_masked",
            "vt-rollout vs retrieval": {"difference": 0.1, "difference_ci95": [0.05, 0.15]},
        }
    },
}


def test_every_number_is_copied_from_its_record_and_rows_are_generic() -> None:
    out = headline(RECORDS)
    assert out["vt-rollout"] == {
        "ar_cosine_masked": 0.7,
        "ar_cosine_masked_low": 0.69,
        "ar_cosine_masked_high": 0.71,
        "vs_retrieval": 0.1,
        "combination_cosine": 0.67,
        "adherence_ratio_single": 0.83,
        "all_parts_single": 0.46,
        "adherence_ratio_comma": 0.8,
        "all_parts_comma": 0.4,
        "image_to_text": 1.01,
    }
    assert out["queries"] == {
        "ar_cosine_masked": 0.5,
        "ar_cosine_masked_low": 0.49,
        "ar_cosine_masked_high": 0.51,
    }
    assert out["retrieval"]["combination_cosine"] == 0.66
    assert out["blend"] == {
        "combination_cosine": 0.74,
        "adherence_ratio_single": 0.66,
        "all_parts_single": 0.3,
    }
    assert out["reference"] == {"all_parts_single": 0.7}  # its ratio is 1 by definition
    assert list(out)[:4] == ["null-baseline", "retrieval", "queries", "vt-rollout"]
    assert "k" not in out["retrieval"] and "comparison" not in out


def test_values_are_flat_numbers_that_dvc_lists() -> None:
    """`dvc metrics show` drops lists and strings: every headline value is a number."""
    values = [v for row in headline(RECORDS).values() for v in row.values()]
    assert values and all(isinstance(v, int | float) for v in values)


def test_no_records_no_headline() -> None:
    assert headline({}) == {}
    assert headline({"comparison": {}}) == {}


def test_the_committed_headlines_are_the_committed_records_own() -> None:
    """reports/headline.json (and the study's) equal what the evaluate stage would write
    from the committed reports/metrics/: one home per number."""
    for root in (ROOT, ROOT / "study"):
        rev = resolve(WORKSPACE, root)
        runs = list(read_params(rev, root)["models"])
        expected = dumps(revision_headline(rev, root, runs))
        assert (root / "reports" / "headline.json").read_text() == expected, root
        records = json.loads(expected)
        assert list(records)[:2] == ["null-baseline", "retrieval"]
        assert set(runs) <= set(records)
