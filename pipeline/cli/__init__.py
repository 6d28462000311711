"""`deprojector` command line: one command per DVC stage, plus tools for users."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import typer

from pipeline.cli.prompts import (
    PROMPT_GRAMMAR,
    PromptOptions,
    conditionings,
    params_or_defaults,
    with_prompt_options,
)
from pipeline.core.atomic import save_image, save_tensors

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="CLIP Text Deprojector: build base models, collect captions, extract CLIP hidden "
    "states, train and evaluate deprojectors, render comparison grids.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ParamsOption = typer.Option(
    Path("params.yaml"), "--params", help="Params file to read (every stage reads its section)."
)


def _quiet_libraries() -> None:
    """Keep stage logs to our own progress bars and summaries."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _params(path: Path):
    from pipeline.config.params import load_params

    return load_params(path)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _run(step):
    """Run a stage; known failure classes print one clear line instead of a traceback."""
    _quiet_libraries()
    from pipeline.core.atomic import is_write_refusal, write_error
    from pipeline.core.errors import DeprojectorError

    try:
        return step()
    except (DeprojectorError, FileNotFoundError) as err:
        _fail(err)
    except OSError as err:  # a write the system refused outside the atomic writers
        if not is_write_refusal(err):
            raise
        _fail(write_error(err.filename or "an output", err))


@app.command("world")
def world_command(
    params: Path = ParamsOption,
    out: Path = typer.Option(Path("models/world"), help="Folder of the trained world."),
    work: Path = typer.Option(
        Path("data/world-work"), help="Checkpoints and finished parts of a build in progress."
    ),
    part: list[str] = typer.Option(
        None,
        help="Train only this part (repeatable): clip, vae, unet, judge. The world is "
        "assembled once every part is done.",
    ),
    jobs: int = typer.Option(
        2,
        min=1,
        help="Processes for the parts that need no other "
        "(vae, clip); the weights do not depend on it.",
    ),
    retrain: list[str] = typer.Option(
        None,
        help="Retrain this part (repeatable) even where OUT/world.json records its "
        "fingerprint; otherwise an unchanged part (same settings, code and needed parts) is "
        "taken from OUT.",
    ),
) -> None:
    """Train the embedded world (`world.*`): the builtin base models, offline.

    Draws `world.scenes` scenes (a background colour and 1-3 coloured shapes) with captions,
    trains a BPE tokenizer and a small CLIPModel (text + vision towers) contrastively, a VAE
    and a UNet as Stable Diffusion was (frozen CLIP text tower, 10 % empty captions), and a
    judge that reads colours and shapes back (from the drawings and their VAE round trips).
    Writes OUT/clip (CLIPModel, tokenizer, image processor), OUT/sd (a StableDiffusionPipeline
    folder), OUT/judge and OUT/world.json (each part's fingerprint and accuracies).
    Deterministic for one seed and `world.device`; an interrupted build resumes from WORK.
    """
    from pipeline.core.sections import load_section
    from pipeline.world.build import PARTS, build_world
    from pipeline.world.config import WorldParams

    def step():
        for hint, names in (("--part", part), ("--retrain", retrain)):
            unknown = [p for p in names or () if p not in PARTS]
            if unknown:
                raise typer.BadParameter(
                    f"unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})",
                    param_hint=hint,
                )
        # Only `world:` is read: the world depends on nothing of the pipeline above it.
        world = load_section(params, "world", WorldParams).validate()
        summary = build_world(out, world, work, tuple(part or PARTS), jobs, tuple(retrain or ()))
        if summary is None:
            typer.echo(
                f"parts {', '.join(part)} trained in {work}; run again without --part "
                "to assemble the world"
            )
            return
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "params"}, indent=2))

    _run(step)


@app.command("base")
def base_command(
    params: Path = ParamsOption,
    out: Path = typer.Option(Path("models/base.json"), help="Where to write the record."),
    clip_out: Path = typer.Option(
        None,
        help="Where to write the record of the CLIP alone [default: base-clip.json beside OUT].",
    ),
) -> None:
    """Check the base models `base.clip` and `base.sd` and record their fingerprint.

    Loads the CLIP tokenizer + text model with projection and the Stable Diffusion pipeline
    (`builtin`: the trained world in models/world/, built by `deprojector world`; otherwise a
    hub id or a local folder) and checks what transformers and diffusers let pass silently:
    tokenizer files present, text_projection weights present, pooling at the EOS token, UNet
    cross-attention width = CLIP hidden size. OUT records the names, widths and a fingerprint
    of every config, tokenizer and weight file loaded; CLIP_OUT the same for the CLIP alone.
    Later stages depend on one of them (the stages that use the CLIP alone on CLIP_OUT), so
    they rerun exactly when the weights they use change (the stage is always re-run by
    `dvc repro`).
    """
    from pipeline.stages.base import run_base_stage

    def step():
        p = _params(params)
        report = run_base_stage(p, out, clip_out)
        typer.echo(
            f"base models checked (clip: {p.base.clip}, sd: {p.base.sd}, "
            f"D={report.hidden_size}); fingerprint "
            f"{report.fingerprint['fingerprint'][:16]} in {out}"
        )

    _run(step)


@app.command("gap")
def gap_command(
    params: Path = ParamsOption,
    out: Path = typer.Option(Path("data/gap"), help="Output folder."),
) -> None:
    """Fit the bridges from image to text space of base.clip (`gap.*`).

    Encodes `gap.pairs` image/caption pairs with both CLIP towers and the first `gap.bank`
    training captions (data/captions) with the text tower, and writes every bridge's
    statistics to OUT/modality_gap.safetensors (default bridge `gap.bridge`; used by --image
    and by the image rows of `extract`): the mean text and image embeddings and text norm
    (mean-shift), a least-squares linear map (linear), the captions' text embeddings
    (text-projection). OUT/modality_gap.json holds each bridge's paired cosine on a held-out
    fifth of the pairs. Builtin base: drawn world scenes and their captions (seed
    `gap.seed`). A real CLIP: `gap.source`, a folder of images with a NAME.txt caption
    beside each or a datasets hub id (gap.image_column, gap.text_column, gap.hub_split);
    without any pairs, only the .json is written, saying so.
    """
    from pipeline.stages.gap import run_gap_stage

    summary = _run(lambda: run_gap_stage(_params(params), out))
    typer.echo(json.dumps(summary, indent=2))


@app.command("captions")
def captions_command(
    params: Path = ParamsOption,
    out: Path = typer.Option(Path("data/captions"), help="Output folder."),
) -> None:
    """Collect captions (`captions.source`), clean them, split train/test.

    Cleaning normalises whitespace and drops empty, duplicate and over-long captions
    (over 75 tokens + BOS/EOS), counting each reason in OUT/stats.json. Writes
    OUT/train.parquet and OUT/test.parquet (columns id, text).
    """
    from pipeline.stages.captions import run_captions_stage

    stats = _run(lambda: run_captions_stage(_params(params), out))
    typer.echo(json.dumps(stats))


@app.command("extract")
def extract_command(
    params: Path = ParamsOption,
    captions: Path = typer.Option(Path("data/captions"), help="Folder of the captions stage."),
    out: Path = typer.Option(Path("data/shards"), help="Output folder of the shards."),
    gap: Path = typer.Option(
        Path("data/gap"),
        help="Folder of the gap stage (the bridge of "
        "the image rows; read only with augment.image > 0).",
    ),
    num_workers: int = typer.Option(
        None,
        help="Split the shards over N workers (machines or GPUs); overrides extract.num_workers.",
    ),
    worker_index: int = typer.Option(
        None, help="Which worker this is, 0..N-1; overrides extract.worker_index."
    ),
) -> None:
    """Run the CLIP text model over the captions and their augmentations into Arrow shards.

    Writes OUT/<split>/shard-NNNNN.arrow (memory-mappable Arrow IPC stream files),
    OUT/constants.safetensors (sos, null, deprojection) and OUT/meta.json. Complete shards of
    an interrupted run with the same params are kept; the rest are rewritten.

    Image rows (augment.image > 0): that fraction of the training rows takes as input a
    paired image (gap.source; world scenes for the builtin base) through the vision tower,
    the bridge gap.bridge and the pseudo-inverse of the text projection, and as target its
    caption's hidden states; the test split gains as many image rows from other pairs. A bad
    pair (an image without its caption file or the reverse, an unreadable or non-RGB image)
    stops the stage naming the file; the shards already written are kept.

    Parallel extraction: worker I of N writes shards I, I+N, ... into the same OUT (a shared
    folder), e.g. `deprojector extract --num-workers 2 --worker-index 0` on one GPU and
    `--worker-index 1` on another; together they give exactly the single-worker shards.
    """
    from pipeline.config.params import validate
    from pipeline.stages.extract import run_extract_stage

    def step():
        p = _params(params)
        overrides = {
            k: v
            for k, v in (("num_workers", num_workers), ("worker_index", worker_index))
            if v is not None
        }
        p = validate(dataclasses.replace(p, extract=dataclasses.replace(p.extract, **overrides)))
        return run_extract_stage(p, captions, out, gap)

    meta = _run(step)
    typer.echo(json.dumps(meta["splits"]))


