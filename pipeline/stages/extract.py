"""The `extract` stage: CLIP hidden states of the captions and their augmentations in Arrow
shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.base.loaders import load_clip
from pipeline.config.params import Params
from pipeline.core.atomic import write_text
from pipeline.data.captions import read_split
from pipeline.data.extraction import SPLITS, compute_constants, extract_split, open_image_rows
from pipeline.data.shards import (
    save_constants,
)


def run_extract_stage(
    params: Params,
    captions_dir: Path = Path("data/captions"),
    out_dir: Path = Path("data/shards"),
    gap_dir: Path = Path("data/gap"),
) -> dict:
    torch.manual_seed(0)
    compute_dtype = getattr(torch, params.extract.compute_dtype)
    clip = load_clip(
        params.base.clip, device=params.extract.device, clip_skip=params.extract.clip_skip
    )
    clip.model.to(compute_dtype)
    constants = compute_constants(clip)
    images, no_images = open_image_rows(
        params, gap_dir, constants["deprojection"].to(compute_dtype)
    )
    if no_images:
        tqdm.write(f"warning: {no_images}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_constants(out_dir / "constants.safetensors", **constants)
    meta = {
        "base_clip": params.base.clip,
        "base_sd": params.base.sd,
        "hidden_size": clip.hidden_size,
        "projection_size": clip.projection_size,
        "clip_skip": params.extract.clip_skip,
        "dtype": params.extract.dtype,
        "compute_dtype": params.extract.compute_dtype,
        "rows_per_shard": params.extract.rows_per_shard,
    }
    if no_images:
        meta["no_image_rows"] = no_images
    splits = {}
    # Test first: with folder or hub pairs it takes its pairs before training does.
    for split in ("test", "train"):
        captions = read_split(captions_dir, split)
        splits[split] = extract_split(
            clip,
            captions,
            out_dir / split,
            params,
            params.augment.seed + SPLITS.index(split),
            constants["null"],
            images,
        )
    meta["splits"] = {split: splits[split] for split in SPLITS}
    write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta
