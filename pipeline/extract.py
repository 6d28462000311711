"""The `extract` stage: CLIP hidden states of every caption (and its augmentations) into shards.

Each row pairs an input embedding with a target hidden-state sequence (docs/architectures.md):
- plain:   e(T) → H(T)
- split:   T cut at a random word into A, B:  (e_A − null) + (e_B − null) + null → H(T)
- combine: captions A, B joined as "A B":     (e_A − null) + (e_B − null) + null → H("A B")

The row plan is fixed by the captions and `augment.seed` before any model runs; shard k holds
rows [k·R, (k+1)·R) and is encoded on its own, so shards can be skipped on resume or spread
over workers and still come out identical.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.base_models import ClipText, load_clip
from pipeline.captions import read_split
from pipeline.clip_encode import encode_texts, encode_tokens, token_counts, tokenize
from pipeline.conventions import MAX_LENGTH, combine_embeddings
from pipeline.params import Params
from pipeline.shards import (
    save_constants,
    shard_fingerprint,
    shard_path,
    shard_schema,
    write_shard_atomic,
)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Row:
    caption_id: int
    kind: str  # plain | split | combine
    parts: tuple[str, ...]
    target_text: str


def plan_rows(captions: list[str], split_fraction: float, combine_fraction: float, seed: int,
              count_tokens) -> tuple[list[Row], dict[str, int]]:
    """One row per caption; a seeded choice of which become split or combine rows.

    Returns the rows and the number of augmentations turned back into plain rows (a caption
    of one word cannot be split; a joined text over the token limit is skipped).
    """
    n = len(captions)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_split, n_combine = round(split_fraction * n), round(combine_fraction * n)
    kinds = np.full(n, "plain", dtype=object)
    kinds[order[:n_split]] = "split"
    kinds[order[n_split:n_split + n_combine]] = "combine"
    # Draw every random number up front, in caption order, so the plan does not depend on
    # which augmentations later fall back to plain.
    cut_draws = rng.random(n)
    partners = (np.arange(n) + 1 + rng.integers(0, max(n - 1, 1), n)) % n

    rows: list[Row] = []
    skipped = {"split_single_word": 0, "combine_too_long": 0}
    combined = {i: f"{captions[i]} {captions[partners[i]]}" for i in range(n)
                if kinds[i] == "combine" and n > 1}
    joined_ids = list(combined)
    too_long = {i for i, c in zip(joined_ids, count_tokens([combined[i] for i in joined_ids]),
                                  strict=True) if c > MAX_LENGTH}
    for i, text in enumerate(captions):
        kind = kinds[i]
        words = text.split(" ")
        if kind == "split" and len(words) < 2:
            skipped["split_single_word"] += 1
            kind = "plain"
        if kind == "combine" and (i not in combined or i in too_long):
            skipped["combine_too_long"] += 1
            kind = "plain"
        if kind == "split":
            cut = 1 + int(cut_draws[i] * (len(words) - 1))
            parts = (" ".join(words[:cut]), " ".join(words[cut:]))
            rows.append(Row(i, "split", parts, text))
        elif kind == "combine":
            rows.append(Row(i, "combine", (text, captions[partners[i]]), combined[i]))
        else:
            rows.append(Row(i, "plain", (text,), text))
    return rows, skipped


def fingerprint(rows: list[Row], context: dict) -> str:
    digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode())
    for row in rows:
        digest.update(json.dumps(asdict(row)).encode())
    return digest.hexdigest()[:32]


def model_digest(clip: ClipText) -> str:
    """A hash of the tokenizer and weights: the base name alone (`builtin`) can hide a rebuild."""
    digest = hashlib.sha256(json.dumps(clip.tokenizer.get_vocab(), sort_keys=True).encode())
    for name, tensor in sorted(clip.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encode_rows(clip: ClipText, rows: list[Row], batch_size: int, storage_dtype: str,
                null: torch.Tensor, schema: pa.Schema) -> list[pa.RecordBatch]:
    """Encode the texts of `rows` (each distinct text once) and build the shard's columns."""
    texts = sorted({t for r in rows for t in (*r.parts, r.target_text)})
    index = {t: i for i, t in enumerate(texts)}
    targets = sorted({index[r.target_text] for r in rows})
    target_slot = {t: k for k, t in enumerate(targets)}
    tokens = tokenize(clip, texts)
    width = clip.hidden_size
    np_dtype = np.float16 if storage_dtype == "float16" else np.float32
    pooled = torch.empty(len(texts), width)
    hidden = np.empty((len(targets), MAX_LENGTH, width), np_dtype)
    for begin in range(0, len(texts), batch_size):
        end = min(begin + batch_size, len(texts))
        out = encode_tokens(clip, tokens["input_ids"][begin:end],
                            tokens["attention_mask"][begin:end])
        pooled[begin:end] = out.pooled.float().cpu()
        for j in range(begin, end):
            if j in target_slot:
                hidden[target_slot[j]] = out.hidden[j - begin].float().cpu().numpy()
    mask = tokens["attention_mask"].numpy().astype(np.int8)

    embeds = np.empty((len(rows), width), np.float32)
    for r, row in enumerate(rows):
        parts = torch.stack([pooled[index[p]] for p in row.parts])
        embeds[r] = combine_embeddings(parts, null).numpy()
    target_rows = np.array([target_slot[index[r.target_text]] for r in rows])
    target_texts = np.array([index[r.target_text] for r in rows])
    value_type = schema.field("hidden").type.value_type.value_type
    hidden_values = pa.array(hidden[target_rows].reshape(-1), type=value_type)
    columns = [
        pa.array([r.caption_id for r in rows], pa.int64()),
        pa.array([r.kind for r in rows], pa.string()),
        pa.array([list(r.parts) for r in rows], pa.list_(pa.string())),
        pa.array([r.target_text for r in rows], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(embeds.reshape(-1)), width),
        pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(hidden_values, width), MAX_LENGTH),
        pa.FixedSizeListArray.from_arrays(pa.array(mask[target_texts].reshape(-1)), MAX_LENGTH),
        pa.array(mask[target_texts].sum(axis=1), pa.int32()),
    ]
    return [pa.RecordBatch.from_arrays(columns, schema=schema)]


