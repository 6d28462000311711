"""Pictures the pipeline draws: comparison grids of images (PIL) and charts (matplotlib).

`make_grid` lays out columns of images under their headers with row names on the left and an
optional label line under each cell; `line_chart` and `adherence_chart` draw labelled series,
every run in its one style (`row_styles`: a tab10 colour and a marker, the same in every
chart). The render stage and the CLI's `generate` (interpolation strips) share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.errors import DeprojectorError
from pipeline.core.names import BLEND, NULL_BASELINE, REFERENCE, RETRIEVAL
from pipeline.metrics.records import ADHERENCE, CLIP_SCORE

MIN_CELL = 160  # px: smaller images (the builtin ones) are upscaled, NEAREST, to at least this


class DrawingError(DeprojectorError, ValueError):
    """Cells that cannot be laid out together."""


@dataclass
class GridColumn:
    """One column of a grid: its header, an image per row name, a label line per row."""

    header: str
    images: dict[str, Image.Image]
    labels: dict[str, str] = field(default_factory=dict)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font


@dataclass(frozen=True)
class GridLayout:
    """Where the cells of a grid image are: `rows` × `cols` cells of cell_width × cell_height."""

    rows: int
    cols: int
    cell_width: int
    cell_height: int
    left: int  # width of the row-name column
    top: int  # height of the prompt header
    gap: int
    label: int = 0  # height of the score line under each cell

    @property
    def size(self) -> tuple[int, int]:
        return (
            self.left + self.cols * (self.cell_width + self.gap) + self.gap,
            self.top + self.rows * (self.cell_height + self.label + self.gap) + self.gap,
        )

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The image of a cell; its score line is the `label` px below it."""
        x = self.left + self.gap + col * (self.cell_width + self.gap)
        y = self.top + self.gap + row * (self.cell_height + self.label + self.gap)
        return x, y, x + self.cell_width, y + self.cell_height


