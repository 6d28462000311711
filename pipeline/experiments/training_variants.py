"""Training variants on the default data: the `unet` loss (alone, and as a fine-tune after
the states epochs: `train.unet_epochs`), the `cross_attention` loss, and scheduled sampling
with the model's own prefixes (`train.scheduled_sampling`), against the same architecture
trained as params.yaml trains it.

Each arm is one run trained with `train_model` on data/shards (params.yaml's settings with the
arm's `train` overrides; its model from params.yaml's `models:` or the arm's own spec) in a
scratch folder, and scored on the test shards' caption rows as the evaluate stage scores it:
teacher-forced and generated (`autoregressive`) `cosine_masked` with 95 % intervals, the
difference generated minus teacher-forced, and the generated cosine paired row by row against
the arm's baseline (difference and interval); with its training time and loss history.
With `--pictures N`, each arm's pictures too: N of evaluate's held-out prompts per kind
(its prompts and noise seeds, so the reference row is evaluate's), judged as evaluate judges
them; per kind the adherence, its ratio to the reference, and the adherence paired prompt by
prompt against the arm's baseline.

    python -m pipeline.experiments.training_variants --arms queries queries-unet \\
        --out docs/records/unet_loss.json
    python -m pipeline.experiments.training_variants --arms queries-unet-3 --reuse models \
        --pictures 192 --out docs/records/unet_epochs.json
    python -m pipeline.experiments.training_variants --list

A baseline arm (no overrides) whose run params.yaml's pipeline already trained is read from
DIR/NAME with `--reuse DIR` (its training time is then not measured: null).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.base.loaders import load_clip
from pipeline.config.params import Params, load_params, parse_params
from pipeline.core.jsonio import write_json
from pipeline.core.sections import read_params_file
from pipeline.data.shards import ShardReader, read_meta
from pipeline.metrics.adherence import REFERENCE, Scorer, column, evaluate_adherence
from pipeline.metrics.intervals import paired_difference, ratio_of_sums
from pipeline.metrics.records import ADHERENCE, ALL_PARTS, COSINE_MASKED
from pipeline.metrics.scores import score_model
from pipeline.models import Deprojector
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.sd import load_pipeline
from pipeline.training.loop import train_model
from pipeline.world.embedded import World

# arm -> (a run of params.yaml's `models:` or a spec, `train:` overrides, baseline arm)
ARMS: dict[str, tuple[str | dict[str, Any], dict[str, Any], str | None]] = {
    "queries": ("queries", {}, None),
    "queries-unet-alone": ("queries", {"loss": "unet", "epochs": 2}, "queries"),
    "queries-states-unet": ("queries", {"unet_epochs": 1}, "queries"),
    "queries-unet-3": ("queries", {"unet_epochs": 3}, "queries"),
    "queries-24": ("queries", {"epochs": 24}, "queries"),
    "queries-4-layers": ({"type": "queries", "num_layers": 4}, {}, "queries"),
    "queries-16-tokens": ({"type": "queries", "num_tokens": 16}, {}, "queries"),
    "queries-1-layer": ({"type": "queries", "num_layers": 1}, {}, "queries"),
    "latent-queries": ("latent-queries", {}, "queries"),
    "latent-queries-mlp": ({"type": "latent-queries", "readout_mlp": True}, {}, "queries"),
    "vt-rollout": ("vt-rollout", {}, None),
    "vt-rollout-unet": ("vt-rollout", {"unet_epochs": 1}, "vt-rollout"),
    "vt-rollout-xattn": ("vt-rollout", {"loss": "cross_attention"}, "vt-rollout"),
    "transformer": ("transformer", {}, None),
    "transformer-ss": ("transformer", {"scheduled_sampling": 0.5}, "transformer"),
    "vicinity-batch": ("vicinity-batch", {}, None),
    "vicinity-batch-ss": ("vicinity-batch", {"scheduled_sampling": 0.5}, "vicinity-batch"),
    "vicinity-individual": ("vicinity-individual", {}, None),
    "vicinity-individual-ss": (
        "vicinity-individual",
        {"scheduled_sampling": 0.5},
        "vicinity-individual",
    ),
}
SEED = 0  # the bootstrap's


def arm_params(arm: str, params_file: Path) -> Params:
    """params.yaml with `models:` holding only the arm's run (its overrides as its `train`)."""
    model, overrides, _ = ARMS[arm]
    raw = read_params_file(params_file)
    spec = dict(raw["models"][model]) if isinstance(model, str) else dict(model)
    spec["train"] = {**spec.get("train", {}), **overrides}
    raw["models"] = {arm: spec}
    raw.setdefault("render", {})["showcase_model"] = "first"  # the other runs are not here
    return parse_params(raw)


def train_arm(
    arm: str, params_file: Path, shards: Path, reuse: Path | None
) -> tuple[Deprojector, dict]:
    """The arm's trained model and what its training took (seconds, history); a baseline arm
    of a run trained in the folder `reuse` is read from there."""
    model, overrides, _ = ARMS[arm]
    if reuse and not overrides and isinstance(model, str) and (reuse / model).is_dir():
        return Deprojector.from_pretrained(reuse / model), {
            "from": str(reuse / model),
            "train_seconds": None,
        }
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        begin = time.perf_counter()
        history = train_model(
            arm,
            arm_params(arm, params_file),
            shards_dir=shards,
            out_dir=out / "model",
            plots_dir=out / "train",
            checkpoint_dir=out / "checkpoints",
        )
        seconds = time.perf_counter() - begin
        trained = Deprojector.from_pretrained(out / "model")
    return trained, {"train_seconds": round(seconds, 1), "history": history}


