"""The `card@NAME` stage: evaluate's figures, with their intervals, into models/NAME/README.md.

`deprojector train NAME` writes the card's metadata and training budget; this stage reads that
card back and adds the figures of reports/metrics/NAME.json (the states metrics: autoregressive
and teacher-forced cosine, the combination test) and of reports/metrics/adherence.json (the
held-out pictures, where the world's judge scores them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config.params import Params
from pipeline.config.runs import check_runs
from pipeline.core.errors import DeprojectorError, read_json
from pipeline.core.names import ADHERENCE, CARD_FILE
from pipeline.metrics.intervals import ci_key
from pipeline.metrics.records import (
    AUTOREGRESSIVE,
    CLIP_SCORE,
    COMBINATION,
    COSINE_MASKED,
    TEACHER_FORCED,
)
from pipeline.models.card import Figure, read_card_facts, write_card

COSINE = "cosine"
DEPROJECTOR_COSINE = "deprojector_cosine"
RATIO = "_ratio"  # adherence.json's KEY_ratio: a row's mean over the reference row's


class MetricsMissing(DeprojectorError):
    """evaluate's metrics of a run are missing: the card cannot copy them."""


def _figure(record: dict, key: str, name: str, source: Path) -> Figure | None:
    if key not in record:
        return None
    interval = record.get(ci_key(key)) or (None, None)
    return Figure(name, float(record[key]), interval[0], interval[1], str(source))


def card_figures(name: str, metrics_dir: Path) -> tuple[Figure, ...]:
    """The figures of run `name` the card shows, copied from evaluate's metrics files."""
    states_file, adherence_file = metrics_dir / f"{name}.json", metrics_dir / f"{ADHERENCE}.json"
    if not states_file.is_file():
        raise MetricsMissing(f"{states_file} is missing: run `deprojector evaluate` first")
    states = read_json(states_file, MetricsMissing, "run `deprojector evaluate` again")
    wanted = [
        (states.get(AUTOREGRESSIVE, {}), COSINE, "autoregressive cosine", states_file),
        (
            states.get(AUTOREGRESSIVE, {}),
            COSINE_MASKED,
            "autoregressive cosine (masked)",
            states_file,
        ),
        (states.get(TEACHER_FORCED, {}), COSINE, "teacher-forced cosine", states_file),
        (states.get(COMBINATION, {}), DEPROJECTOR_COSINE, "combination cosine", states_file),
    ]
    if adherence_file.is_file():
        pictures = read_json(adherence_file, MetricsMissing, "run `deprojector evaluate` again")
        for kind in ("single", "multi"):
            row = pictures.get(kind, {}).get(name, {})
            wanted += [
                (row, ADHERENCE, f"{kind} adherence", adherence_file),
                (row, ADHERENCE + RATIO, f"{kind} adherence / reference's", adherence_file),
                (row, CLIP_SCORE, f"{kind} CLIP score", adherence_file),
            ]
    figures = (_figure(record, key, label, source) for record, key, label, source in wanted)
    return tuple(f for f in figures if f is not None)


def run_card_stage(
    name: str,
    params: Params,
    models_dir: Path = Path("models"),
    metrics_dir: Path = Path("reports/metrics"),
) -> Path:
    """Rewrite models/NAME/README.md with evaluate's figures; the card's path."""
    check_runs(params.models)
    if name not in params.models:
        raise MetricsMissing(f"{name!r} is not a run of `models:` ({', '.join(params.models)})")
    folder = models_dir / name
    facts = read_card_facts(folder)
    facts = dataclasses.replace(facts, figures=card_figures(name, metrics_dir))
    write_card(facts, folder, f"models/{name}")
    return folder / CARD_FILE
