"""Where a training step's time goes: the model's own arithmetic vs everything around it.

`pipeline.training.loop.train_model` itself runs (Accelerate, tqdm, per-epoch test loss and
checkpoint, all as in the `train` stage) on shards of the builtin world CLIP (D = 128) with
params.yaml's `train:` settings (batch 100, Adam) and each architecture's params.yaml
hyperparameters, while perf_counter segments are taken around its phases by its `hooks`
(`pipeline.training.loop.TrainHooks`, which do nothing in the `train` stage):

- read: `ShardReader.iter_batches` producing a batch (gather from the memory-mapped shards,
  float16 -> float32, batch assembly); `read_gather` / `read_convert` split it by timing a
  plain gather of the same rows in the storage dtype;
- forward: the deprojector's forward pass;
- loss: `weighted_mse` (position weights, squared error) and its backward, which ends when
  the gradient reaches the prediction (a tensor hook on it);
- backward: the rest of `accelerator.backward`, through the model;
- optimizer: Adam's step; zero_grad: the gradient reset;
- checkpoint: the per-epoch checkpoint write (torch.save + fsync + rename);
- other: the rest of the loop (tqdm, `.to(device)`, loss accumulation, best-state copy).

Model arithmetic = forward + backward + optimizer; `overhead_fraction` = the rest / the step.
The per-epoch test-loss pass is evaluation, not training: reported beside the step, not in it.

    python -m pipeline.benchmarks.step_profile [--captions 3000] [--epochs 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.base.loaders import load_clip
from pipeline.config.params import load_params, parse_params
from pipeline.data.extraction import compute_constants, extract_split
from pipeline.data.shards import ShardReader, save_constants
from pipeline.models import ARCHITECTURES
from pipeline.training.loop import TrainHooks, train_model
from pipeline.world.scenes import generate_captions

ARITHMETIC = ("forward", "backward", "optimizer")
OVERHEAD = ("read", "loss", "zero_grad", "checkpoint", "other")


def build_shards(
    work: Path, train_captions: int, test_captions: int, base: str = "builtin"
) -> Path:
    """A `data/shards`-shaped folder (train, test, constants, meta.json) of builtin captions,
    as the extract stage writes it with params.yaml's extract settings."""

    out = work / "shards"
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # tqdm; keep stdout for --json
        clip = load_clip(base)
        params = parse_params({"base": {"clip": base, "sd": base}})  # sd unused here
        constants = compute_constants(clip)
        save_constants(out / "constants.safetensors", **constants)
        pool = list(dict.fromkeys(generate_captions((train_captions + test_captions) * 2, seed=0)))
        splits = {
            "train": pool[:train_captions],
            "test": pool[train_captions : train_captions + test_captions],
        }
        meta = {
            "base_clip": base,
            "base_sd": base,
            "hidden_size": clip.hidden_size,
            "projection_size": clip.projection_size,
            "dtype": params.extract.dtype,
            "rows_per_shard": params.extract.rows_per_shard,
            "splits": {},
        }
        for offset, (split, texts) in enumerate(splits.items()):
            meta["splits"][split] = extract_split(
                clip, texts, out / split, params, params.augment.seed + offset, constants["null"]
            )
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def profile_models(params_path: Path = Path("params.yaml")) -> dict[str, dict]:
    """Every registered architecture once: the hyperparameters of the first params.yaml run of
    that type trained teacher-forced (train.rollout 0), else the architecture's defaults."""

    specs = load_params(params_path).models if params_path.exists() else {}
    chosen: dict[str, dict] = {}
    for spec in specs.values():
        if spec.type not in chosen and not spec.train.get("rollout", 0):
            chosen[spec.type] = dict(spec.hparams)
    return {name: chosen.get(name, {}) for name in ARCHITECTURES}