def judge_pictures(
    models: dict[str, Deprojector], params: Params, prompts: int
) -> dict[str, dict[str, dict]]:
    """{arm: {kind: adherence summary with its ratio to the reference, and `vs_baseline`}} on
    `prompts` of evaluate's held-out prompts per kind (builtin base models only)."""
    e = dataclasses.replace(params.evaluate, adherence_prompts=prompts)
    params = dataclasses.replace(params, evaluate=e)
    world = World.of(params.base.clip, params.base.sd)
    clip = load_clip(params.base.clip)
    encoders = {REFERENCE: PromptEncoder(clip)} | {
        arm: PromptEncoder(clip, model) for arm, model in models.items()
    }
    single, multi = params.render.prompts(True)
    summary, per_prompt = evaluate_adherence(
        params,
        encoders,
        load_pipeline(params.base.sd, params.render),
        Scorer.load(params.base.clip, world),
        set(single) | set(multi),
    )
    out: dict[str, dict[str, dict]] = {arm: {} for arm in models}
    for kind, rows in summary.items():
        for arm in models:
            keep = (ADHERENCE, ALL_PARTS, f"{ADHERENCE}_ratio")
            record: dict[str, Any] = {
                k: v for k, v in rows[arm].items() if k.split("_ci95")[0] in keep
            }
            baseline = ARMS[arm][2]
            if baseline in models:
                record["vs_baseline"] = paired_difference(
                    np.mean,
                    [column(per_prompt[kind][arm], ADHERENCE)],
                    [column(per_prompt[kind][baseline], ADHERENCE)],
                    SEED,
                )
            out[arm][kind] = record
    return out


def run(
    arms: list[str], params_file: Path, shards: Path, reuse: Path | None, pictures: int = 0
) -> dict[str, dict]:
    """One record per arm, baselines first (each arm is paired against its baseline's rows);
    `pictures` > 0: each arm's pictures judged on that many held-out prompts per kind."""
    params = load_params(params_file)
    reader = ShardReader(shards / "test", read_meta(shards)["hidden_size"])
    rows = reader.rows_of(image=False)
    needed = [a for a in ARMS if a in arms or any(ARMS[b][2] == a for b in arms)]
    records: dict[str, dict] = {}
    terms = {}
    models = {}
    for arm in needed:
        model, trained = train_arm(arm, params_file, shards, reuse)
        models[arm] = model
        forced, free = score_model(
            model, reader, params.evaluate.batch_size, params.train.mask_weight, rows
        )
        terms[arm] = free.masked_terms()
        tf, ar = forced.result(SEED), free.result(SEED)
        record: dict[str, Any] = {
            "model": ARMS[arm][0],
            "train": ARMS[arm][1],
            **trained,
            "rows": len(rows),
            "teacher_forced": {k: tf[k] for k in (COSINE_MASKED, f"{COSINE_MASKED}_ci95")},
            "autoregressive": {k: ar[k] for k in (COSINE_MASKED, f"{COSINE_MASKED}_ci95")},
            "generated_minus_forced": paired_difference(
                ratio_of_sums, terms[arm], forced.masked_terms(), SEED
            ),
        }
        baseline = ARMS[arm][2]
        if baseline is not None:
            record["autoregressive_vs_baseline"] = {
                "baseline": baseline,
                **paired_difference(ratio_of_sums, terms[arm], terms[baseline], SEED),
            }
        records[arm] = record
        print(json.dumps({arm: record["autoregressive"], "train_seconds": record["train_seconds"]}))
    if pictures:
        for arm, judged in judge_pictures(models, params, pictures).items():
            records[arm]["pictures"] = judged
            print(json.dumps({arm: judged}))
    return {arm: records[arm] for arm in needed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=[])
    parser.add_argument("--list", action="store_true", help="print the arms and exit")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--shards", type=Path, default=Path("data/shards"))
    parser.add_argument(
        "--reuse",
        type=Path,
        metavar="DIR",
        help="read baseline arms trained by the pipeline from DIR/NAME (e.g. models)",
    )
    parser.add_argument(
        "--pictures",
        type=int,
        default=0,
        metavar="N",
        help="also judge each arm's pictures on N held-out prompts per kind (evaluate's)",
    )
    parser.add_argument("--out", type=Path, help="write the records here (JSON)")
    args = parser.parse_args(argv)
    if args.list or not args.arms:
        for arm, (model, overrides, baseline) in ARMS.items():
            print(f"{arm}: {model} train {overrides or '{}'} vs {baseline}")
        return
    records = run(args.arms, args.params, args.shards, args.reuse, args.pictures)
    if args.out:
        words = sys.argv[1:] if argv is None else argv
        command = " ".join(["python -m pipeline.experiments.training_variants", *words])
        write_json(args.out, {"command": command, "arms": records})


if __name__ == "__main__":
    main()
