"""The `render` stage: the article's comparison grids and the report (docs/architectures.md).

For each prompt (a column) the reference row is generated from the ordinary CLIP states and
each model's row from its deprojected conditioning, all from the same seed, so a cell differs
from the reference only through its conditioning. Outputs: reports/grid_single.png,
reports/grid_multi.png, reports/plots/cosine_per_position.png, reports/fidelity.json and
reports/report.md. Run on CPU in float32 the images are the same bytes on every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config.params import Params, RenderParams
from pipeline.config.runs import check_runs
from pipeline.core.atomic import save_image
from pipeline.core.errors import DeprojectorError, read_json
from pipeline.core.jsonio import write_json
from pipeline.core.names import (
    ADHERENCE,
    COMPARISON,
    IMAGE_PROMPTS,
    IMAGE_ROWS,
    NULL_BASELINE,
    REFERENCE,
    RETRIEVAL,
)
from pipeline.metrics.adherence import Scorer, with_ratios
from pipeline.metrics.adherence import column as score_column
from pipeline.metrics.image_metrics import psnr, ssim
from pipeline.metrics.losses import cosine_per_position
from pipeline.metrics.records import CLIP_SCORE, PictureScores
from pipeline.prompting.encoder import PromptEncoder
from pipeline.reporting.drawing import (
    GridColumn,
    GridLayout,
    adherence_chart,
    cosine_chart,
    line_chart,
    make_grid,
    notice,
)
from pipeline.reporting.interpolation import fractions, run_interpolation
from pipeline.reporting.report import extras_section, write_report
from pipeline.sampling.encoders import load_encoders
from pipeline.sampling.sd import generate_images, generate_pixels, load_pipeline
from pipeline.world.embedded import World


class RenderError(DeprojectorError, RuntimeError):
    """An input of the render stage is missing or does not fit; the message says which."""


@dataclass
class Column:
    """One prompt's cells: image and conditioning per row name."""

    prompt: str
    images: dict[str, Image.Image]
    conds: dict[str, torch.Tensor]  # [1, 77, D]
    scores: dict[str, PictureScores] = field(default_factory=dict)  # per row

    def label(self, row: str) -> str:
        """The score line under a cell: adherence (world only) and CLIP score."""
        s = self.scores.get(row)
        if s is None:
            return ""
        parts = [f"adh {s[ADHERENCE]:.2f}"] if ADHERENCE in s else []
        parts += [f"CLIP {s[CLIP_SCORE]:.1f}"] if CLIP_SCORE in s else []
        return " · ".join(parts)

    def grid_column(self) -> GridColumn:
        return GridColumn(self.prompt, self.images, {row: self.label(row) for row in self.scores})

    def fidelity(self, row: str) -> dict[str, float]:
        """Conditioning cosine (mean over positions 1..76) and image PSNR/SSIM vs reference."""
        cos = cosine_per_position(self.conds[row].float(), self.conds[REFERENCE].float())
        image, reference = np.asarray(self.images[row]), np.asarray(self.images[REFERENCE])
        return {
            "cosine": cos[0, 1:].mean().item(),
            "psnr": psnr(image, reference),
            "ssim": ssim(image, reference),
        }


def render_column(
    pipe,
    encoders: dict[str, PromptEncoder],
    prompt: str,
    combine: bool,
    negative: torch.Tensor,
    r: RenderParams,
    scorer: Scorer | None = None,
) -> Column:
    """Every row's picture of `prompt` from seed render.seed: REFERENCE from the ordinary
    CLIP states, each run's from its deprojected conditioning (parts combined or not)."""
    return render_columns(pipe, encoders, [prompt], combine, negative, r, scorer)[0]


def render_columns(
    pipe,
    encoders: dict[str, PromptEncoder],
    prompts: list[str],
    combine: bool,
    negative: torch.Tensor,
    r: RenderParams,
    scorer: Scorer | None = None,
) -> list[Column]:
    """`render_column` of each prompt, every cell of every column drawn in shared UNet
    batches (each picture from seed render.seed, as when drawn alone)."""
    conds = [
        {
            name: encoder.encode_prompt(prompt, combine=combine, deproject=name != REFERENCE)
            for name, encoder in encoders.items()
        }
        for prompt in prompts
    ]
    pixels = generate_pixels(
        pipe, torch.cat([c.float() for cs in conds for c in cs.values()]), negative, r
    )
    cells = [prompt for prompt, cs in zip(prompts, conds, strict=True) for _ in cs]
    scores = scorer.score(pixels, cells) if scorer is not None else None
    columns, k = [], 0
    for prompt, cs in zip(prompts, conds, strict=True):
        images = [Image.fromarray(image) for image in pixels[k : k + len(cs)]]
        column = Column(prompt, dict(zip(cs, images, strict=True)), cs)
        if scores is not None:
            column.scores = dict(zip(cs, scores[k : k + len(cs)], strict=True))
        columns.append(column)
        k += len(cs)
    return columns


# --- report -------------------------------------------------------------------------------

RERUN_EVALUATE = "rerun `deprojector evaluate` to rewrite it"


def read_result(metrics_dir: Path, name: str) -> dict:
    """reports/metrics/NAME.json, written by the evaluate stage."""
    path = metrics_dir / f"{name}.json"
    if not path.is_file():
        raise RenderError(f"{path} not found: run the evaluate stage first")
    return read_json(path, RenderError, RERUN_EVALUATE)


def read_metrics(metrics_dir: Path, names: list[str]) -> dict[str, dict]:
    """The evaluate stage's metrics of the null baseline, the retrieval baseline and of
    `names`, in that order."""
    return {name: read_result(metrics_dir, name) for name in [NULL_BASELINE, RETRIEVAL, *names]}


def grid_fidelity(columns: list[Column], models: list[str]) -> dict[str, dict]:
    """Per model: mean cosine/PSNR/SSIM over the columns, and each column's scores."""
    result = {}
    for name in models:
        per_prompt = {c.prompt: c.fidelity(name) for c in columns}
        means = {
            k: float(np.mean([s[k] for s in per_prompt.values()]))
            for k in ("cosine", "psnr", "ssim")
        }
        result[name] = {**means, "per_prompt": per_prompt}
    return result


def grid_scores(columns: list[Column]) -> dict[str, dict[str, object]]:
    """Per row: mean adherence and CLIP score over the columns, ratios to the reference row,
    and each column's scores."""
    rows: dict[str, dict[str, object]] = {}
    for row in columns[0].scores:
        per_prompt = {c.prompt: c.scores[row] for c in columns}
        rows[row] = {
            k: float(np.mean(score_column(list(per_prompt.values()), k)))
            for k in next(iter(per_prompt.values()))
        }
        rows[row]["per_prompt"] = per_prompt
    return with_ratios(rows) if rows else {}


# --- the stage ----------------------------------------------------------------------------


def render_grid(
    pipe,
    encoders: dict[str, PromptEncoder],
    prompts: list[str],
    combine: bool,
    r: RenderParams,
    scorer: Scorer | None = None,
) -> list[Column]:
    negative = encoders[REFERENCE].encode_negative("", deproject=False)
    return render_columns(pipe, encoders, prompts, combine, negative, r, scorer)


@dataclass
class Rendered:
    """What the stage made, per grid ("single", "multi"): its columns, layout and fidelity."""

    columns: dict[str, list[Column]]
    layouts: dict[str, GridLayout]
    fidelity: dict[str, dict]
    scores: dict[str, dict] = field(default_factory=dict)  # grid -> row -> clip/adherence
    interpolation: dict[str, dict] | None = None  # run -> judged curve (the world only)