class _Clock(TrainHooks):
    """train_model's hooks: seconds per phase and steps. The per-epoch test-loss pass is its
    own phase (`evaluate`), so its reads, forwards and losses are not the training step's."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.start: float | None = None  # the first batch read
        self.end = 0.0  # the last checkpoint written
        self.grad_at_pred: float | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        if self.start is None and name == "read":
            self.start = begin
        try:
            yield
        finally:
            end = time.perf_counter()
            if name == "backward":
                # The loss's own backward ends where the gradient reaches the prediction.
                reached = self.grad_at_pred if self.grad_at_pred is not None else begin
                self.grad_at_pred = None
                self.seconds["loss"] += reached - begin
                self.seconds["backward"] += end - reached
            else:
                self.seconds[name] += end - begin
            if name == "optimizer":
                self.steps += 1
            elif name == "checkpoint":
                self.end = end

    def model_built(self, model: torch.nn.Module) -> None:
        def reached(grad: torch.Tensor) -> None:
            self.grad_at_pred = time.perf_counter()

        def post(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
            if module.training and output.requires_grad:
                output.register_hook(reached)

        model.register_forward_hook(post)


def read_split(shards_dir: Path, batch_size: int, seed: int = 0, repeats: int = 3) -> dict:
    """An epoch of batches read as training reads them, vs the same rows gathered in the
    storage dtype alone (no float32 copy): seconds per batch, medians over repeats."""

    reader = ShardReader(shards_dir / "train")
    full, gather = [], []
    order = np.random.default_rng([seed, 0]).permutation(len(reader))
    for _ in range(repeats):
        begin = time.perf_counter()
        for _batch in reader.iter_batches(batch_size, shuffle=True, seed=seed, epoch=0):
            pass
        full.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        for start in range(0, len(reader), batch_size):
            rows = order[start : start + batch_size]
            chunk = np.searchsorted(reader._starts, rows, side="right") - 1
            offset = rows - reader._starts[chunk]
            for c in np.unique(chunk):
                picked = chunk == c
                reader._hidden[c][offset[picked]], reader._embeds[c][offset[picked]]
                reader._mask[c][offset[picked]]
        gather.append(time.perf_counter() - begin)
    steps = -(-len(reader) // batch_size)
    return {
        "read_s_per_step": statistics.median(full) / steps,
        "gather_s_per_step": statistics.median(gather) / steps,
    }


def profile_one(
    name: str, hparams: dict, shards_dir: Path, work: Path, epochs: int, batch_size: int
) -> dict:

    base = load_params() if Path("params.yaml").exists() else parse_params({})
    train = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": base.train.lr,
        "mask_weight": base.train.mask_weight,
        "seed": base.train.seed,
        "patience": 0,
        "resume": False,
        "device": "cpu",
        "precision": "fp32",
        "rollout": 0,
    }
    params = parse_params(
        {
            "base": {"clip": "builtin", "sd": "builtin"},
            "train": train,
            "models": {name: {"type": name, **hparams}},
        }
    )
    clock = _Clock()
    with contextlib.redirect_stdout(sys.stderr):
        train_model(
            name,
            params,
            shards_dir=shards_dir,
            out_dir=work / "models" / name,
            plots_dir=work / "reports",
            checkpoint_dir=work / "checkpoints",
            hooks=clock,
        )
    s = clock.seconds
    evaluate = s.pop("evaluate", 0.0)
    total = clock.end - clock.start - evaluate  # first batch read .. last checkpoint written
    s["other"] = total - sum(s.values())
    steps = clock.steps
    per_step = {k: s.get(k, 0.0) / steps for k in (*ARITHMETIC, *OVERHEAD)}
    step_s = total / steps
    return {
        "hparams": hparams,
        "steps": steps,
        "epochs": epochs,
        "step_s": step_s,
        "seconds_per_step": per_step,
        "fractions": {k: v / step_s for k, v in per_step.items()},
        "arithmetic_fraction": sum(per_step[k] for k in ARITHMETIC) / step_s,
        "overhead_fraction": sum(per_step[k] for k in OVERHEAD) / step_s,
        "evaluate_s_per_epoch": evaluate / epochs,
    }


def run(
    captions: int = 3000,
    test_captions: int = 200,
    epochs: int = 2,
    batch_size: int = 100,
    models: list[str] | None = None,
    shards_dir: Path | None = None,
) -> dict:
    """Profile every architecture (or `models`) over freshly extracted shards (or
    `shards_dir`, a data/shards-shaped folder of the builtin CLIP)."""
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    start = time.perf_counter()
    try:
        shards_dir = shards_dir or build_shards(work, captions, test_captions)
        data_s = time.perf_counter() - start
        chosen = profile_models()
        if models is not None:
            chosen = {name: chosen[name] for name in models}
        result = {
            name: profile_one(name, hparams, shards_dir, work, epochs, batch_size)
            for name, hparams in chosen.items()
        }
        reads = read_split(shards_dir, batch_size)
        meta = json.loads((shards_dir / "meta.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for entry in result.values():
        read = entry["seconds_per_step"]["read"]
        # The read phase split by the separately timed share of a plain gather.
        share = min(1.0, reads["gather_s_per_step"] / reads["read_s_per_step"])
        entry["fractions"]["read_gather"] = share * read / entry["step_s"]
        entry["fractions"]["read_convert"] = (1 - share) * read / entry["step_s"]
    return {
        "batch_size": batch_size,
        "epochs": epochs,
        "hidden_size": meta["hidden_size"],
        "rows": meta["splits"]["train"]["rows"],
        "threads": torch.get_num_threads(),
        "read": reads,
        "models": result,
        "data_build_s": data_s,
        "wall_s": time.perf_counter() - start,
    }


# Toy sizes: the code path of the real run in seconds, not its figures.
TINY = {"captions": 40, "test_captions": 8, "epochs": 1, "batch_size": 16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--captions", type=int, default=3000, help="training captions (params.yaml: 3000)"
    )
    parser.add_argument("--test-captions", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, help="train.batch_size")
    parser.add_argument("--models", nargs="*", help="architectures (default: all)")
    parser.add_argument(
        "--tiny", action="store_true", help=f"smoke-test sizes ({TINY}); overrides the sizes above"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (
        TINY
        if args.tiny
        else {
            "captions": args.captions,
            "test_captions": args.test_captions,
            "epochs": args.epochs,
            "batch_size": args.batch,
        }
    )
    result = run(**sizes, models=args.models)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print_report(result)


def print_report(result: dict) -> None:
    """The text report of `run`'s result."""
    print(
        f"D={result['hidden_size']}, batch {result['batch_size']}, {result['rows']} rows, "
        f"{result['epochs']} epochs, {result['threads']} threads; fractions of a step:"
    )
    keys = (*ARITHMETIC, *OVERHEAD)
    print(f"{'model':<21}{'step ms':>8} {'overhead':>9} " + " ".join(f"{k:>10}" for k in keys))
    for name, entry in result["models"].items():
        f = entry["fractions"]
        print(
            f"{name:<21}{entry['step_s'] * 1e3:8.1f} {entry['overhead_fraction']:9.1%} "
            + " ".join(f"{f[k]:10.1%}" for k in keys)
        )


if __name__ == "__main__":
    main()