def _wrap(text: str, face: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` px (a single over-long word gets a line of its own)."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and face.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current]


def make_grid(
    columns: list[GridColumn],
    rows: tuple[str, ...] | None = None,
    gap: int = 6,
    text_size: int = 16,
) -> tuple[Image.Image, GridLayout]:
    """Rows of images under their prompts, row names on the left (default: every row of the
    columns, in their order: the reference, then the models as params list them)."""
    rows = rows or tuple(columns[0].images)
    sizes = {c.images[row].size for c in columns for row in rows}
    if len(sizes) != 1:
        raise DrawingError(f"grid cells differ in size: {sorted(sizes)}")
    ((w, h),) = sizes
    scale = max(1, math.ceil(MIN_CELL / min(w, h)))
    face = font(text_size)
    line = text_size + 4
    headers = [_wrap(c.header, face, w * scale - 4) for c in columns]
    left = int(max(face.getlength(name) for name in rows)) + 2 * gap
    top = max(len(lines) for lines in headers) * line + 2 * gap
    small = font(text_size - 3)
    label = line if any(c.labels for c in columns) else 0
    layout = GridLayout(len(rows), len(columns), w * scale, h * scale, left, top, gap, label)
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    for j, (column, lines) in enumerate(zip(columns, headers, strict=True)):
        x0, _, x1, _ = layout.cell_box(0, j)
        for k, text in enumerate(lines):
            draw.text(((x0 + x1) / 2, gap + k * line), text, fill="black", font=face, anchor="ma")
        for i, row in enumerate(rows):
            image = column.images[row].resize((w * scale, h * scale), Image.Resampling.NEAREST)
            x0, _, x1, y1 = layout.cell_box(i, j)
            grid.paste(image, (x0, y1 - h * scale))
            if label:
                draw.text(
                    ((x0 + x1) / 2, y1 + 2),
                    column.labels.get(row, ""),
                    fill="black",
                    font=small,
                    anchor="ma",
                )
    for i, row in enumerate(rows):
        _, y0, _, y1 = layout.cell_box(i, 0)
        draw.text((gap, (y0 + y1) / 2), row, fill="black", font=face, anchor="lm")
    return grid, layout


# --- charts (matplotlib) ---------------------------------------------------------------------

# One style per row, the same in every chart. Runs take matplotlib's tab10 colours (Tableau's
# ten categorical colours, less its grey) in the order the rows are given, cycled together
# with MARKERS: 9 colours x 7 markers, so the first 63 runs differ in colour or marker from
# every other and neighbours differ in both. The rows beside the runs keep fixed styles.
RUN_COLORS = tuple(c for c in matplotlib.colormaps["tab10"].colors if to_hex(c) != "#7f7f7f")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# Baselines: shades outside tab10's hues, apart from each other where they share a chart
# (reference and retrieval in the adherence bars, where line styles do not show).
LIGHT_GREY, GREY, DARK_GREY, BLACK = "#b0b0b0", "#7f7f7f", "#4d4d4d", "#000000"


@dataclass(frozen=True)
class RowStyle:
    """How a row (a run or a baseline) is drawn: a matplotlib colour, marker and line style."""

    color: str | tuple[float, float, float]
    marker: str
    linestyle: str = "-"


FIXED_STYLES = {
    REFERENCE: RowStyle(BLACK, "", "-"),
    RETRIEVAL: RowStyle(DARK_GREY, "", "--"),
    NULL_BASELINE: RowStyle(GREY, "", ":"),
    BLEND: RowStyle(LIGHT_GREY, "", "-."),
}
# adherence_chart's bars per prompt kind: the row's colour, plain or hatched
KIND_HATCHES = {"single": "", "multi": "////"}
KIND_LABELS = {"single": "single embedding", "multi": "comma-combined"}


def row_styles(rows: Sequence[str]) -> dict[str, RowStyle]:
    """The style of each of `rows`: FIXED_STYLES for the reference and the baselines, the
    k-th other row (a run, in the order `rows` gives them: params' `models:`) RUN_COLORS[k]
    with MARKERS[k], each cycled; the same run list gives the same styles in every chart."""
    runs = [row for row in rows if row not in FIXED_STYLES]
    return {
        row: FIXED_STYLES.get(row)
        or RowStyle(
            RUN_COLORS[runs.index(row) % len(RUN_COLORS)], MARKERS[runs.index(row) % len(MARKERS)]
        )
        for row in rows
    }


def figure_image(figure: Figure) -> Image.Image:
    """A matplotlib figure as an RGB PIL image (drawn by Agg: the same pixels on every run)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (900, 480),
) -> Image.Image:
    """A line chart of `series` {row: [(x, y), ...]}, each row in its `row_styles` style
    (colour, marker every few points, line style), the legend beside the axes; size in px."""
    if not series or not any(series.values()):
        raise DrawingError(f"{title}: no points to draw")
    styles = row_styles(list(series))
    figure = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for name, points in series.items():
        style = styles[name]
        xs, ys = zip(*points, strict=True)
        axes.plot(
            xs,
            ys,
            color=style.color,
            marker=style.marker or None,
            markevery=max(1, len(xs) // 10),
            linestyle=style.linestyle,
            linewidth=1.6,
            markersize=5,
            label=name,
        )
    axes.set(title=title, xlabel=x_label, ylabel=y_label)
    axes.grid(color="#e6e6e6")
    figure.legend(loc="outside right center", frameon=False)
    return figure_image(figure)


def notice(text: str, size: tuple[int, int] = (640, 80)) -> Image.Image:
    """A white image with one line of text: an output that has nothing to show."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text(
        (size[0] / 2, size[1] / 2), text, fill="black", font=font(14), anchor="mm"
    )
    return image


def cosine_chart(rows: list[dict]) -> Image.Image:
    """The evaluate stage's autoregressive cosine per position, one line per model."""
    names = [key for key in rows[0] if key != "position"]
    series = {name: [(row["position"], row[name]) for row in rows] for name in names}
    return line_chart(
        series, "Autoregressive cosine similarity per position (test set)", "position", "cosine"
    )


def adherence_chart(by_kind: dict[str, dict[str, dict]]) -> Image.Image:
    """Horizontal bars: mean held-out adherence (or CLIP score without a judge) per row, in
    its `row_styles` colour, one bar per prompt kind (`single` plain, `multi` hatched), each
    with its 95 % interval and its value."""
    key = ADHERENCE if ADHERENCE in next(iter(by_kind["single"].values())) else CLIP_SCORE
    # blend has comma prompts only: its single bar is left out.
    rows = list(dict.fromkeys(row for summaries in by_kind.values() for row in summaries))
    colors = [style.color for style in row_styles(rows).values()]
    figure = Figure(figsize=(7.2, 1.2 + 0.5 * len(rows)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    height = 0.8 / len(by_kind)
    for k, (kind, summaries) in enumerate(by_kind.items()):
        values = np.array([summaries.get(row, {}).get(key, np.nan) for row in rows])
        bounds = np.array(
            [summaries.get(row, {}).get(f"{key}_ci95") or [np.nan] * 2 for row in rows]
        )
        bars = axes.barh(
            np.arange(len(rows)) + (k - (len(by_kind) - 1) / 2) * height,
            values,
            height,
            xerr=np.abs(bounds.T - values),
            color=colors,
            hatch=KIND_HATCHES.get(kind, ".."),
            edgecolor="white",
            error_kw={"ecolor": "#444444", "capsize": 2, "linewidth": 0.8},
        )
        labels = [f"{v:.2f}" if np.isfinite(v) else "" for v in values]
        axes.bar_label(bars, labels=labels, padding=3, fontsize=8)
    axes.set_yticks(range(len(rows)), rows)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.15 if key == ADHERENCE else 115)
    axes.set_title("Held-out prompts: " + ("adherence (judge)" if key == ADHERENCE else CLIP_SCORE))
    axes.legend(
        [
            Patch(facecolor=GREY, hatch=KIND_HATCHES.get(kind, ".."), edgecolor="white")
            for kind in by_kind
        ],
        [KIND_LABELS.get(kind, kind) for kind in by_kind],
        loc="lower right",
        fontsize=8,
    )
    return figure_image(figure)
