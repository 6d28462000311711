"""The `extract` stage: CLIP hidden states of every caption (and its augmentations) into shards.

Each row pairs an input embedding with a target hidden-state sequence (docs/architectures.md):
- plain:   e(T) → H(T)
- split:   T cut at a random word into A, B:  (e_A − null) + (e_B − null) + null → H(T)
- combine: captions A, B joined as "A B":     (e_A − null) + (e_B − null) + null → H("A B")
- image:   an image I with its caption C (paired data, pipeline/data/pairs.py):
           bridge(image_embeds(I)) @ deprojection.T → H(C)
Image rows take the place of caption rows in the training split (the steps per epoch stay
the same) and are added to the test split (its caption rows stay the same), from disjoint
pairs.

The row plan is fixed by the captions and `augment.seed` before any model runs; shard k holds
rows [k·R, (k+1)·R) and is encoded on its own, so shards can be skipped on resume or spread
over workers and still come out identical.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.base.clip_encode import encode_texts, encode_tokens, token_counts, tokenize
from pipeline.base.loaders import ClipText
from pipeline.base.vision import ImageTower
from pipeline.config.params import Params
from pipeline.core.conventions import MAX_LENGTH, combine_embeddings
from pipeline.data.pairs import Pairs, WorldPairs, open_pairs
from pipeline.data.shards import (
    shard_fingerprint,
    shard_path,
    shard_schema,
    write_shard_atomic,
)
from pipeline.prompting.bridges import GAP_FILE, ModalityGap, image_pooled
from pipeline.world.embedded import World

SPLITS = ("train", "test")
ROW_KINDS = ("plain", "split", "combine", "image")
IMAGE_PAIRS_SEED = 1000


@dataclass(frozen=True)
class Row:
    caption_id: int
    kind: str  # plain | split | combine | image
    parts: tuple[str, ...]
    target_text: str


def plan_rows(
    captions: list[str],
    split_fraction: float,
    combine_fraction: float,
    seed: int,
    count_tokens,
    pairs: Sequence[tuple[str, str]] = (),
    add_pairs: bool = False,
) -> tuple[list[Row], dict[str, int]]:
    """One row per caption; a seeded choice of which become split or combine rows; one image
    row per (pair id, caption) of `pairs`, in the place of a seeded choice of caption rows
    (or, add_pairs, after them).

    Returns the rows and the number of augmentations turned back into plain rows (a caption
    of one word cannot be split; a joined text over the token limit is skipped).
    """
    n = len(captions)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_split, n_combine = round(split_fraction * n), round(combine_fraction * n)
    kinds = np.full(n, "plain", dtype=object)
    kinds[order[:n_split]] = "split"
    kinds[order[n_split : n_split + n_combine]] = "combine"
    in_place = [] if add_pairs else sorted(order[n_split + n_combine :][: len(pairs)])
    if len(in_place) < len(pairs) and not add_pairs:
        raise ValueError(
            f"{len(pairs)} image rows do not fit among {n} rows "
            f"({n_split + n_combine} split or combine)"
        )
    pair_of_slot = {} if add_pairs else dict(zip(in_place, pairs, strict=True))
    # Draw every random number up front, in caption order, so the plan does not depend on
    # which augmentations later fall back to plain.
    cut_draws = rng.random(n)
    partners = (np.arange(n) + 1 + rng.integers(0, max(n - 1, 1), n)) % n

    rows: list[Row] = []
    skipped = {"split_single_word": 0, "combine_too_long": 0}
    combined = {
        i: f"{captions[i]} {captions[partners[i]]}"
        for i in range(n)
        if kinds[i] == "combine" and n > 1
    }
    joined_ids = list(combined)
    too_long = {
        i
        for i, c in zip(joined_ids, count_tokens([combined[i] for i in joined_ids]), strict=True)
        if c > MAX_LENGTH
    }
    for i, text in enumerate(captions):
        if i in pair_of_slot:
            pair_id, pair_caption = pair_of_slot[i]
            rows.append(Row(i, "image", (pair_id,), pair_caption))
            continue
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
    if add_pairs:
        rows += [Row(-1, "image", (pair_id,), caption) for pair_id, caption in pairs]
    return rows, skipped


def fingerprint(rows: list[Row], context: dict) -> str:
    digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode())
    for row in rows:
        digest.update(json.dumps(asdict(row)).encode())
    return digest.hexdigest()[:32]


def model_digest(clip: ClipText) -> str:
    """A hash of the tokenizer and weights: the base name alone (`builtin`) can hide a rebuild."""
    digest = hashlib.sha256(json.dumps(clip.tokenizer.get_vocab(), sort_keys=True).encode())
    return hash_weights(digest, clip.model).hexdigest()[:16]


def encode_rows(
    clip: ClipText,
    rows: list[Row],
    batch_size: int,
    storage_dtype: str,
    null: torch.Tensor,
    schema: pa.Schema,
    image_pooled: dict[str, torch.Tensor] | None = None,
) -> list[pa.RecordBatch]:
    """Encode the texts of `rows` (each distinct text once) and build the shard's columns;
    image rows take their input from image_pooled (pair id -> pooled-space embedding [D])."""
    image_pooled = image_pooled or {}
    texts = sorted(
        {t for r in rows for t in (*(() if r.kind == "image" else r.parts), r.target_text)}
    )
    index = {t: i for i, t in enumerate(texts)}
    targets = sorted({index[r.target_text] for r in rows})
    target_slot = {t: k for k, t in enumerate(targets)}
    tokens = tokenize(clip, texts)
    width = clip.hidden_size
    np_dtype = np.float16 if storage_dtype == "float16" else np.float32
    # In the model's dtype: rounded to the stored dtypes only once, when they are written.
    pooled = torch.empty(len(texts), width, dtype=clip.model.dtype)
    hidden = np.empty((len(targets), MAX_LENGTH, width), np_dtype)
    for begin in range(0, len(texts), batch_size):
        end = min(begin + batch_size, len(texts))
        out = encode_tokens(
            clip, tokens["input_ids"][begin:end], tokens["attention_mask"][begin:end]
        )
        pooled[begin:end] = out.pooled.cpu()
        for j in range(begin, end):
            if j in target_slot:
                hidden[target_slot[j]] = out.hidden[j - begin].cpu().numpy()
    mask = tokens["attention_mask"].numpy().astype(np.int8)

    embeds = np.empty((len(rows), width), np.float32)
    for r, row in enumerate(rows):
        if row.kind == "image":
            embeds[r] = image_pooled[row.parts[0]].numpy()
            continue
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
            pa.FixedSizeListArray.from_arrays(hidden_values, width), MAX_LENGTH
        ),
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


class ImageRows:
    """The image rows' inputs: paired images through the vision tower, the bridge (gap.bridge,
    statistics of the `gap` stage) and the pseudo-inverse of the text projection."""

    def __init__(
        self,
        params: Params,
        gap_dir: Path,
        deprojection: torch.Tensor,
        world: World | None,
        source: Pairs | None,
    ) -> None:
        """world: the builtin world (its scenes are the pairs), else source: the folder or
        hub pairs of gap.source (`open_image_rows` opens both)."""
        g = params.gap
        self.world, self.source = world, source
        self.tower = ImageTower.load(params.base.clip, device=params.extract.device)
        self.tower.model.to(deprojection.dtype)  # extract.compute_dtype, as the text tower
        # `none` needs no statistics; the others come from the gap stage.
        self.gap = None if g.bridge == "none" else ModalityGap.load(gap_dir).with_bridge(g.bridge)
        self.deprojection = deprojection
        self.batch_size = params.extract.batch_size
        # Folder and hub pairs: a seeded order; the test split takes the first, training the
        # next, so no pair is in both.
        self.order = (
            []
            if self.source is None
            else np.random.default_rng(params.augment.seed).permutation(len(self.source)).tolist()
        )
        vision = hash_weights(hashlib.sha256(), self.tower.model).hexdigest()[:16]
        statistics = (
            ""
            if self.gap is None
            else hashlib.sha256((gap_dir / GAP_FILE).read_bytes()).hexdigest()[:16]
        )
        self.context = {"bridge": g.bridge, "vision_digest": vision, "bridge_digest": statistics}
        self.pairs: dict[str, tuple[Pairs, int]] = {}  # pair id -> its source and index
        self.test_pairs = 0  # folder and hub pairs the test split took

    def take(self, count: int, split: str, seed: int) -> list[tuple[str, str]]:
        """(pair id, caption) of up to `count` pairs for `split` (fewer where the folder or
        hub dataset has no more)."""
        if self.world is not None:
            source, picked = WorldPairs(count, seed), list(range(count))
        else:
            source = self.source
            begin = 0 if split == "test" else min(len(self.order), self.test_pairs)
            picked = self.order[begin : begin + count]
            if split == "test":
                self.test_pairs = len(picked)
        self.pairs |= {source.ids[k]: (source, k) for k in picked}
        return [(source.ids[k], source.captions[k]) for k in picked]

    def pooled(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """Pair id -> pooled-space embedding [D] of the image rows among `rows`."""
        ids = [row.parts[0] for row in rows if row.kind == "image"]
        if not ids:
            return {}
        projected = []
        for begin in range(0, len(ids), self.batch_size):
            images = [
                self.pairs[i][0].image(self.pairs[i][1])
                for i in ids[begin : begin + self.batch_size]
            ]
            projected.append(self.tower.embed(images))
        embeds = image_pooled(torch.cat(projected), self.deprojection, self.gap)
        return dict(zip(ids, embeds, strict=True))


def open_image_rows(
    params: Params, gap_dir: Path, deprojection: torch.Tensor
) -> tuple[ImageRows | None, str | None]:
    """The image rows of augment.image > 0 and None, or None and why there are none: a real
    CLIP whose gap.source holds no pairs (an empty folder, as data/gap-pairs/ ships) gives
    caption rows only, said once, rather than stopping after the CLIP is loaded."""
    if params.augment.image <= 0:
        return None, None
    world = World.of(params.base.clip, params.base.sd)
    source = None if world else open_pairs(params.gap)
    if world is None and source is None:
        return None, (
            f"augment.image = {params.augment.image:g}, but gap.source {params.gap.source!r} "
            "holds no image/caption pairs: no image rows, caption rows only. For image rows "
            "point gap.source at a folder of NAME.png + NAME.txt pairs or a hub dataset with "
            "an image and a text column; set augment.image: 0 to say none are wanted"
        )
    return ImageRows(params, gap_dir, deprojection, world, source), None


def hash_weights(digest, model: torch.nn.Module):
    """`digest` (a hashlib object) updated with every weight's name and bytes, in name order."""
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest


def extract_split(
    clip: ClipText,
    captions: list[str],
    split_dir: Path,
    params: Params,
    split_seed: int,
    null: torch.Tensor,
    images: ImageRows | None = None,
) -> dict:
    """Write the shards of one split that belong to this worker (extract.worker_index)."""
    e, a = params.extract, params.augment
    split = split_dir.name
    wanted = round(a.image * len(captions)) if images else 0
    # World scenes of seed 1000 + 2·augment.seed (+1 for test): no other part draws those.
    pairs = (
        images.take(wanted, split, IMAGE_PAIRS_SEED + 2 * a.seed + (split == "test"))
        if wanted
        else []
    )
    rows, skipped = plan_rows(
        captions,
        a.split,
        a.combine,
        split_seed,
        lambda texts: token_counts(clip, texts),
        pairs,
        add_pairs=split == "test",
    )
    width = clip.hidden_size
    context = {
        "base": params.base.clip,
        "base_digest": model_digest(clip),
        "dtype": e.dtype,
        "compute_dtype": e.compute_dtype,
        "width": width,
        "rows_per_shard": e.rows_per_shard,
        "batch_size": e.batch_size,
    }
    if clip.clip_skip:  # absent for 0, so last-layer shards keep their fingerprints
        context["clip_skip"] = clip.clip_skip
    if pairs:
        context["image"] = images.context
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
    for k in tqdm(mine, desc=f"extract {split}", unit="shard"):
        shard_rows = rows[k * e.rows_per_shard : (k + 1) * e.rows_per_shard]
        fp = fingerprint(shard_rows, context)
        path = shard_path(split_dir, k)
        if path.exists() and shard_fingerprint(path, len(shard_rows)) == fp:
            reused += 1
            continue
        schema = shard_schema(width, e.dtype, fp, len(shard_rows))
        image_pooled = images.pooled(shard_rows) if pairs else None
        batches = encode_rows(clip, shard_rows, e.batch_size, e.dtype, null, schema, image_pooled)
        write_shard_atomic(path, schema, batches)
        written += 1
    tqdm.write(
        f"{split_dir}: {written} shards written, {reused} complete shards kept", file=sys.stderr
    )
    kinds = {k: sum(r.kind == k for r in rows) for k in ROW_KINDS}
    result = {
        "rows": len(rows),
        "shards": n_shards,
        "kinds": kinds,
        "augmentations_kept_plain": skipped,
    }
    if wanted:
        result["image_pairs"] = {
            "wanted": wanted,
            "used": len(pairs),
            "bridge": params.gap.bridge,
            "source": "world scenes" if images.world else params.gap.source,
        }
    return result