@app.command("train")
def train_command(
    name: str = typer.Argument(..., help="A run name of params.yaml's `models:` section."),
    params: Path = ParamsOption,
    shards: Path = typer.Option(Path("data/shards"), help="Folder of the extract stage."),
) -> None:
    """Train one deprojector on the shards; save the best epoch to models/NAME.

    Reads train.* (epochs, batch_size, lr, mask_weight, seed, patience, device, resume) and
    models.NAME (`type`: the architecture, and its hyperparameters). Writes
    models/NAME/config.json + model.safetensors and the per-epoch losses to
    reports/train/NAME.json (a DVC plot).
    With train.resume, an interrupted run continues from its last completed epoch.
    An ensemble (`type: ensemble`, `members: [RUN, ...]`) trains nothing: models/NAME/
    config.json names its members' folders (../RUN), which load with it; its curve is empty.
    """
    from pipeline.stages.train import run_train_stage

    _run(lambda: run_train_stage(name, _params(params), shards))


@app.command("card")
def card_command(
    name: str = typer.Argument(..., help="A run name of params.yaml's `models:` section."),
    params: Path = ParamsOption,
) -> None:
    """Copy evaluate's figures, with their intervals, into the model card models/NAME/README.md.

    Reads the card `deprojector train NAME` wrote (Hub metadata: library, base models, tags,
    license, training budget, sampling settings) and reports/metrics/NAME.json and
    reports/metrics/adherence.json; rewrites the card with a table of the figures and in its
    YAML header (`evaluation`). The card's snippet draws with the deprojector from diffusers.
    """
    from pipeline.stages.card import run_card_stage

    _run(lambda: typer.echo(f"wrote {run_card_stage(name, _params(params))}"))


@app.command("evaluate")
def evaluate_command(
    params: Path = ParamsOption,
    shards: Path = typer.Option(Path("data/shards"), help="Folder of the extract stage."),
) -> None:
    """Score every trained model on the test shards into reports/metrics/NAME.json.

    reports/headline.json, the DVC metrics, copies a handful of those numbers per run (AR
    cosine_masked and its interval, difference to retrieval, combination cosine, adherence
    ratios, all-parts rate, image/text; docs/pipeline.md, "The headline").

    Teacher-forced and autoregressive mse, weighted_mse, cosine and cosine_masked; the
    combination test (deprojected Σ(e_k − null) + null vs blended hidden states); the
    autoregressive cosine per position in reports/plots/cosine_per_position.json; and the
    null-baseline (predicting `null` everywhere) for comparison. With evaluate.adherence_prompts
    > 0: pictures of held-out prompts from the reference row and every run, judged
    (adherence, with the builtin world) and CLIP-scored, in reports/metrics/adherence.json.
    With evaluate.image_prompts > 0 and the builtin world: drawn held-out scenes used as the
    only prompt (through every bridge; the run's own, gap.bridge, is the headline) against
    their descriptions as text prompts, judged, in reports/metrics/image_prompts.json. With
    image rows in the test split (augment.image): each run's cosines on them, apart from
    the caption rows', under `image_rows` in NAME.json.
    Baselines scored alike: null-baseline and retrieval (the mean states of the k nearest
    training rows, k chosen on a validation split of the training rows). comparison.json:
    paired bootstrap differences to the best run and between every pair of runs, and the
    spread over seed replicates (runs that differ only in train.seed).
    """
    from pipeline.core.names import ADHERENCE, COMPARISON, IMAGE_PROMPTS
    from pipeline.metrics.records import AUTOREGRESSIVE, CLIP_SCORE, COSINE_MASKED
    from pipeline.stages.evaluate import run_evaluate_stage

    results = _run(lambda: run_evaluate_stage(_params(params), shards))
    pictures = results.pop(ADHERENCE, {})
    image_prompts = results.pop(IMAGE_PROMPTS, {})
    compared = results.pop(COMPARISON)["autoregressive_cosine_masked"]
    for name, metrics in results.items():
        free = metrics[AUTOREGRESSIVE]
        typer.echo(
            f"{name:>20}: autoregressive cosine_masked {free[COSINE_MASKED]:.4f}, "
            f"weighted_mse {free['weighted_mse']:.5f}"
        )
    for kind, rows in pictures.items():
        for name, s in rows.items():
            adherence = f"adherence {s[ADHERENCE]:.3f}, " if ADHERENCE in s else ""
            typer.echo(f"{kind:>6} {name:>20}: {adherence}CLIP score {s[CLIP_SCORE]:.2f}")
    within = [name for name, row in compared["rows"].items() if row["within_noise"]]
    typer.echo(
        f"best autoregressive cosine_masked: {compared['best']}; within its 95 % "
        f"interval: {', '.join(within) or 'none'}"
    )
    for name, rows in image_prompts.items():
        judged = {"text": rows["text"], **rows.get("bridges", {})}
        typer.echo(
            f"image prompts {name:>20}: adherence "
            + ", ".join(f"{key} {s[ADHERENCE]:.3f}" for key, s in judged.items() if ADHERENCE in s)
        )


