"""The render stage and the encode/generate commands, on the builtin models at a tiny size."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.base.clip_encode import encode_texts
from pipeline.cli import app
from pipeline.config import params as params_module
from pipeline.config.params import ParamsError, load_params, parse_params
from pipeline.core.conventions import MAX_LENGTH
from pipeline.core.jsonio import round_floats
from pipeline.core.names import IMAGE_ROWS, REFERENCE
from pipeline.metrics.image_metrics import PSNR_CAP_DB
from pipeline.models import build_deprojector
from pipeline.prompting.encoder import PromptEncoder
from pipeline.reporting.drawing import MIN_CELL
from pipeline.sampling.sd import SCHEDULERS, load_pipeline
from pipeline.stages.captions import run_captions_stage
from pipeline.stages.gap import run_gap_stage
from pipeline.stages.render import RenderError, render_column, run_render_stage
from pipeline.world.embedded import World
from tests.conftest import project_dir, small_params

SIZE = 16  # px: the smallest image SSIM's 11 x 11 window fits comfortably
RENDER = {
    "steps": 2,
    "height": SIZE,
    "width": SIZE,
    "seed": 3,
    "interpolation_steps": 3,
    "interpolation_seeds": 2,
}
# params.yaml's `models:`: every run gets a row, a second vicinity-batch run included.
RUNS = {
    "transformer": {"type": "transformer", "num_heads": 4, "intermediate_size": 256},
    "vicinity-batch": {"type": "vicinity-batch", "vicinity": 2},
    "vicinity-individual": {"type": "vicinity-individual", "vicinity": 2, "norm": "layer"},
    "vicinity-batch-v2": {"type": "vicinity-batch", "vicinity": 1, "norm": "layer"},
}
RUN_NAMES = tuple(RUNS)
ROWS = {"single": (REFERENCE, *RUN_NAMES, *IMAGE_ROWS), "multi": (REFERENCE, *RUN_NAMES)}


@pytest.fixture(scope="module")
def project(tmp_path_factory, base_dir, clip, small_shards) -> Path:
    """A project with untrained deprojectors, stand-in metrics and a tiny render section."""
    work = project_dir(tmp_path_factory.mktemp("render"), base_dir)
    constants = load_file(str(small_shards / "constants.safetensors"))
    torch.manual_seed(0)
    for name, spec in RUNS.items():
        hparams = {k: v for k, v in spec.items() if k != "type"}
        model = build_deprojector(
            spec["type"], clip.hidden_size, clip.projection_size, constants, **hparams
        )
        model.eval().save_pretrained(work / "models" / name)
    (work / "reports" / "metrics").mkdir(parents=True)
    (work / "reports" / "plots").mkdir()
    for k, name in enumerate(("null-baseline", "retrieval", *RUN_NAMES)):
        scores = {
            "mse": 0.5 - k / 10,
            "weighted_mse": 0.4,
            "cosine": 0.2 + k / 5,
            "cosine_masked": 0.3 + k / 5,
            "cosine_masked_ci95": [0.25 + k / 5, 0.35 + k / 5],
        }
        metrics = {"teacher_forced": scores, "autoregressive": scores}
        if name == "retrieval":
            metrics["k"] = 8
        (work / "reports" / "metrics" / f"{name}.json").write_text(json.dumps(metrics))
    rows = {
        "retrieval": False,
        "transformer": False,
        "vicinity-individual": True,
        "vicinity-batch-v2": False,
    }
    comparison = {
        "autoregressive_cosine_masked": {
            "best": "vicinity-batch",
            "rows": {
                name: {
                    "difference": -0.1,
                    "difference_ci95": [-0.2, 0.01 if within else -0.05],
                    "within_noise": within,
                }
                for name, within in rows.items()
            },
        }
    }
    (work / "reports" / "metrics" / "comparison.json").write_text(json.dumps(comparison))
    curve = [
        {"position": i, "null-baseline": 0.2, **{n: 1 - i / 100 for n in RUN_NAMES}}
        for i in range(1, MAX_LENGTH)
    ]
    (work / "reports" / "plots" / "cosine_per_position.json").write_text(json.dumps(curve))
    (work / "params.yaml").write_text(
        yaml.safe_dump({"render": RENDER, "models": RUNS}, sort_keys=False)
    )  # rows in this order
    with in_dir(work):  # modality-gap statistics for the image-prompt rows
        run_captions_stage(small_params())  # the bank of the text-projection bridge
        run_gap_stage(small_params(gap={"pairs": 32, "seed": 7}), work / "data" / "gap")
    return work


@contextmanager
def in_dir(folder: Path):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def rendered(project):
    with in_dir(project):
        return run_render_stage(load_params("params.yaml"))


@pytest.fixture(scope="module")
def pipe(project):
    with in_dir(project):  # the builtin pipeline is found under models/base of the cwd
        return load_pipeline("builtin", parse_params({"render": RENDER}).render)


@pytest.mark.slow
def test_stage_writes_every_output(project, rendered) -> None:
    reports = project / "reports"
    for name in (
        "grid_single.png",
        "grid_multi.png",
        "report.md",
        "fidelity.json",
        "plots/cosine_per_position.png",
    ):
        assert (reports / name).is_file(), name
    fidelity = json.loads((reports / "fidelity.json").read_text())
    assert fidelity == round_floats(rendered.fidelity)  # stored to 6 significant digits
    for what in ("single", "multi"):
        assert list(fidelity[what]) == list(RUN_NAMES)
        for scores in fidelity[what].values():
            assert set(scores) == {"cosine", "psnr", "ssim", "per_prompt"}
            assert len(scores["per_prompt"]) == 3
    # Every cell's adherence (the world's judge) and CLIP score, per-row means and ratios.
    pictures = json.loads((reports / "grid_scores.json").read_text())
    for what in ("single", "multi"):
        assert list(pictures[what]) == list(ROWS[what])
        for row in pictures[what].values():
            assert 0 <= row["adherence"] <= 1 and 0 <= row["clip_score"] <= 100
            assert len(row["per_prompt"]) == 3
        assert rendered.layouts[what].label > 0  # the score line under each cell


@pytest.mark.slow
def test_world_extras_image_prompt_rows_and_interpolation(project, rendered, base_dir) -> None:
    reports = project / "reports"
    curves = json.loads((reports / "interpolation.json").read_text())
    assert list(curves) == list(RUN_NAMES)
    for curve in curves.values():
        assert curve["t"] == [0.0, 0.5, 1.0]
        assert all(-1 <= b <= 1 for b in curve["balance"])
        assert curve["balance"] == pytest.approx(np.subtract(curve["to"], curve["from"]))
        assert curve["max_jump"] == pytest.approx(np.abs(np.diff(curve["balance"])).max())
    strip = Image.open(reports / "interpolation.png")
    assert strip.height > len(RUN_NAMES) * MIN_CELL  # one strip per run
    assert (reports / "plots" / "interpolation.png").is_file()
    report = (reports / "report.md").read_text()
    assert "## Images as prompts" in report
    assert "## Interpolation: red circle → blue square" in report
    # The image-prompt row is the showcase run (the first) deprojecting the drawn scene of its
    # column, exactly what the Python API gives for that scene.
    column = rendered.columns["single"][2]
    scene = World.scene_for(column.prompt, RENDER["seed"])
    encoder = PromptEncoder.from_pretrained(
        project / "models" / RUN_NAMES[0],
        clip="builtin",
        gap=project / "data" / "gap",
        base_dir=base_dir,
    )
    expected = encoder.deprojector.generate(encoder.image_embedding([scene]))
    torch.testing.assert_close(column.conds["image prompt"], expected)
    assert column.images["scene"].size == (SIZE, SIZE)


@pytest.mark.parametrize("what", ["single", "multi"])
def test_grid_has_a_row_per_run_and_3_equal_columns(project, rendered, what: str) -> None:
    layout = rendered.layouts[what]
    columns = rendered.columns[what]
    grid = Image.open(project / "reports" / f"grid_{what}.png").convert("RGB")
    rows = len(ROWS[what])
    assert (layout.rows, layout.cols) == (rows, 3) and grid.size == layout.size
    assert layout.cell_width == layout.cell_height >= MIN_CELL
    boxes = [layout.cell_box(i, j) for i in range(rows) for j in range(3)]
    assert {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes} == {(layout.cell_width,) * 2}
    assert len({b[0] for b in boxes}) == 3 and len({b[1] for b in boxes}) == rows
    # Each cell shows its own image, upscaled without blending pixels.
    for i, row in enumerate(ROWS[what]):
        for j, column in enumerate(columns):
            cell = np.asarray(grid.crop(layout.cell_box(i, j)))
            scale = layout.cell_width // SIZE
            expected = np.asarray(column.images[row]).repeat(scale, 0).repeat(scale, 1)
            assert np.array_equal(cell, expected), (row, column.prompt)


def test_reference_row_equals_plain_diffusers_generation(project, rendered, pipe) -> None:
    with in_dir(project):
        guidance = load_params("params.yaml").render.guidance_scale
    for column in (rendered.columns["single"][0], rendered.columns["multi"][1]):
        plain = pipe(
            prompt=column.prompt,
            negative_prompt="",
            num_inference_steps=2,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(3),
        ).images[0]
        # The grid draws its prompts in one batch, diffusers here one at a time: float
        # rounding may move a pixel by one uint8 level, nothing more.
        drawn, alone = (np.asarray(im).astype(int) for im in (column.images[REFERENCE], plain))
        assert np.abs(drawn - alone).max() <= 1 and np.mean(drawn != alone) < 0.01


class EchoDeprojector:
    """Returns the prompt's own CLIP states, as a perfect deprojector would."""

    def __init__(self, clip, prompt: str) -> None:
        encoded = encode_texts(clip, [prompt, ""])
        self.hidden, self.null = encoded.hidden[:1], encoded.pooled[1]

    def check_base(
        self, hidden_size: int, projection_size: int, fingerprint: str, clip_skip: int = 0
    ) -> None:
        pass

    def generate(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.hidden


def echo_encoders(clip, prompt: str) -> dict[str, PromptEncoder]:
    reference = PromptEncoder(clip)
    return {REFERENCE: reference, "echo": reference.with_deprojector(EchoDeprojector(clip, prompt))}


def test_exact_conditioning_scores_perfect_fidelity(clip, pipe) -> None:
    r = parse_params({"render": RENDER}).render
    prompt = "1girl red hair"
    encoders = echo_encoders(clip, prompt)
    column = render_column(
        pipe, encoders, prompt, False, encoders[REFERENCE].encode_negative("", deproject=False), r
    )
    scores = column.fidelity("echo")
    assert scores["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert scores["psnr"] == PSNR_CAP_DB  # capped: identical images have infinite PSNR


def test_images_are_deterministic(clip, pipe, rendered) -> None:
    r = parse_params({"render": RENDER}).render
    first = rendered.columns["single"][0]
    encoders = echo_encoders(clip, first.prompt)
    again = render_column(
        pipe,
        encoders,
        first.prompt,
        False,
        encoders[REFERENCE].encode_negative("", deproject=False),
        r,
    )
    assert again.images[REFERENCE].tobytes() == first.images[REFERENCE].tobytes()


def test_report_shows_grids_metrics_chart_and_fidelity(project, rendered) -> None:
    report = (project / "reports" / "report.md").read_text()
    header = "| metric | null-baseline | retrieval | " + " | ".join(RUN_NAMES) + " |"
    # Each value with its interval; the best run and which rows are within its noise.
    cosine = "| autoregressive cosine (in mask) | 0.3000 [0.2500, 0.3500] | 0.5000 [0.4500, "
    noise = (
        "Best autoregressive cosine (in mask): **vicinity-batch**. Within the noise of it "
        "(the 95 % paired bootstrap interval of the difference contains 0): "
        "vicinity-individual; clearly different: retrieval, transformer, vicinity-batch-v2"
    )
    for needle in (
        "![single-embedding grid](grid_single.png)",
        "![multiple-embedding grid](grid_multi.png)",
        "(plots/cosine_per_position.png)",
        "positions 1..76",
        header,
        cosine,
        noise,
        "| teacher-forced MSE | 0.5000 | 0.4000 | ",
        "its 8 nearest training rows",
        "`red, circle`",
        "`red circle`",
        "## Do the pictures show the prompt?",
        "| reference | ",
        # The summary at the top: states only here (no held-out pictures in this project).
        "## In one table",
        "| retrieval | 0.500 [0.450, 0.550] | — | — | — | — | — / — | — | — |",
    ):
        assert needle in report, needle


def test_picture_tables_show_intervals_and_the_rows_within_noise() -> None:
    from pipeline.reporting.report import adherence_noise_line, extras_section, picture_table

    def row(adherence: float) -> dict:
        return {
            "adherence": adherence,
            "adherence_ci95": [adherence - 0.1, adherence + 0.1],
            "clip_score": 25.0,
            "clip_score_ci95": [24.0, 26.0],
            "all_parts": 0.25,
            "all_parts_ci95": [0.125, 0.375],
            "adherence_ratio": adherence / 0.5,
            "prompts": 8,
        }

    held_out = {kind: {REFERENCE: row(0.5), "vb": row(0.4)} for kind in ("single", "multi")}
    table = picture_table(held_out, all_parts=True)
    assert "| vb | 0.400 [0.300, 0.500] (0.80×) | 25.0 [24.0, 26.0] | " in table
    assert table.endswith("| 0.250 [0.125, 0.375] |")
    within = {"difference": -0.1, "difference_ci95": [-0.2, 0.01], "within_noise": True}
    line = adherence_noise_line(
        {
            "adherence": {
                "sign": "run − reference",
                "single": {"vb": within},
                "multi": {"vb": {**within, "within_noise": False}},
            }
        }
    )
    assert line.endswith("contains 0): single: vb; multi: none.")
    images = {
        REFERENCE: {"text": row(0.5)},
        "vb": {
            "text": row(0.5),
            "image": row(0.4),
            "image_to_text": 0.8,
            "image_to_text_ci95": [0.6, 1.0],
            "bridge": "linear",
            "bridges": {"none": row(0.2), "linear": row(0.4)},
        },
    }
    r = parse_params({"render": RENDER}).render
    section = extras_section(None, images, None, r)
    assert "| run | text prompt | image, none | image, linear | image / text |" in section
    assert (
        "| vb | 0.500 [0.400, 0.600] | 0.200 [0.100, 0.300] | 0.400 [0.300, 0.500] | "
        "0.80 [0.60, 1.00] |" in section
    )
    assert "| reference | 0.500 [0.400, 0.600] | – | – | – |" in section
    # evaluate.bridges `own` (the default): one image column, the run's own bridge.
    del images["vb"]["bridges"]
    section = extras_section(None, images, None, r)
    assert "| run | text prompt | image, linear | image / text |" in section
    assert "| vb | 0.500 [0.400, 0.600] | 0.400 [0.300, 0.500] | 0.80 [0.60, 1.00] |" in section


def test_pairs_and_seed_spread_tables() -> None:
    from pipeline.reporting.report import pairs_table, seed_spread_table

    comparison = {
        "pairs": {
            "metric": "autoregressive cosine_masked",
            "sign": "first − second",
            "a vs b": {"difference": 0.01, "difference_ci95": [-0.002, 0.02], "within_noise": True},
            "a vs retrieval": {
                "difference": 0.05,
                "difference_ci95": [0.04, 0.06],
                "within_noise": False,
            },
        },
        "seed_spread": {
            "a": {
                "runs": ["a", "a-seed1", "a-seed2"],
                "seeds": [0, 1, 2],
                "autoregressive_cosine_masked": {
                    "mean": 0.7,
                    "std": 0.01,
                    "min": 0.69,
                    "max": 0.71,
                },
            }
        },
    }
    table = pairs_table(comparison)
    assert "| a vs b | +0.0100 [-0.0020, +0.0200] | no difference (within the noise) |" in table
    assert "| a vs retrieval | +0.0500 [+0.0400, +0.0600] | differs |" in table
    spread = seed_spread_table(comparison)
    assert "| a | 0, 1, 2 | 0.7000 ± 0.0100 [0.6900, 0.7100] |" in spread
    assert "TF cosine" not in spread  # only the columns some group has
    assert pairs_table({}) == seed_spread_table({}) == ""


def test_summary_table_puts_every_runs_answers_beside_the_baselines() -> None:
    from pipeline.reporting.report import summary_table

    def states(cosine: float) -> dict:
        return {"autoregressive": {"cosine_masked": cosine, "cosine_masked_ci95": [0.5, 0.9]}}

    def pictures(ratio: float, **extra: float) -> dict:
        return {"adherence_ratio": ratio, "adherence_ratio_ci95": [ratio - 0.1, ratio], **extra}

    combination = {"blend_cosine": 0.74, "retrieval_cosine": 0.66}
    metrics = {
        "retrieval": {**states(0.68), "combination": combination},
        "a": {**states(0.71), "combination": {"deprojector_cosine": 0.69}},
        "b": states(0.70),
    }
    difference = {"difference": 0.03, "difference_ci95": [0.02, 0.04], "within_noise": False}
    comparison = {
        "pairs": {"a vs retrieval": difference, "retrieval vs b": difference},
        "adherence_vs_blend": {"multi": {"a": difference}},
    }
    held_out = {
        "single": {"reference": pictures(1.0, all_parts=0.7), "a": pictures(0.8, all_parts=0.4)},
        "multi": {"a": pictures(0.7, all_parts=0.3), "blend": pictures(0.5)},
    }
    image_prompts = {"a": {"image_to_text": 0.9, "image_to_text_ci95": [0.8, 1.0]}}
    table = summary_table(metrics, comparison, held_out, image_prompts).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| reference",
        "| retrieval",
        "| a",
        "| b",
        "| blend",
    ]
    assert table[4] == (
        "| a | 0.710 [0.500, 0.900] | +0.030 [+0.020, +0.040] | 0.690 | 0.80 [0.70, 0.80] "
        "| 0.70 [0.60, 0.70] | 0.400 / 0.300 | +0.030 [+0.020, +0.040] | 0.90 [0.80, 1.00] |"
    )
    assert "| b | 0.700 [0.500, 0.900] | -0.030 [-0.040, -0.020] | — |" in table[5]
    # The baselines' combination cosines come from retrieval's record.
    assert table[3].split(" | ")[3] == "0.660" and table[6].split(" | ")[3] == "0.740"
    # Without held-out pictures: the runs' rows alone.
    assert len(summary_table(metrics, comparison, None, None).splitlines()) == 2 + 3


def test_missing_metrics_is_a_clear_error(tmp_path, base_dir) -> None:
    with in_dir(project_dir(tmp_path, base_dir)), pytest.raises(RenderError, match="evaluate"):
        run_render_stage(parse_params({"render": RENDER}))


def test_a_cut_metrics_file_names_the_file(tmp_path) -> None:
    from pipeline.stages.render import read_metrics

    (tmp_path / "null-baseline.json").write_text('{"cosine": 0.5}')
    (tmp_path / "retrieval.json").write_text('{"cosine": 0.5}')
    (tmp_path / "vb.json").write_text('{"cosine": 0.')
    with pytest.raises(
        RenderError,
        match=r"vb\.json:1: not valid JSON \(.*\); the file is "
        r"incomplete or corrupt; rerun `deprojector evaluate`",
    ):
        read_metrics(tmp_path, ["vb"])
    (tmp_path / "vb.json").write_text("[1, 2]")
    with pytest.raises(RenderError, match=r"vb\.json: expected a JSON object, found a list"):
        read_metrics(tmp_path, ["vb"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 vs diffusers' euler-a
def test_scheduler_names_match_params(pipe) -> None:
    import diffusers

    assert SCHEDULERS is params_module.SCHEDULERS  # one table
    for class_name in SCHEDULERS.values():
        getattr(diffusers, class_name).from_config(pipe.scheduler.config)


@pytest.mark.parametrize(
    ("render", "key"),
    [
        ({"height": 30}, "render.height"),
        ({"scheduler": "lms"}, "render.scheduler"),
        ({"world_prompts_multi": [" , "]}, "render.world_prompts_multi"),
        ({"prompt_set": "mine"}, "render.prompt_set"),
        ({"steps": 0}, "render.steps"),
    ],
)
def test_bad_render_params_name_the_key(render: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params({"render": render})


# --- the encode and generate commands -------------------------------------------------------

runner = CliRunner()


def invoke(project: Path, *args: str):
    with in_dir(project):
        return runner.invoke(app, list(args))


def test_encode_writes_prompt_embeds(project, clip) -> None:
    result = invoke(
        project,
        "encode",
        "cat, maid",
        "--model",
        "models/transformer",
        "-o",
        "out/cond.safetensors",
    )
    assert result.exit_code == 0, result.output
    embeds = load_file(str(project / "out" / "cond.safetensors"))["prompt_embeds"]
    assert embeds.shape == (1, MAX_LENGTH, clip.hidden_size)
    result = invoke(project, "encode", "cat, maid", "--no-deprojector", "-o", "ref.safetensors")
    assert result.exit_code == 0, result.output
    reference = load_file(str(project / "ref.safetensors"))["prompt_embeds"]
    assert torch.equal(reference, encode_texts(clip, ["cat, maid"]).hidden)
    # --blend: compel's average of the parts' CLIP states, the "A, B" baseline
    result = invoke(project, "encode", "cat, maid:3", "--blend", "-o", "blend.safetensors")
    assert result.exit_code == 0, result.output
    blend = load_file(str(project / "blend.safetensors"))["prompt_embeds"]
    parts = encode_texts(clip, ["cat", "maid"]).hidden
    torch.testing.assert_close(blend, (parts[:1] + 3 * parts[1:]) / 4)


def test_generate_writes_an_image(project) -> None:
    result = invoke(
        project,
        "generate",
        "cat, maid",
        "--model",
        "models/vicinity-batch",
        "--seed",
        "1",
        "--steps",
        "1",
        "--height",
        "24",
        "--width",
        "16",
        "--scheduler",
        "ddim",
        "-o",
        "out.png",
    )
    assert result.exit_code == 0, result.output
    assert Image.open(project / "out.png").size == (16, 24)


def test_encode_records_what_made_the_conditioning(project) -> None:
    from safetensors import safe_open

    result = invoke(
        project,
        "encode",
        "cat:1.2, maid",
        "-m",
        "models/vicinity-batch",
        "--negative",
        "dog",
        "-o",
        "meta.safetensors",
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(project / "meta.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["prompt"] == "cat:1.2, maid" and metadata["negative"] == "dog"
    assert metadata["deprojector"].endswith("vicinity-batch")
    assert metadata["model_type"] == "vicinity-batch" and metadata["clip_skip"] == "0"
    assert metadata["base_clip"] and len(metadata["base_fingerprint"]) == 64
    assert metadata["format"] == "pt" and "mix" not in metadata


def test_generate_draws_several_seeds_into_a_grid_with_another_sd(project, pipe) -> None:
    """--num-images N: seeds SEED..SEED+N-1, one grid column each, each the picture --seed
    draws alone; --seeds names them; --sd picks the pipeline (here the same world)."""
    common = ["cat", "-m", "models/vicinity-batch", "--steps", "1"]
    alone = invoke(project, "generate", *common, "--seed", "4", "-o", "s4.png")
    assert alone.exit_code == 0, alone.output
    grid = invoke(
        project, "generate", *common, "--seed", "3", "--num-images", "2", "-o", "grid.png"
    )
    assert grid.exit_code == 0 and "seeds 3, 4" in grid.output, grid.output
    named = invoke(
        project,
        "generate",
        *common,
        "--seeds",
        "3",
        "--seeds",
        "4",
        "--sd",
        str(project / "models" / "world" / "sd"),
        "-o",
        "named.png",
    )
    assert named.exit_code == 0, named.output
    assert (project / "grid.png").read_bytes() == (project / "named.png").read_bytes()
    picture = Image.open(project / "s4.png")
    assert Image.open(project / "grid.png").width > 2 * picture.width
    both = invoke(project, "generate", *common, "--seeds", "1", "--num-images", "2")
    assert both.exit_code == 2 and "give --seeds, or --seed with --num-images" in both.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["encode", ""], "has no text"),
        (["encode", " , ,"], "has no text"),
        (["generate", ",,"], "has no text"),
        (["encode", "cat", "--model", "models/missing"], "no deprojector in models/missing"),
        (["generate", "cat", "--height", "30"], "multiple of 8"),
        # the CLI's sampler options go through params.yaml's checks (issue 32)
        (
            ["generate", "cat", "--guidance", "inf"],
            "--guidance: params: `render.guidance_scale` must be a finite number",
        ),
        (["generate", "cat", "--guidance", "nan"], "`render.guidance_scale` must be a finite"),
        (["generate", "cat", "--guidance", "-5"], "`render.guidance_scale` must be a finite"),
        (
            ["generate", "cat", "--steps", "0"],
            "--steps: params: `render.steps` must be in [1, 1000]",
        ),
        (
            ["generate", "cat", "--scheduler", "ddim", "--steps", "1001"],
            "`render.steps` must be in",
        ),
        (
            ["generate", "cat", "--width", "100000"],
            "--width: params: `render.width` must be a positive multiple of 8",
        ),
        (["generate", "cat", "--seed", "-1"], "--seed"),
        (["generate", "cat", "--seeds", "-2"], "--seeds must be 0 or more"),
        (["generate", "cat", "--num-images", "0"], "--num-images"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(project, args: list[str], message: str) -> None:
    result = invoke(project, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_latents_that_overflow_draw_nothing(project, pipe) -> None:
    """A guidance scale far beyond any use (past params' bound, through the Python API) makes
    NaN latents: refused, never an all-black picture."""
    import dataclasses

    from pipeline.sampling.sd import GenerationError, generate_images

    r = dataclasses.replace(parse_params({"render": RENDER}).render, guidance_scale=1e38)
    with in_dir(project):
        encoder = PromptEncoder.from_pretrained(
            "models/vicinity-batch", clip="builtin", images=False
        )
        embeds = encoder.encode_prompt("red circle")
        with pytest.raises(GenerationError, match=r"not finite .* guidance scale 1e\+38"):
            generate_images(pipe, embeds, encoder.encode_negative(""), r)
        too_many = dataclasses.replace(r, guidance_scale=7.5, steps=1001)
        with pytest.raises(GenerationError, match=r"1001 steps: .* at most 1000"):
            generate_images(pipe, embeds, encoder.encode_negative(""), too_many)