def compute_constants(clip: ClipText) -> dict[str, torch.Tensor]:
    """sos = H("")[0], null = pooled(""), deprojection = pinv(text_projection) [D × P]."""
    empty = encode_texts(clip, [""])
    weight = clip.model.text_projection.weight.detach().double().cpu()  # [P, D]
    return {
        "sos": empty.hidden[0, 0].float().cpu(),
        "null": empty.pooled[0].float().cpu(),
        "deprojection": torch.linalg.pinv(weight).float(),
    }


def extract_split(clip: ClipText, captions: list[str], split_dir: Path, params: Params,
                  split_seed: int, null: torch.Tensor) -> dict:
    """Write the shards of one split that belong to this worker (extract.worker_index)."""
    e, a = params.extract, params.augment
    rows, skipped = plan_rows(
        captions, a.split, a.combine, split_seed,
        lambda texts: token_counts(clip, texts),
    )
    width = clip.hidden_size
    context = {"base": params.base.clip, "base_digest": model_digest(clip), "dtype": e.dtype,
               "width": width, "rows_per_shard": e.rows_per_shard, "batch_size": e.batch_size}
    split_dir.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(rows) // e.rows_per_shard)
    # Shards beyond the plan (from a larger earlier run) would be read as data: remove them.
    for stale in split_dir.glob("shard-*.arrow"):
        if int(stale.stem.split("-")[1]) >= n_shards:
            stale.unlink()
    # Worker I of N takes shards I, I + N, ...: together they write exactly the single-worker
    # layout, so N machines can extract into one folder with no merge step.
    mine = [k for k in range(n_shards) if k % e.num_workers == e.worker_index]
    # A killed run leaves the temporary file of the shard it was writing (atomic_path names it
    # .shard-NNNNN.arrow.tmp-PID); only this worker writes its shards, so those are stale.
    for k in mine:
        for leftover in split_dir.glob(f".{shard_path(split_dir, k).name}.tmp-*"):
            leftover.unlink(missing_ok=True)
    written = reused = 0
    for k in tqdm(mine, desc=f"extract {split_dir.name}", unit="shard"):
        shard_rows = rows[k * e.rows_per_shard:(k + 1) * e.rows_per_shard]
        fp = fingerprint(shard_rows, context)
        path = shard_path(split_dir, k)
        if path.exists() and shard_fingerprint(path, len(shard_rows)) == fp:
            reused += 1
            continue
        schema = shard_schema(width, e.dtype, fp, len(shard_rows))
        batches = encode_rows(clip, shard_rows, e.batch_size, e.dtype, null, schema)
        write_shard_atomic(path, schema, batches)
        written += 1
    tqdm.write(f"{split_dir}: {written} shards written, {reused} complete shards kept",
               file=sys.stderr)
    kinds = {k: sum(r.kind == k for r in rows) for k in ("plain", "split", "combine")}
    return {"rows": len(rows), "shards": n_shards, "kinds": kinds,
            "augmentations_kept_plain": skipped}


def run_extract_stage(params: Params, captions_dir: Path = Path("data/captions"),
                      out_dir: Path = Path("data/shards")) -> dict:
    torch.manual_seed(0)
    clip = load_clip(params.base.clip, device=params.extract.device)
    constants = compute_constants(clip)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_constants(out_dir / "constants.safetensors", **constants)
    meta = {
        "base_clip": params.base.clip,
        "base_sd": params.base.sd,
        "hidden_size": clip.hidden_size,
        "projection_size": clip.projection_size,
        "dtype": params.extract.dtype,
        "rows_per_shard": params.extract.rows_per_shard,
        "splits": {},
    }
    for offset, split in enumerate(SPLITS):
        captions = read_split(captions_dir, split)
        meta["splits"][split] = extract_split(
            clip, captions, out_dir / split, params, params.augment.seed + offset,
            constants["null"])
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