def run_render_stage(
    params: Params,
    models_dir: Path = Path("models"),
    reports_dir: Path = Path("reports"),
    gap_dir: Path = Path("data/gap"),
) -> Rendered:
    check_runs(params.models)
    r = params.render
    metrics = read_metrics(reports_dir / "metrics", list(params.models))
    comparison = read_result(reports_dir / "metrics", COMPARISON)
    curve_file = reports_dir / "plots" / "cosine_per_position.json"
    if not curve_file.exists():
        raise RenderError(f"{curve_file} not found: run the evaluate stage first")
    world = World.of(params.base.clip, params.base.sd)
    # The world's extras: drawn scenes as image prompts, the judged interpolation strip.
    extras = world is not None and r.world_prompts(True)
    encoders = load_encoders(params, models_dir, gap_dir if extras else None, r.device)
    runs = {name: encoder for name, encoder in encoders.items() if name != REFERENCE}
    pipe = load_pipeline(params.base.sd, r)
    scorer = Scorer.load(params.base.clip, world)

    done = Rendered({}, {}, {})
    single, multi = r.prompts(world is not None)
    showcase = r.showcase(list(runs))
    for what, prompts, combine in (("single", single, False), ("multi", multi, True)):
        columns = render_grid(pipe, encoders, prompts, combine, r, scorer)
        if extras and world is not None and what == "single":
            add_image_prompt_rows(columns, pipe, runs[showcase], world, r, scorer)
        grid, done.layouts[what] = make_grid([c.grid_column() for c in columns])
        save_image(grid, reports_dir / f"grid_{what}.png")
        done.columns[what] = columns
        done.fidelity[what] = grid_fidelity(columns, list(runs))
        done.scores[what] = grid_scores(columns)
    save_image(
        cosine_chart(read_json(curve_file, RenderError, RERUN_EVALUATE, expect=list)),
        curve_file.with_suffix(".png"),
    )
    held_out_file = reports_dir / "metrics" / f"{ADHERENCE}.json"
    held_out = (
        read_json(held_out_file, RenderError, RERUN_EVALUATE) if held_out_file.is_file() else None
    )
    chart = reports_dir / "plots" / "adherence.png"
    if held_out:
        save_image(adherence_chart(held_out), chart)
    else:  # an output DVC expects, saying why it is empty
        save_image(notice("no held-out pictures: evaluate.adherence_prompts is 0"), chart)
    if extras:
        done.interpolation = render_interpolation(pipe, runs, scorer, r, reports_dir)
    else:
        why = "interpolation is judged with the builtin world only (base.clip/sd: builtin)"
        for image in ("interpolation.png", "plots/interpolation.png"):
            save_image(notice(why), reports_dir / image)
        write_json(reports_dir / "interpolation.json", {"available": False, "why": why})
    write_json(reports_dir / "fidelity.json", done.fidelity)
    write_json(reports_dir / "grid_scores.json", done.scores)
    image_prompts_file = reports_dir / "metrics" / f"{IMAGE_PROMPTS}.json"
    image_prompts = (
        read_json(image_prompts_file, RenderError, RERUN_EVALUATE)
        if image_prompts_file.is_file()
        else None
    )
    write_report(
        reports_dir / "report.md",
        params,
        metrics,
        comparison,
        done.fidelity,
        done.scores,
        held_out,
        extras_section(showcase if extras else None, image_prompts, done.interpolation, r),
        image_prompts,
    )
    return done


def add_image_prompt_rows(
    columns: list[Column],
    pipe,
    encoder: PromptEncoder,
    world: World,
    r: RenderParams,
    scorer: Scorer,
) -> None:
    """Rows `scene` (a drawn scene with everything the column's prompt states) and `image
    prompt` (that scene as the only prompt of the run's encoder, through its bridge), scored like
    the rest."""
    scenes = [world.scene_for(c.prompt, r.seed) for c in columns]
    conds = encoder.deproject(encoder.image_embedding(scenes), "the drawn scenes")
    pictures = generate_images(pipe, conds, encoder.encode_negative("", deproject=False), r)
    for k, column in enumerate(columns):
        shown = scenes[k].resize(pictures[k].size, Image.Resampling.BOX)  # grid cells match
        column.images.update(zip(IMAGE_ROWS, (shown, pictures[k]), strict=True))
        column.conds[IMAGE_ROWS[1]] = conds[k : k + 1]
        scores = scorer.score([scenes[k], pictures[k]], [column.prompt] * 2)
        column.scores.update(zip(IMAGE_ROWS, scores, strict=True))


def render_interpolation(
    pipe, encoders: dict[str, PromptEncoder], scorer: Scorer, r: RenderParams, reports_dir: Path
) -> dict[str, dict]:
    """reports/interpolation.png (one strip per run), the judged curves in
    reports/interpolation.json and their balance chart in reports/plots/interpolation.png."""
    curves, strips = run_interpolation(pipe, encoders, scorer, r)
    columns = [
        GridColumn(f"t = {t:.3g}", {name: strip[k] for name, strip in strips.items()})
        for k, t in enumerate(fractions(r.interpolation_steps))
    ]
    save_image(make_grid(columns)[0], reports_dir / "interpolation.png")
    write_json(reports_dir / "interpolation.json", curves)
    chart = line_chart(
        {name: list(zip(c["t"], c["balance"], strict=True)) for name, c in curves.items()},
        f"{r.interpolation_from} -> {r.interpolation_to}: judge's balance "
        f"({r.interpolation_seeds} seeds per t)",
        "t",
        "adherence to B - adherence to A",
    )
    save_image(chart, reports_dir / "plots" / "interpolation.png")
    return curves
