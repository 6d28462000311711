"""The `render` stage: the article's comparison grids and the report (docs/architectures.md).

For each prompt (a column) the reference row is generated from the ordinary CLIP states and
each model's row from its deprojected conditioning, all from the same seed, so a cell differs
from the reference only through its conditioning. Outputs: reports/grid_single.png,
reports/grid_multi.png, reports/plots/cosine_per_position.png, reports/fidelity.json and
reports/report.md. Run on CPU in float32 the images are the same bytes on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.adherence import REFERENCE, Scorer, with_ratios
from pipeline.base_models import ClipText, load_clip
from pipeline.errors import DeprojectorError, read_json
from pipeline.evaluate import ADHERENCE, IMAGE_PROMPTS, NULL_BASELINE
from pipeline.generation import generate_images, load_checked_deprojector, load_pipeline
from pipeline.image_metrics import psnr, ssim
from pipeline.image_prompts import ImageTower, ModalityGap, scene_image
from pipeline.interpolation import fractions, run_interpolation
from pipeline.jsonio import write_json
from pipeline.losses import cosine_per_position
from pipeline.models import Deprojector
from pipeline.params import Params, RenderParams
from pipeline.prompt_encoder import PromptEncoder
from pipeline.prompts import conditioning, negative_conditioning
from pipeline.report import extras_section, write_report

MIN_CELL = 160  # px: smaller images (the builtin ones) are upscaled, NEAREST, to at least this


class RenderError(DeprojectorError, RuntimeError):
    """An input of the render stage is missing or does not fit; the message says which."""


@dataclass
class Column:
    """One prompt's cells: image and conditioning per row name."""

    prompt: str
    images: dict[str, Image.Image]
    conds: dict[str, torch.Tensor]  # [1, 77, D]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # clip_score, adherence

    def label(self, row: str) -> str:
        """The score line under a cell: adherence (world only) and CLIP score."""
        s = self.scores.get(row, {})
        parts = [f"adh {s['adherence']:.2f}"] if "adherence" in s else []
        parts += [f"CLIP {s['clip_score']:.1f}"] if "clip_score" in s else []
        return " · ".join(parts)

    def fidelity(self, row: str) -> dict[str, float]:
        """Conditioning cosine (mean over positions 1..76) and image PSNR/SSIM vs reference."""
        cos = cosine_per_position(self.conds[row].float(), self.conds[REFERENCE].float())
        image, reference = np.asarray(self.images[row]), np.asarray(self.images[REFERENCE])
        return {"cosine": cos[0, 1:].mean().item(), "psnr": psnr(image, reference),
                "ssim": ssim(image, reference)}


def render_column(pipe, clip: ClipText, models: dict[str, Deprojector], prompt: str,
                  combine: bool, negative: torch.Tensor, r: RenderParams,
                  scorer: Scorer | None = None) -> Column:
    conds = {REFERENCE: conditioning(prompt, clip, None)[0]}
    for name, model in models.items():
        conds[name] = conditioning(prompt, clip, model, combine)[0]
    images = generate_images(pipe, torch.cat([c.float() for c in conds.values()]), negative, r)
    column = Column(prompt, dict(zip(conds, images, strict=True)), conds)
    if scorer is not None:
        scores = scorer.score(images, [prompt] * len(images))
        column.scores = dict(zip(conds, scores, strict=True))
    return column


# --- pictures -----------------------------------------------------------------------------

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
        return (self.left + self.cols * (self.cell_width + self.gap) + self.gap,
                self.top + self.rows * (self.cell_height + self.label + self.gap) + self.gap)

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


def make_grid(columns: list[Column], rows: tuple[str, ...] | None = None, gap: int = 6,
              text_size: int = 16) -> tuple[Image.Image, GridLayout]:
    """Rows of images under their prompts, row names on the left (default: every row of the
    columns, in their order: the reference, then the models as params list them)."""
    rows = rows or tuple(columns[0].images)
    sizes = {c.images[row].size for c in columns for row in rows}
    if len(sizes) != 1:
        raise RenderError(f"grid cells differ in size: {sorted(sizes)}")
    (w, h), = sizes
    scale = max(1, math.ceil(MIN_CELL / min(w, h)))
    face = font(text_size)
    line = text_size + 4
    headers = [_wrap(c.prompt, face, w * scale - 4) for c in columns]
    left = int(max(face.getlength(name) for name in rows)) + 2 * gap
    top = max(len(lines) for lines in headers) * line + 2 * gap
    small = font(text_size - 3)
    label = line if any(c.scores for c in columns) else 0
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
                draw.text(((x0 + x1) / 2, y1 + 2), column.label(row), fill="black", font=small,
                          anchor="ma")
    for i, row in enumerate(rows):
        _, y0, _, y1 = layout.cell_box(i, 0)
        draw.text((gap, (y0 + y1) / 2), row, fill="black", font=face, anchor="lm")
    return grid, layout


COLORS = ("#888888", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str,
               y_label: str, size: tuple[int, int] = (800, 460)) -> Image.Image:
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
    ImageDraw.Draw(image).text((size[0] / 2, size[1] / 2), text, fill="black", font=font(14),
                               anchor="mm")
    return image


def cosine_chart(rows: list[dict]) -> Image.Image:
    """The evaluate stage's autoregressive cosine per position, one line per model."""
    names = [key for key in rows[0] if key != "position"]
    series = {name: [(row["position"], row[name]) for row in rows] for name in names}
    return line_chart(series, "Autoregressive cosine similarity per position (test set)",
                      "position", "cosine")


# --- report -------------------------------------------------------------------------------

RERUN_EVALUATE = "rerun `deprojector evaluate` to rewrite it"


def read_metrics(metrics_dir: Path, names: list[str]) -> dict[str, dict]:
    """The evaluate stage's metrics of the null baseline and of `names`, in that order."""
    metrics = {}
    for name in [NULL_BASELINE, *names]:
        path = metrics_dir / f"{name}.json"
        if not path.is_file():
            raise RenderError(f"{path} not found: run the evaluate stage first")
        metrics[name] = read_json(path, RenderError, RERUN_EVALUATE)
    return metrics


def grid_fidelity(columns: list[Column], models: list[str]) -> dict[str, dict]:
    """Per model: mean cosine/PSNR/SSIM over the columns, and each column's scores."""
    result = {}
    for name in models:
        per_prompt = {c.prompt: c.fidelity(name) for c in columns}
        means = {k: float(np.mean([s[k] for s in per_prompt.values()]))
                 for k in ("cosine", "psnr", "ssim")}
        result[name] = {**means, "per_prompt": per_prompt}
    return result


def grid_scores(columns: list[Column]) -> dict[str, dict]:
    """Per row: mean adherence and CLIP score over the columns, ratios to the reference row,
    and each column's scores."""
    rows = {}
    for row in columns[0].scores:
        per_prompt = {c.prompt: c.scores[row] for c in columns}
        rows[row] = {k: float(np.mean([s[k] for s in per_prompt.values()]))
                     for k in next(iter(per_prompt.values()))}
        rows[row]["per_prompt"] = per_prompt
    return with_ratios(rows) if rows else {}


def adherence_chart(by_kind: dict[str, dict[str, dict]]) -> Image.Image:
    """Horizontal bars: mean held-out adherence (or CLIP score without a judge) per row."""
    key = "adherence" if "adherence" in next(iter(by_kind["single"].values())) else "clip_score"
    top = 1.0 if key == "adherence" else 100.0
    rows = list(by_kind["single"])
    face, small = font(16), font(13)
    bar, margin_l, width = 14, 190, 720
    height = 60 + len(rows) * (2 * bar + 14) + 30
    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    title = "Held-out prompts: " + ("adherence (judge)" if key == "adherence" else "CLIP score")
    draw.text((width / 2, 10), title, fill="black", font=face, anchor="ma")
    plot_w = width - margin_l - 80
    for i, row in enumerate(rows):
        y = 50 + i * (2 * bar + 14)
        draw.text((margin_l - 10, y + bar), row, fill="black", font=small, anchor="rm")
        for k, (kind, color) in enumerate((("single", COLORS[1]), ("multi", COLORS[2]))):
            value = by_kind[kind][row][key]
            x1 = margin_l + plot_w * max(0.0, min(value / top, 1.0))
            draw.rectangle([margin_l, y + k * bar, x1, y + (k + 1) * bar - 2], fill=color)
            draw.text((x1 + 4, y + k * bar + bar / 2), f"{value:.2f}", fill="black", font=small,
                      anchor="lm")
    y = height - 22
    for k, (kind, color) in enumerate((("single embedding", COLORS[1]),
                                       ("comma-combined", COLORS[2]))):
        x = margin_l + k * 200
        draw.rectangle([x, y, x + 14, y + 12], fill=color)
        draw.text((x + 20, y + 6), kind, fill="black", font=small, anchor="lm")
    return chart


# --- the stage ----------------------------------------------------------------------------

def render_grid(pipe, clip: ClipText, models: dict[str, Deprojector], prompts: list[str],
                combine: bool, r: RenderParams, scorer: Scorer | None = None) -> list[Column]:
    negative = negative_conditioning(clip)
    what = "multi" if combine else "single"
    return [render_column(pipe, clip, models, prompt, combine, negative, r, scorer)
            for prompt in tqdm(prompts, desc=f"render {what}", unit="prompt")]


@dataclass
class Rendered:
    """What the stage made, per grid ("single", "multi"): its columns, layout and fidelity."""

    columns: dict[str, list[Column]]
    layouts: dict[str, GridLayout]
    fidelity: dict[str, dict]
    scores: dict[str, dict] = field(default_factory=dict)  # grid -> row -> clip/adherence
    interpolation: dict[str, dict] | None = None  # run -> judged curve (the world only)


