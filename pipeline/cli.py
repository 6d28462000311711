"""`deprojector` command line: one command per DVC stage, plus tools for users."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import typer

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
    from pipeline.params import load_params

    return load_params(path)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _expected_errors() -> tuple[type[Exception], ...]:
    from pipeline.base_models import BaseModelError
    from pipeline.captions import CaptionSourceError
    from pipeline.params import ParamsError
    from pipeline.shards import ShardError

    return (ParamsError, CaptionSourceError, BaseModelError, ShardError, FileNotFoundError)


def _run(step):
    """Run a stage; known failure classes print one clear line instead of a traceback."""
    _quiet_libraries()
    try:
        return step()
    except _expected_errors() as err:
        _fail(err)


@app.command("base")
def base_command(
    params: Path = ParamsOption,
    out: Path = typer.Option(Path("models/base"), help="Folder for the builtin base models."),
) -> None:
    """Build the embedded default base models (`base.clip/sd: builtin`) or check the named ones.

    builtin: writes OUT/clip (CLIP tokenizer + text model with projection) and OUT/sd (a small
    Stable Diffusion pipeline), offline and deterministically from `base.seed`. A hub id or a
    local folder is loaded once to fail early, and OUT/base.json records what was named.
    """
    from pipeline.base_models import BUILTIN, build_builtin, load_clip, load_sd_pipeline

    def step():
        p = _params(params).base
        out.mkdir(parents=True, exist_ok=True)
        if p.clip == BUILTIN or p.sd == BUILTIN:
            build_builtin(out, p.seed)
        if p.clip != BUILTIN:
            load_clip(p.clip, base_dir=out)
        if p.sd != BUILTIN:
            load_sd_pipeline(p.sd, base_dir=out)
        (out / "base.json").write_text(json.dumps({"clip": p.clip, "sd": p.sd}, indent=2) + "\n")
        typer.echo(f"base models ready in {out} (clip: {p.clip}, sd: {p.sd})")

    _run(step)


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
    from pipeline.captions import run_captions_stage

    stats = _run(lambda: run_captions_stage(_params(params), out))
    typer.echo(json.dumps(stats))


@app.command("extract")
def extract_command(
    params: Path = ParamsOption,
    captions: Path = typer.Option(Path("data/captions"), help="Folder of the captions stage."),
    out: Path = typer.Option(Path("data/shards"), help="Output folder of the shards."),
    num_workers: int = typer.Option(None, help="Split the shards over N workers (machines or "
                                    "GPUs); overrides extract.num_workers."),
    worker_index: int = typer.Option(None, help="Which worker this is, 0..N-1; overrides "
                                     "extract.worker_index."),
) -> None:
    """Run the CLIP text model over the captions and their augmentations into Arrow shards.

    Writes OUT/<split>/shard-NNNNN.arrow (memory-mappable Arrow IPC stream files),
    OUT/constants.safetensors (sos, null, deprojection) and OUT/meta.json. Complete shards of
    an interrupted run with the same params are kept; the rest are rewritten.

    Parallel extraction: worker I of N writes shards I, I+N, ... into the same OUT (a shared
    folder), e.g. `deprojector extract --num-workers 2 --worker-index 0` on one GPU and
    `--worker-index 1` on another; together they give exactly the single-worker shards.
    """
    from pipeline.extract import run_extract_stage
    from pipeline.params import validate

    def step():
        p = _params(params)
        overrides = {k: v for k, v in (("num_workers", num_workers),
                                        ("worker_index", worker_index)) if v is not None}
        p = validate(dataclasses.replace(p, extract=dataclasses.replace(p.extract, **overrides)))
        return run_extract_stage(p, captions, out)

    meta = _run(step)
    typer.echo(json.dumps(meta["splits"]))


@app.command("train")
def train_command(
    name: str = typer.Argument(..., help="transformer, vicinity-batch or vicinity-individual."),
    params: Path = ParamsOption,
    shards: Path = typer.Option(Path("data/shards"), help="Folder of the extract stage."),
) -> None:
    """Train one deprojector on the shards; save the best epoch to models/NAME.

    Reads train.* (epochs, batch_size, lr, mask_weight, seed, patience, device, resume) and
    models.NAME.* (the model's hyperparameters). Writes models/NAME/config.json +
    model.safetensors and the per-epoch losses to reports/train/NAME.json (a DVC plot).
    With train.resume, an interrupted run continues from its last completed epoch.
    """
    from pipeline.params import MODEL_NAMES
    from pipeline.train import train_model

    if name not in MODEL_NAMES:
        _fail(ValueError(f"unknown model {name!r} (known: {', '.join(MODEL_NAMES)})"))
    _run(lambda: train_model(name, _params(params), shards))


@app.command("evaluate")
def evaluate_command(
    params: Path = ParamsOption,
    shards: Path = typer.Option(Path("data/shards"), help="Folder of the extract stage."),
) -> None:
    """Score every trained model on the test shards into reports/metrics/NAME.json.

    Teacher-forced and autoregressive mse, weighted_mse, cosine and cosine_masked; the
    combination test (deprojected Σ(e_k − null) + null vs blended hidden states); the
    autoregressive cosine per position in reports/plots/cosine_per_position.json; and the
    null-baseline (predicting `null` everywhere) for comparison.
    """
    from pipeline.evaluate import run_evaluate_stage

    results = _run(lambda: run_evaluate_stage(_params(params), shards))
    for name, metrics in results.items():
        free = metrics["autoregressive"]
        typer.echo(f"{name:>20}: autoregressive cosine_masked {free['cosine_masked']:.4f}, "
                   f"weighted_mse {free['weighted_mse']:.5f}")
