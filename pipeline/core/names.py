"""Names the pipeline gives to outputs and grid rows beside the runs of `models:`.

A run name becomes models/NAME/, reports/metrics/NAME.json and a row NAME of every grid and
table, so a run may take none of these (params derives its reserved names from here).
"""

from __future__ import annotations

from typing import Final

WORLD = "world"  # models/world/: the embedded world
BASE_RECORD = "base"  # models/base.json: the base models' check and fingerprint
NULL_BASELINE = "null-baseline"  # reports/metrics/null-baseline.json
RETRIEVAL = "retrieval"  # reports/metrics/retrieval.json: the nearest training rows' states
COMPARISON = "comparison"  # reports/metrics/comparison.json: differences inside the noise
ADHERENCE: Final = "adherence"  # reports/metrics/adherence.json: held-out pictures judged
IMAGE_PROMPTS: Final = "image_prompts"  # reports/metrics/image_prompts.json: scenes as prompts
REFERENCE = "reference"  # the grid row of ordinary CLIP states (no deprojector)
# The adherence row of comma prompts whose parts' ordinary states are averaged (compel's
# `.blend()`, ComfyUI's ConditioningAverage), and the combination test's blended states: what
# users do today instead of deprojecting.
BLEND = "blend"
HEADLINE = "headline"  # reports/headline.json: a handful of numbers per row, the DVC metrics
IMAGE_ROWS = ("scene", "image prompt")  # grid rows: a drawn scene; its image-prompt picture
# Files of a deprojector folder beside config.json and model.safetensors (pipeline/models):
GAP_FILE: Final = "modality_gap.safetensors"  # its base CLIP's image -> text bridges
CARD_FILE: Final = "README.md"  # its model card (Hub YAML metadata + text)

RESERVED_RUN_NAMES = (
    WORLD,
    BASE_RECORD,
    NULL_BASELINE,
    RETRIEVAL,
    COMPARISON,
    ADHERENCE,
    IMAGE_PROMPTS,
    REFERENCE,
    BLEND,
    *IMAGE_ROWS,
)
# The bridges from image to text space, simplest first (gap.bridge; pipeline/prompting/images.py).
BRIDGES = ("none", "mean-shift", "linear", "text-projection")