def run_render_stage(params: Params, models_dir: Path = Path("models"),
                     reports_dir: Path = Path("reports"),
                     gap_dir: Path = Path("data/gap")) -> Rendered:
    r = params.render
    metrics = read_metrics(reports_dir / "metrics", list(params.models))
    curve_file = reports_dir / "plots" / "cosine_per_position.json"
    if not curve_file.exists():
        raise RenderError(f"{curve_file} not found: run the evaluate stage first")
    clip = load_clip(params.base.clip, device=r.device)
    models = {name: load_checked_deprojector(models_dir / name, clip, r.device)
              for name in params.models}
    pipe = load_pipeline(params.base.sd, r)
    scorer = Scorer.load(params.base.clip, params.base.sd)

    done = Rendered({}, {}, {})
    single, multi = r.prompts(params.base.clip)
    # The world's extras: drawn scenes as image prompts, the judged interpolation strip.
    world = scorer.judge is not None and single == r.world_prompts_single
    showcase = r.showcase(list(models))
    for what, prompts, combine in (("single", single, False), ("multi", multi, True)):
        columns = render_grid(pipe, clip, models, prompts, combine, r, scorer)
        if world and what == "single":
            add_image_prompt_rows(columns, pipe, clip, models[showcase], r, scorer,
                                  ImageTower.load(params.base.clip, r.device),
                                  ModalityGap.load(gap_dir))
        grid, done.layouts[what] = make_grid(columns)
        grid.save(reports_dir / f"grid_{what}.png")
        done.columns[what] = columns
        done.fidelity[what] = grid_fidelity(columns, list(models))
        done.scores[what] = grid_scores(columns)
    cosine_chart(read_json(curve_file, RenderError, RERUN_EVALUATE, expect=list)).save(
        curve_file.with_suffix(".png"))
    held_out_file = reports_dir / "metrics" / f"{ADHERENCE}.json"
    held_out = read_json(held_out_file, RenderError, RERUN_EVALUATE) \
        if held_out_file.is_file() else None
    chart = reports_dir / "plots" / "adherence.png"
    if held_out:
        adherence_chart(held_out).save(chart)
    else:
        chart.unlink(missing_ok=True)
    if world:
        done.interpolation = render_interpolation(pipe, clip, models, scorer, r, reports_dir)
    else:  # outputs DVC expects, saying why they are empty
        why = "interpolation is judged with the builtin world only (base.clip/sd: builtin)"
        for image in ("interpolation.png", "plots/interpolation.png"):
            notice(why).save(reports_dir / image)
        write_json(reports_dir / "interpolation.json", {"available": False, "why": why})
    write_json(reports_dir / "fidelity.json", done.fidelity)
    write_json(reports_dir / "grid_scores.json", done.scores)
    image_prompts_file = reports_dir / "metrics" / f"{IMAGE_PROMPTS}.json"
    image_prompts = read_json(image_prompts_file, RenderError, RERUN_EVALUATE) \
        if image_prompts_file.is_file() else None
    write_report(reports_dir / "report.md", params, metrics, done.fidelity, done.scores,
                 held_out, extras_section(showcase if world else None, image_prompts,
                                          done.interpolation, r))
    return done


IMAGE_ROWS = ("scene", "image prompt")  # the drawn scene; its image-prompt picture


def add_image_prompt_rows(columns: list[Column], pipe, clip: ClipText, model: Deprojector,
                          r: RenderParams, scorer: Scorer, tower: ImageTower,
                          gap: ModalityGap) -> None:
    """Rows `scene` (a drawn scene with everything the column's prompt states) and `image
    prompt` (that scene as the only prompt of `model`, gap-corrected), scored like the rest."""
    scenes = [scene_image(c.prompt, r.seed) for c in columns]
    embeds = PromptEncoder(clip, model, tower, gap).image_embedding(scenes)
    conds = model.generate(embeds)
    pictures = generate_images(pipe, conds, negative_conditioning(clip), r)
    for k, column in enumerate(columns):
        shown = scenes[k].resize(pictures[k].size, Image.Resampling.BOX)  # grid cells match
        column.images.update(zip(IMAGE_ROWS, (shown, pictures[k]), strict=True))
        column.conds[IMAGE_ROWS[1]] = conds[k:k + 1]
        scores = scorer.score([scenes[k], pictures[k]], [column.prompt] * 2)
        column.scores.update(zip(IMAGE_ROWS, scores, strict=True))


def render_interpolation(pipe, clip: ClipText, models: dict[str, Deprojector], scorer: Scorer,
                         r: RenderParams, reports_dir: Path) -> dict[str, dict]:
    """reports/interpolation.png (one strip per run), the judged curves in
    reports/interpolation.json and their balance chart in reports/plots/interpolation.png."""
    curves, strips = run_interpolation(pipe, clip, models, scorer, r)
    columns = [Column(f"t = {t:.3g}", {name: strip[k] for name, strip in strips.items()}, {})
               for k, t in enumerate(fractions(r.interpolation_steps))]
    make_grid(columns)[0].save(reports_dir / "interpolation.png")
    write_json(reports_dir / "interpolation.json", curves)
    line_chart({name: list(zip(c["t"], c["balance"], strict=True)) for name, c in curves.items()},
               f"{r.interpolation_from} -> {r.interpolation_to}: judge's balance "
               f"({r.interpolation_seeds} seeds per t)", "t",
               "adherence to B - adherence to A").save(reports_dir / "plots" / "interpolation.png")
    return curves