@app.command("render")
def render_command(params: Path = ParamsOption) -> None:
    """Generate the comparison grids of the article and the report (`render.*`).

    Single (whole prompt deprojected) and multi (split at commas, combined as
    Σ(e_k − null) + null) grids of render.world_prompts_* (builtin world) or
    render.article_prompts_* (real base models; render.prompt_set forces one): one column per
    prompt, rows reference (ordinary CLIP states) and every run of params' `models:`, all from
    seed render.seed, each cell labelled with its adherence (the world's judge) and CLIP score.
    Writes reports/grid_single.png, reports/grid_multi.png, reports/fidelity.json,
    reports/grid_scores.json, reports/plots/cosine_per_position.png,
    reports/plots/adherence.png and reports/report.md.
    """
    from pipeline.stages.render import run_render_stage

    rendered = _run(lambda: run_render_stage(_params(params)))
    for what, models in rendered.fidelity.items():
        for name, s in models.items():
            typer.echo(
                f"{what:>6} {name:>20}: cosine {s['cosine']:.4f}, "
                f"PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.4f} (vs reference)"
            )


def _scheduler_name(value: str | None) -> str | None:
    from pipeline.config.params import SCHEDULERS

    if value is not None and value not in SCHEDULERS:
        raise typer.BadParameter(f"must be one of {', '.join(SCHEDULERS)}, got {value!r}")
    return value


@app.command(
    "encode",
    help="\n\n".join(
        [
            "Write the Stable Diffusion conditioning of PROMPT: "
            "{'prompt_embeds': [N, 77, D]} (N = 1, or one row per --t), plus "
            "'negative_prompt_embeds' of the same shape with --negative.",
            "Load it with safetensors.torch.load_file and pass the tensors to a "
            "StableDiffusionPipeline as prompt_embeds / negative_prompt_embeds. The file's "
            "metadata (safetensors.safe_open(...).metadata()) records what made it: prompt, "
            "negative, deprojector, model_type, base_clip, base_fingerprint, clip_skip and the "
            "other prompt options used.",
            PROMPT_GRAMMAR,
        ]
    ),
)
@with_prompt_options
def encode_command(
    options: PromptOptions,
    out: Path = typer.Option(
        Path("cond.safetensors"), "--out", "-o", help="Output safetensors file."
    ),
    params: Path = ParamsOption,
) -> None:
    def step():
        embeds, negative_embeds, _, metadata = conditionings(
            options, params_or_defaults(params), params.exists()
        )
        tensors = {"prompt_embeds": embeds}
        if options.negative is not None:
            tensors["negative_prompt_embeds"] = negative_embeds
        save_tensors(
            out,
            {k: v.float().contiguous().cpu() for k, v in tensors.items()},
            metadata={"format": "pt", **metadata},
        )
        typer.echo(
            f"wrote {out} (" + ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items()) + ")"
        )

    _run(step)


GENERATE_OPTIONS = (
    ("seed", "seed"),
    ("steps", "steps"),
    ("guidance", "guidance_scale"),
    ("height", "height"),
    ("width", "width"),
    ("scheduler", "scheduler"),
)


