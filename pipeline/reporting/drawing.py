"""Pictures the pipeline draws: comparison grids of images and plain charts (PIL only).

`make_grid` lays out columns of images under their headers with row names on the left and an
optional label line under each cell; `line_chart` and `adherence_chart` draw labelled series. The
render stage and the CLI's `generate` (interpolation strips) share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from pipeline.core.errors import DeprojectorError
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


COLORS = ("#888888", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (800, 460),
) -> Image.Image:
    """A plain line chart: axes with ticks, one coloured line per series, a legend."""
    width, height = size
    face, small = font(16), font(13)
    margin_l, margin_r, margin_t, margin_b = 70, 190, 40, 50
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_min, x_max = min(xs), max(xs)
    y_min = math.floor(min(ys) * 10) / 10
    y_max = max(math.ceil(max(ys) * 10) / 10, y_min + 0.1)
    plot_w, plot_h = width - margin_l - margin_r, height - margin_t - margin_b

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = margin_l + (x - x_min) / max(x_max - x_min, 1e-9) * plot_w
        return px, margin_t + (y_max - y) / (y_max - y_min) * plot_h

    chart = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(chart)
    draw.text((width / 2, 10), title, fill="black", font=face, anchor="ma")
    y_step = 0.1 if y_max - y_min <= 1.0 else 0.2
    for k in range(round((y_max - y_min) / y_step) + 1):
        y = y_min + k * y_step
        _, py = to_px(x_min, y)
        draw.line([(margin_l, py), (margin_l + plot_w, py)], fill="#e6e6e6")
        draw.text((margin_l - 6, py), f"{y:.1f}", fill="black", font=small, anchor="rm")
    x_step = 10 if x_max - x_min > 20 else 1
    for x in range(math.ceil(x_min / x_step) * x_step, int(x_max) + 1, x_step):
        px, _ = to_px(x, y_min)
        draw.line([(px, margin_t + plot_h), (px, margin_t + plot_h + 4)], fill="black")
        draw.text((px, margin_t + plot_h + 6), str(x), fill="black", font=small, anchor="ma")
    draw.rectangle([margin_l, margin_t, margin_l + plot_w, margin_t + plot_h], outline="black")
    draw.text((margin_l + plot_w / 2, height - 6), x_label, fill="black", font=face, anchor="md")
    draw.text((8, margin_t - 10), y_label, fill="black", font=small, anchor="ld")
    for k, (name, points) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        draw.line([to_px(x, y) for x, y in points], fill=color, width=2)
        ly = margin_t + 10 + k * 24
        lx = margin_l + plot_w + 14
        draw.line([(lx, ly), (lx + 24, ly)], fill=color, width=3)
        draw.text((lx + 30, ly), name, fill="black", font=small, anchor="lm")
    return chart


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
    """Horizontal bars: mean held-out adherence (or CLIP score without a judge) per row."""
    key = ADHERENCE if ADHERENCE in next(iter(by_kind["single"].values())) else CLIP_SCORE
    top = 1.0 if key == ADHERENCE else 100.0
    rows = list(dict.fromkeys(row for rows in by_kind.values() for row in rows))
    face, small = font(16), font(13)
    bar, margin_l, width = 14, 190, 720
    height = 60 + len(rows) * (2 * bar + 14) + 30
    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    title = "Held-out prompts: " + ("adherence (judge)" if key == ADHERENCE else "CLIP score")
    draw.text((width / 2, 10), title, fill="black", font=face, anchor="ma")
    plot_w = width - margin_l - 80
    for i, row in enumerate(rows):
        y = 50 + i * (2 * bar + 14)
        draw.text((margin_l - 10, y + bar), row, fill="black", font=small, anchor="rm")
        for k, (kind, color) in enumerate((("single", COLORS[1]), ("multi", COLORS[2]))):
            if row not in by_kind.get(kind, {}):
                continue  # blend has comma prompts only
            value = by_kind[kind][row][key]
            x1 = margin_l + plot_w * max(0.0, min(value / top, 1.0))
            draw.rectangle([margin_l, y + k * bar, x1, y + (k + 1) * bar - 2], fill=color)
            draw.text(
                (x1 + 4, y + k * bar + bar / 2),
                f"{value:.2f}",
                fill="black",
                font=small,
                anchor="lm",
            )
    y = height - 22
    for k, (kind, color) in enumerate(
        (("single embedding", COLORS[1]), ("comma-combined", COLORS[2]))
    ):
        x = margin_l + k * 200
        draw.rectangle([x, y, x + 14, y + 12], fill=color)
        draw.text((x + 20, y + 6), kind, fill="black", font=small, anchor="lm")
    return chart
