"""The headline: a handful of numbers per row, read from the evaluate stage's detailed records.

`reports/headline.json` is what `dvc metrics show`, `dvc exp show` and `deprojector compare`
put side by side; the detailed trees it is read from (`reports/metrics/*.json`) stay beside it
as plain outputs. Every number is copied from one detailed record (one home per number),
never recomputed: `headline` takes whatever rows and kinds the records hold, so a run, a
baseline or an adherence row added to them appears here without a change.

Per row (a run, `retrieval`, `null-baseline`, `blend`, `reference`, where the records have it):

- `ar_cosine_masked`, `ar_cosine_masked_low`, `ar_cosine_masked_high`: autoregressive masked
  cosine to the true states and its 95 % bootstrap interval (RUN.json `autoregressive`);
- `vs_retrieval`: the row's autoregressive masked cosine − retrieval's, paired over the test
  rows (comparison.json `pairs`; absent for seed replicates, which `pairs` leaves out);
- `combination_cosine`: deprojected (or blended, or retrieved) Σ(e_k − null) + null against
  H("A B") (RUN.json `combination`: `deprojector_cosine` is the run's own, `blend_cosine` and
  `retrieval_cosine` the rows `blend` and `retrieval`);
- `adherence_ratio_KIND`: mean held-out adherence / the reference row's, per prompt kind
  (`single`, `multi`: comma parts combined; adherence.json); not for the reference itself;
- `all_parts_KIND`: the fraction of held-out prompts with every stated attribute found (the
  reference row's too: the ceiling);
- `image_to_text`: adherence with a drawn scene as the prompt / with its description
  (image_prompts.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pipeline.core.names import (
    ADHERENCE,
    BLEND,
    COMPARISON,
    IMAGE_PROMPTS,
    REFERENCE,
    RETRIEVAL,
)
from pipeline.metrics.records import (
    ALL_PARTS,
    AUTOREGRESSIVE,
    COMBINATION,
    COSINE_MASKED,
    IMAGE_TO_TEXT,
)

AR_COSINE: Final = "ar_cosine_masked"
VS_RETRIEVAL: Final = "vs_retrieval"
COMBINATION_COSINE: Final = "combination_cosine"
# combination keys ROW_cosine name the row they belong to; `deprojector` is the run itself
_COMBINATION_ROWS: Final = {"deprojector": None, BLEND: BLEND, RETRIEVAL: RETRIEVAL}
# the records beside the rows' own (RUN.json, null-baseline.json, retrieval.json)
_SUMMARIES: Final = (ADHERENCE, IMAGE_PROMPTS, COMPARISON)

# {row: {key: number}}: flat numbers, as `dvc metrics show` lists only those
Headline = dict[str, dict[str, float | int]]


def headline(records: Mapping[str, Any]) -> Headline:
    """The headline of the evaluate stage's records, {file stem: parsed JSON} as
    `reports/metrics/` holds them (`run_evaluate_stage` returns the same mapping).

    The interval [low, high] of `ar_cosine_masked` becomes its `_low` and `_high` keys. Rows
    come in the order the records name them (then `blend`, `reference`); a key is present
    where its record has the number, so a revision evaluated without pictures, or before a
    record existed, has fewer numbers. Raises nothing: the records are the stage's own.
    """
    out: Headline = {}

    def put(
        row: str, key: str, record: Mapping[str, Any], field: str, interval: bool = False
    ) -> None:
        value = record.get(field)
        if isinstance(value, int | float):
            out.setdefault(row, {})[key] = value
        bounds = record.get(f"{field}_ci95") if interval else None
        if isinstance(bounds, list):
            out.setdefault(row, {}).update({f"{key}_low": bounds[0], f"{key}_high": bounds[1]})

    runs = {
        row: record
        for row, record in records.items()
        if row not in _SUMMARIES and isinstance(record, Mapping)
    }
    pairs = records.get(COMPARISON, {}).get("pairs", {})
    for row, record in runs.items():
        put(row, AR_COSINE, record.get(AUTOREGRESSIVE, {}), COSINE_MASKED, interval=True)
        put(row, VS_RETRIEVAL, pairs.get(f"{row} vs {RETRIEVAL}", {}), "difference")
    for row, record in runs.items():
        for prefix, owner in _COMBINATION_ROWS.items():
            put(owner or row, COMBINATION_COSINE, record.get(COMBINATION, {}), f"{prefix}_cosine")
    for kind, rows in records.get(ADHERENCE, {}).items():
        for row, summary in rows.items():
            if row != REFERENCE:  # its ratio is 1 by definition
                put(row, f"{ADHERENCE}_ratio_{kind}", summary, f"{ADHERENCE}_ratio")
            put(row, f"{ALL_PARTS}_{kind}", summary, ALL_PARTS)
    for row, result in records.get(IMAGE_PROMPTS, {}).items():
        put(row, IMAGE_TO_TEXT, result, IMAGE_TO_TEXT)
    return out