@app.command(
    "generate",
    help="\n\n".join(
        [
            "Generate an image of PROMPT with base.sd, conditioned through a deprojector; with "
            "several --t, a strip of images from PROMPT to --mix PROMPT_B.",
            "Unset options come from the render section of the params file; without one, from "
            "the sampling settings the deprojector folder records (what the pipeline drew "
            "with), else render's defaults. The negative prompt is '' unless --negative "
            "gives one. Several seeds (--seeds, or --num-images N: seeds SEED .. SEED+N-1) "
            "give a grid: one column per seed, or with several --t one row per seed.",
            PROMPT_GRAMMAR,
        ]
    ),
)
@with_prompt_options
def generate_command(
    options: PromptOptions,
    # Checked with the render section (pipeline.config.params), as params.yaml's values are.
    seed: int | None = typer.Option(None, help="Noise seed (default: render.seed)."),
    seeds: list[int] = typer.Option(
        None, "--seeds", help="A noise seed per image (repeatable); instead of --seed."
    ),
    num_images: int | None = typer.Option(
        None,
        "--num-images",
        min=1,
        help="Images from consecutive seeds SEED, SEED+1, ... (SEED: --seed or render.seed).",
    ),
    sd: str | None = typer.Option(
        None,
        "--sd",
        help="The Stable Diffusion 1.x pipeline to draw with (a diffusers folder or hub id; "
        "default: base.sd); its UNet must take the deprojector's width.",
    ),
    steps: int | None = typer.Option(None, help="Denoising steps (default: render.steps)."),
    guidance: float | None = typer.Option(
        None, help="Classifier-free guidance scale (default: render.guidance_scale)."
    ),
    height: int | None = typer.Option(
        None, help="Image height in px, a multiple of 8 (default: render.height)."
    ),
    width: int | None = typer.Option(
        None, help="Image width in px, a multiple of 8 (default: render.width)."
    ),
    scheduler: str | None = typer.Option(
        None,
        callback=_scheduler_name,
        help="pndm, ddim, euler, euler-a or dpm++ (default: render.scheduler).",
    ),
    out: Path = typer.Option(Path("out.png"), "--out", "-o", help="Output image file."),
    params: Path = ParamsOption,
) -> None:
    from pipeline.config.params import ParamsError, validate
    from pipeline.reporting.drawing import GridColumn, make_grid
    from pipeline.sampling.sd import generate_images, load_pipeline

    def step():
        p = params_or_defaults(params, None if options.no_deprojector else options.model)
        overrides = {
            "seed": seed,
            "steps": steps,
            "guidance_scale": guidance,
            "height": height,
            "width": width,
            "scheduler": scheduler,
        }
        given = {k: v for k, v in overrides.items() if v is not None}
        r = dataclasses.replace(p.render, **given)
        try:  # the same checks as params.yaml's render section
            validate(dataclasses.replace(p, render=r))
        except ParamsError as err:
            options_of = {f"render.{key}": f"--{name}" for name, key in GENERATE_OPTIONS}
            key = next((k for k in options_of if f"`{k}`" in str(err)), None)
            raise ParamsError(f"{options_of[key]}: {err}" if key else str(err)) from err
        drawn = image_seeds(r.seed, seeds or [], num_images, seed is not None)
        embeds, negative_embeds, labels, _ = conditionings(options, p, params.exists())
        pipe = load_pipeline(sd or p.base.sd, r)
        rows = len(embeds)
        images = generate_images(
            pipe,
            embeds.repeat(len(drawn), 1, 1),
            negative_embeds[:1],
            r,
            seeds=[s for s in drawn for _ in range(rows)],
        )
        if len(images) == 1:
            picture = images[0]
        else:  # columns: one per t (rows: one per seed), or one per seed
            name = options.model.name if not options.no_deprojector else "reference"
            cells = [images[k * rows : (k + 1) * rows] for k in range(len(drawn))]
            picture = make_grid(
                [
                    GridColumn(
                        label, {f"seed {s}": row[j] for s, row in zip(drawn, cells, strict=True)}
                    )
                    for j, label in enumerate(labels)
                ]
                if rows > 1
                else [
                    GridColumn(f"seed {s}", {name: row[0]})
                    for s, row in zip(drawn, cells, strict=True)
                ]
            )[0]
        save_image(picture, out)
        typer.echo(
            f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)} of "
            f"{r.width}x{r.height}, seed{'s' * (len(drawn) > 1)} "
            f"{', '.join(map(str, drawn))}, {r.steps} steps)"
        )

    _run(step)


def image_seeds(seed: int, seeds: list[int], num_images: int | None, seed_given: bool) -> list[int]:
    """The seeds `generate` draws: --seeds as given, or --num-images consecutive ones from
    `seed`, or `seed` alone."""
    if seeds and (num_images is not None or seed_given):
        raise typer.BadParameter("give --seeds, or --seed with --num-images, not both")
    if any(s < 0 for s in seeds):
        raise typer.BadParameter(f"--seeds must be 0 or more, got {min(seeds)}")
    return seeds or [seed + k for k in range(num_images or 1)]


