"""comparison.json: which differences between the evaluate stage's rows are inside the noise.

Every difference is paired: both rows are scored on the same test rows (or prompts), and
`pipeline.metrics.intervals.paired_difference` resamples those once for both, so what they have in
common cancels. A difference whose 95 % interval contains 0 is reported as no difference
(`within_noise`). Seed replicates (runs that differ only in `train.seed`) add the spread
over training seeds, which the bootstrap over test rows does not see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import cast

import numpy as np

from pipeline.config.params import ModelSpec
from pipeline.core.names import BLEND, REFERENCE, RETRIEVAL
from pipeline.metrics.adherence import column
from pipeline.metrics.intervals import paired_difference, ratio_of_sums
from pipeline.metrics.records import (
    ADHERENCE,
    AUTOREGRESSIVE,
    COMBINATION,
    COSINE_MASKED,
    TEACHER_FORCED,
    BestRun,
    Comparison,
    HeldOutScores,
    PairedDifference,
    SeedSpread,
    Spread,
)

# One masked-cosine score per test row: (in-mask cosine sum, in-mask count), each [rows].
MaskedTerms = tuple[np.ndarray, np.ndarray]

# The means whose spread over seeds seed_spread gives: (name, path into a run's metrics).
SEED_METRICS = (
    ("autoregressive_cosine_masked", (AUTOREGRESSIVE, COSINE_MASKED)),
    ("teacher_forced_cosine_masked", (TEACHER_FORCED, COSINE_MASKED)),
    ("combination_deprojector_cosine", (COMBINATION, "deprojector_cosine")),
    ("adherence_single", (ADHERENCE, "single")),  # held-out pictures judged, per kind
    ("adherence_multi", (ADHERENCE, "multi")),
)


def seed_replicates(models: dict[str, ModelSpec], train_seed: int) -> dict[str, list[str]]:
    """Groups of 2 or more runs that differ only in their training seed, each under its first
    listed run: {first: [first, other, ...]}. A run's seed is its own `train.seed`, else
    `train_seed` (the `train:` section's)."""
    groups: dict[str, list[str]] = {}
    seeds: dict[str, set[int]] = {}
    keys: dict[str, str] = {}
    for name, spec in models.items():
        rest = {k: v for k, v in spec.train.items() if k != "seed"}
        key = repr((spec.type, sorted(spec.hparams.items()), sorted(rest.items())))
        first = keys.setdefault(key, name)
        seed = spec.train.get("seed", train_seed)
        # A second run with the same effective seed is the same run again, not a replicate.
        if seed not in seeds.setdefault(first, set()):
            seeds[first].add(seed)
            groups.setdefault(first, []).append(name)
    return {first: runs for first, runs in groups.items() if len(runs) > 1}


def seed_spread(
    metrics: Mapping[str, Mapping[str, object]], groups: dict[str, list[str]], seeds: dict[str, int]
) -> dict[str, SeedSpread]:
    """Per group of seed replicates and metric of SEED_METRICS (where every run has it): the
    mean over the runs, the sample standard deviation (ddof = 1), min and max. `metrics`:
    run -> its metrics, with {"adherence": {kind: mean adherence}} where pictures were judged."""
    out: dict[str, SeedSpread] = {}
    for first, runs in groups.items():
        entry = SeedSpread(runs=runs, seeds=[seeds[name] for name in runs])
        for key, (group, metric) in SEED_METRICS:
            values = [_lookup(metrics[name], group, metric) for name in runs]
            if all(v is not None for v in values):
                v = np.asarray(values, dtype=np.float64)
                # key: one of SEED_METRICS, each a field of SeedSpread
                cast(dict[str, Spread], entry)[key] = Spread(
                    mean=float(v.mean()),
                    std=float(v.std(ddof=1)),
                    min=float(v.min()),
                    max=float(v.max()),
                )
        out[first] = entry
    return out


def _lookup(metrics: Mapping[str, object], group: str, metric: str) -> object:
    """metrics[group][metric], None where either is missing."""
    section = metrics.get(group)
    return section.get(metric) if isinstance(section, Mapping) else None


def comparison(
    terms: dict[str, MaskedTerms],
    runs: Sequence[str],
    headline: Sequence[str],
    held_out: HeldOutScores | None,
    seed: int,
) -> Comparison:
    """The paired differences of comparison.json.

    `autoregressive_cosine_masked`: the best of `runs` and, for every other run and
    retrieval, its cosine_masked − the best run's. `pairs`: first − second for every pair of
    `headline` rows and retrieval (e.g. the article's finding, transformer vs the vicinity
    models). `adherence` (held-out pictures judged; per-prompt scores {kind: {row: [...]}}):
    each row's mean adherence − the reference row's over the same resampled prompts;
    `adherence_vs_blend` (kinds with a BLEND row): each row's − blend's.
    """
    out = Comparison()

    def difference(a: str, b: str) -> PairedDifference:
        return paired_difference(ratio_of_sums, terms[a], terms[b], seed)

    if runs:
        values = {name: float(ratio_of_sums(*terms[name])) for name in runs}
        best = max(values, key=values.__getitem__)
        out["autoregressive_cosine_masked"] = BestRun(
            best=best,
            sign="row − best",
            rows={name: difference(name, best) for name in (*runs, RETRIEVAL) if name != best},
        )
        out["pairs"] = {"metric": "autoregressive cosine_masked", "sign": "first − second"} | {
            f"{a} vs {b}": difference(a, b) for a, b in combinations([*headline, RETRIEVAL], 2)
        }
    judged = {
        kind: scores
        for kind, scores in (held_out or {}).items()
        if scores[REFERENCE] and ADHERENCE in scores[REFERENCE][0]
    }

    def against(baseline: str) -> dict[str, str | dict[str, PairedDifference]]:
        return {"sign": f"row − {baseline}"} | {
            kind: {
                name: paired_difference(
                    np.mean, [column(rows, ADHERENCE)], [column(scores[baseline], ADHERENCE)], seed
                )
                for name, rows in scores.items()
                if name not in (REFERENCE, baseline)
            }
            for kind, scores in judged.items()
            if baseline in scores
        }

    if judged:
        out[ADHERENCE] = against(REFERENCE)
    if any(BLEND in scores for scores in judged.values()):
        out["adherence_vs_blend"] = against(BLEND)
    return out
