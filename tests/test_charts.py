"""Charts: every run in its own colour and marker, the same in every chart."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from pipeline.reporting.drawing import (
    FIXED_STYLES,
    DrawingError,
    adherence_chart,
    line_chart,
    row_styles,
)

RUNS = [f"run-{k}" for k in range(63)]


def test_runs_differ_in_colour_or_marker_and_neighbours_in_both() -> None:
    styles = row_styles(["null-baseline", "retrieval", *RUNS])
    pairs = [(styles[run].color, styles[run].marker) for run in RUNS]
    assert len(set(pairs)) == len(RUNS)
    for a, b in zip(pairs, pairs[1:], strict=False):
        assert a[0] != b[0] and a[1] != b[1]
    assert styles["retrieval"] == FIXED_STYLES["retrieval"]
    assert all(to_rgb(styles[run].color) != to_rgb(FIXED_STYLES["retrieval"].color) for run in RUNS)
    # The baselines apart from each other too: the adherence bars show colour, not line style.
    baselines = {to_rgb(style.color) for style in FIXED_STYLES.values()}
    assert len(baselines) == len(FIXED_STYLES)
    assert not baselines & {to_rgb(styles[run].color) for run in RUNS}


def test_a_run_keeps_its_style_in_every_chart() -> None:
    """The cosine chart lists the baselines first, the interpolation chart the runs alone,
    the adherence chart the reference first: the runs' styles are the same."""
    runs = ["transformer", "vicinity-batch", "vt-rollout"]
    cosine = row_styles(["null-baseline", "retrieval", *runs])
    strip = row_styles(runs)
    bars = row_styles(["reference", *runs])
    for run in runs:
        assert cosine[run] == strip[run] == bars[run]


def colours_in(image) -> set[tuple[int, int, int]]:
    return {tuple(c) for c in np.asarray(image).reshape(-1, 3)}


def test_each_line_is_drawn_in_its_rows_colour() -> None:
    series = {name: [(x, x / 10 + k) for x in range(10)] for k, name in enumerate(("a", "b"))}
    image = line_chart(series, "t", "x", "y")
    found = colours_in(image)
    for style in row_styles(list(series)).values():
        assert tuple(round(255 * c) for c in to_rgb(style.color)) in found


def test_adherence_bars_take_the_rows_colours() -> None:
    summary = {"adherence": 0.5, "adherence_ci95": [0.4, 0.6]}
    by_kind = {kind: {"reference": summary, "vt-rollout": summary} for kind in ("single", "multi")}
    found = colours_in(adherence_chart(by_kind))
    vt = row_styles(["reference", "vt-rollout"])["vt-rollout"].color
    assert tuple(round(255 * c) for c in to_rgb(vt)) in found


def test_an_empty_chart_is_a_clear_error() -> None:
    with pytest.raises(DrawingError, match="no points"):
        line_chart({}, "cosine", "x", "y")