@app.command("bench")
def bench_command(
    repeats: int = typer.Option(3, min=1, help="Repeats per measurement; medians are quoted."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    clip_l_captions: int = typer.Option(
        64,
        min=0,
        help="Captions of the CLIP-L-width extraction case (0 skips it; about a "
        "minute per repeat per 64 captions on a 2-core CPU).",
    ),
    schedulers: bool = typer.Option(
        False,
        "--schedulers",
        help="Also the reference-row adherence per scheduler, steps and "
        "guidance (pipeline.experiments.schedulers, 96 prompts: several minutes on 2 cores).",
    ),
    tiny: bool = typer.Option(
        False,
        "--tiny",
        help="Every benchmark at toy sizes (each module's TINY; overrides "
        "--repeats and --clip-l-captions): checks the code paths in about a minute, its "
        "numbers mean nothing.",
    ),
    threads: int = typer.Option(0, min=0, help="Torch CPU threads (0: torch's default)."),
) -> None:
    """Run every benchmark in this process and print ratios (medians over repeats).

    1. extraction wall time / bare CLIP text-encoder forward (target <= 1.15), with the builtin
       CLIP and with a random-weight CLIP-L text tower (D=768), whose captions per second and
       shard bytes per row are extrapolated to the article's 50,000 captions;
    2. a training epoch streamed from shards / the same steps on in-memory tensors (<= 1.10);
    3. at CLIP-L sizes (D=768, random weights), batch 16: each model's generate / the encoder
       forward (<= 0.25), and the transformer's key/value-cached vs naive generation (>= 15);
    4. at CLIP-L sizes, batch 100: each model's training step / a plain reference
       implementation of the same math (<= 1.0);
    5. peak anonymous memory (RssAnon) of a training epoch over 4N rows / over N rows (<= 1.2);
    6. the training-step profile: per architecture at the project's default size (D=128,
       batch 100), the fraction of a `train_model` step that is not the model's arithmetic
       (shard reads, loss weighting, checkpoints, loop Python), with its breakdown;
    7. with --schedulers: adherence of the builtin world per sampling setting.
    The code lives in pipeline/benchmarks/ (each module also runs alone with
    `python -m pipeline.benchmarks.NAME`); the machine must be quiet.
    """
    from pipeline.benchmarks.suite import print_suite, run_suite

    _quiet_libraries()
    results = run_suite(
        repeats=repeats,
        clip_l_captions=clip_l_captions,
        schedulers=schedulers,
        tiny=tiny,
        threads=threads,
    )
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        print_suite(results, typer.echo)


@app.command("compare")
def compare_command(
    revisions: list[str] | None = typer.Argument(
        None,
        metavar="REV_OR_EXP",
        help="Git revisions (main, HEAD~1, a tag or commit), `dvc exp` experiment names, or "
        "`workspace`. None: main against the workspace; one: it against the workspace.",
    ),
    out: Path = typer.Option(
        Path("reports/compare.md"),
        "--out",
        "-o",
        help="Markdown report; its images go into the folder beside it "
        "named after it (reports/compare/N-REV/).",
    ),
    skip_missing: bool = typer.Option(
        False,
        "--skip-missing",
        help="A revision that does not exist or has no rendered reports: say so and exit 0 "
        "without a report (for CI scripts, e.g. `compare HEAD~1` on a first commit).",
    ),
) -> None:
    """Put the grids, params and metrics of several revisions side by side in one report.

    For each revision its committed grids (reports/grid_single.png, reports/grid_multi.png)
    in one table row; then one table of the params.yaml keys that differ and one of the
    headline metrics (read from each revision's reports/metrics/), a column per revision,
    later ones with their difference to the first. Reads committed results only and retrains
    nothing; a revision without rendered reports is an error that names it. Post the report
    on a pull request with `cml comment create --pr reports/compare.md` (see README).
    """
    from pipeline.core.errors import DeprojectorError
    from pipeline.reporting.compare import MissingRevisionError, write_comparison

    try:
        report = write_comparison(revisions or [], out)
    except MissingRevisionError as err:
        if not skip_missing:
            _fail(err)
        typer.echo(f"compare skipped: {err}")
        return
    except DeprojectorError as err:
        _fail(err)
    typer.echo(f"wrote {report}")
