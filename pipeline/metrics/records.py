"""What the evaluate stage's steps hand each other and write: the keys and shapes of its records.

One definition of each key: the constants below are the keys of reports/metrics/*.json and of
the rows beside them, and the TypedDicts spell the same keys as their fields (mypy checks a
constant used as a key against them; tests/test_records.py checks each constant is a field).
Records are plain dicts at run time, so the JSON files are what they were.

- A picture's scores (`PictureScores`): its CLIP score and, where the world's judge is
  available, its adherence; a summary over prompts (`Summary`): means with intervals.
- A run's states metrics (`RunMetrics`): `StatesMetrics` per mode, image rows, combination;
  the retrieval baseline's add how its k was chosen (`RetrievalMetrics`).
- comparison.json (`Comparison`): paired differences (`PairedDifference`) and seed spread.
"""

from __future__ import annotations

from typing import Final, Literal, NotRequired, TypedDict

# A picture's judged adherence, a summary's mean of it, and adherence.json: one word.
from pipeline.core.names import ADHERENCE

# An interval [low, high] (KEY_ci95), None below two rows or where a bound is not finite.
Interval = list[float] | None
# Means with their intervals: {KEY: mean, KEY_ci95: interval}, plus counts (`prompts`, `pairs`).
Estimates = dict[str, float | int | Interval]

# --- a picture's scores and summaries over prompts (pipeline/metrics/adherence.py)
CLIP_SCORE: Final = "clip_score"
ALL_PARTS: Final = "all_parts"  # every stated attribute found
PROMPTS: Final = "prompts"
IMAGE_TO_TEXT: Final = "image_to_text"  # image-prompt adherence / text-prompt adherence
PICTURE_SCORES: Final = (ADHERENCE, CLIP_SCORE)  # what a row's ratio to the reference covers


class PictureScores(TypedDict):
    """One picture judged: its CLIP score; its adherence where the world's judge is loaded."""

    clip_score: float
    adherence: NotRequired[float]


# A summary over prompts: CLIP_SCORE, PROMPTS and, judged, ADHERENCE, ALL_PARTS and the
# adherence per object count (adherence.objects_key), each mean with its interval; with_ratios
# adds KEY_ratio to the reference row (and its interval).
Summary = Estimates
Kind = Literal["single", "multi"]  # the whole prompt deprojected; its comma parts combined

# --- a run's states metrics (pipeline/metrics/scores.py, the evaluate stage)
TEACHER_FORCED: Final = "teacher_forced"
AUTOREGRESSIVE: Final = "autoregressive"
COSINE_MASKED: Final = "cosine_masked"
COMBINATION: Final = "combination"
IMAGE_ROW_METRICS: Final = "image_rows"  # a run's metrics on the test split's image rows
ROWS: Final = "rows"
SEED_SPREAD: Final = "seed_spread"

# mse, weighted_mse, cosine, cosine_masked, each with KEY_ci95 (Scores.result).
StatesMetrics = Estimates
# deprojector_cosine, blend_cosine, retrieval_cosine with intervals, and `pairs`.
CombinationScores = Estimates


class ImageRowMetrics(TypedDict):
    rows: int
    teacher_forced: StatesMetrics
    autoregressive: StatesMetrics


class RunMetrics(TypedDict):
    """reports/metrics/RUN.json (and null-baseline.json)."""

    teacher_forced: StatesMetrics
    autoregressive: StatesMetrics
    image_rows: NotRequired[ImageRowMetrics]
    combination: NotRequired[CombinationScores]


class Validation(TypedDict):
    """How the retrieval's k was chosen: each candidate's masked cosine on validation rows."""

    fraction: float
    seed: int
    cosine_masked: dict[str, float]


class RetrievalMetrics(RunMetrics):
    """reports/metrics/retrieval.json: a run's metrics and the choice of its k."""

    k: int
    teacher_forcing: bool
    training_rows: int
    validation: Validation


# --- comparison.json (pipeline/metrics/significance.py)
class PairedDifference(TypedDict):
    """statistic(a) − statistic(b) over the same resampled rows (intervals.paired_difference)."""

    difference: float
    difference_ci95: Interval
    within_noise: bool | None


class BestRun(TypedDict):
    best: str
    sign: str
    rows: dict[str, PairedDifference]


class Spread(TypedDict):
    mean: float
    std: float
    min: float
    max: float


class SeedSpread(TypedDict, total=False):
    """A group of seed replicates: its runs, their seeds, and each SEED_METRICS key's spread
    (a key absent where some run lacks the metric)."""

    runs: list[str]
    seeds: list[int]
    autoregressive_cosine_masked: Spread
    teacher_forced_cosine_masked: Spread
    combination_deprojector_cosine: Spread
    adherence_single: Spread
    adherence_multi: Spread


class Comparison(TypedDict, total=False):
    """reports/metrics/comparison.json: which differences are inside the noise."""

    autoregressive_cosine_masked: BestRun
    # {"metric": ..., "sign": ...} and "A vs B": PairedDifference
    pairs: dict[str, str | PairedDifference]
    # {"sign": ...} and kind: {run: PairedDifference}
    adherence: dict[str, str | dict[str, PairedDifference]]
    # {"sign": ...} and kind: {run: PairedDifference}: comma prompts against blending
    adherence_vs_blend: dict[str, str | dict[str, PairedDifference]]
    seed_spread: dict[str, SeedSpread]


# --- held-out pictures (pipeline/metrics/adherence.py): adherence.json and image_prompts.json
# {kind: {row: summary}}: adherence.json
AdherenceResults = dict[str, dict[str, Summary]]
# {kind: {row: per-prompt scores}}: the same prompts in every row (comparison's pairing)
HeldOutScores = dict[str, dict[str, list[PictureScores]]]
# A row of image_prompts.json: `text` (Summary), `image` (Summary), IMAGE_TO_TEXT with its
# interval, `bridge` (its name) and `bridges` ({bridge: Summary}); the reference: `text` only.
ImagePromptRow = dict[str, Summary | str | dict[str, Summary] | float | Interval]
ImagePromptResults = dict[str, ImagePromptRow]
