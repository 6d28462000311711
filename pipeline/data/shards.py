"""Arrow IPC shards of CLIP hidden states: schema, atomic writing, memory-mapped reading.

Shards use the Arrow IPC *stream* format, the one `datasets.Dataset.from_file` memory-maps,
so both `datasets` and plain pyarrow open them without loading a split into RAM.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.core.atomic import atomic_path, save_tensors
from pipeline.core.conventions import CONSTANT_NAMES, MAX_LENGTH
from pipeline.core.errors import DeprojectorError, read_json, read_safetensors


class ShardError(DeprojectorError, RuntimeError):
    """A shard or constants file is missing, corrupt or from another base model."""


def shard_schema(hidden_size: int, storage_dtype: str, fingerprint: str, rows: int) -> pa.Schema:
    value = pa.float16() if storage_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("caption_id", pa.int64()),
            ("kind", pa.string()),
            ("parts", pa.list_(pa.string())),
            ("target_text", pa.string()),
            ("embeds", pa.list_(pa.float32(), hidden_size)),
            ("hidden", pa.list_(pa.list_(value, hidden_size), MAX_LENGTH)),
            ("mask", pa.list_(pa.int8(), MAX_LENGTH)),
            ("n_tokens", pa.int32()),
        ],
        # The fingerprint ties a shard to the rows and base model that made it, so a rerun
        # after a params change never keeps a stale shard. The schema comes first in the
        # stream, so a file cut after it (or after any batch) still reads as a shorter shard:
        # the row count it promises tells a complete shard from a cut one.
        metadata={"fingerprint": fingerprint, "rows": str(rows)},
    )


def shard_path(split_dir: Path, index: int) -> Path:
    return split_dir / f"shard-{index:05d}.arrow"


def write_shard_atomic(path: Path, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    """Write to a temporary name, fsync, then rename: no half-written shard is ever visible."""
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
    ):
        for batch in batches:
            writer.write_batch(batch)


def open_shard(path: Path) -> pa.Table:
    """Memory-map one shard; a truncated or corrupt file raises ShardError naming it.

    A shard holds exactly the rows its metadata promises; a file cut at a batch boundary (or
    right after its schema) reads as a valid but shorter stream, and is refused here too."""
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise ShardError(
            f"{path}: not a readable Arrow shard ({err}); delete it and rerun "
            f"`deprojector extract` to rebuild it"
        ) from err
    promised = (table.schema.metadata or {}).get(b"rows")
    if promised is not None and int(promised) != table.num_rows:
        raise ShardError(
            f"{path}: incomplete shard: {table.num_rows} rows, its metadata "
            f"promises {int(promised)} (the file was cut short); rerun "
            f"`deprojector extract` to rebuild it"
        )
    return table


def shard_fingerprint(path: Path, rows: int | None = None) -> str | None:
    """The fingerprint of a complete, readable shard (of `rows` rows, where given); None
    where it is unreadable, cut short or holds another number of rows."""
    try:
        table = open_shard(path)
    except ShardError:
        return None
    meta = table.schema.metadata or {}
    if b"rows" not in meta or (rows is not None and table.num_rows != rows):
        return None
    return meta.get(b"fingerprint", b"").decode() or None


# --- constants ------------------------------------------------------------------------------


def save_constants(
    path: Path, sos: torch.Tensor, null: torch.Tensor, deprojection: torch.Tensor
) -> None:
    tensors = {"sos": sos, "null": null, "deprojection": deprojection}
    save_tensors(path, {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()})


def load_constants(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ShardError(f"{path}: constants file missing; run the `extract` stage first")
    constants = read_safetensors(path, ShardError, "rerun `deprojector extract` to rewrite it")
    missing = [name for name in CONSTANT_NAMES if name not in constants]
    if missing:
        raise ShardError(f"{path}: missing tensors {missing} (expected {list(CONSTANT_NAMES)})")
    widths = {name: tuple(constants[name].shape) for name in CONSTANT_NAMES}
    d = widths["sos"][0] if len(widths["sos"]) == 1 else None
    if (
        d is None
        or widths["null"] != (d,)
        or len(widths["deprojection"]) != 2
        or widths["deprojection"][0] != d
    ):
        raise ShardError(
            f"{path}: tensors of shapes {widths}, expected sos [D], null [D] and "
            f"deprojection [D, P]; rerun `deprojector extract` to rewrite it"
        )
    return constants


# --- reading --------------------------------------------------------------------------------


@dataclass
class Batch:
    embeds: torch.Tensor  # [B, D] float32
    hidden: torch.Tensor  # [B, 77, D] float32
    mask: torch.Tensor  # [B, 77] float32 (1 = real token or EOS)


class ShardReader:
    """Random access to one split's rows over memory-mapped shards.

    Only the rows of a requested batch are copied out of the mapping, so resident memory
    stays flat however many rows the split has.
    """

    def __init__(self, split_dir: Path, hidden_size: int | None = None):
        self.split_dir = Path(split_dir)
        paths = sorted(self.split_dir.glob("shard-*.arrow"))
        if not paths:
            if (self.split_dir.parent / "meta.json").is_file():  # extracted, with no rows
                raise ShardError(
                    f"{self.split_dir}: no rows in this split (extract found no "
                    f"captions for it); every split needs at least one: check "
                    f"the captions stage's {self.split_dir.name}.parquet"
                )
            raise ShardError(f"{self.split_dir}: no shards; run the `extract` stage first")
        self._embeds: list[np.ndarray] = []
        self._hidden: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self.tables: list[pa.Table] = []
        for path in paths:
            table = open_shard(path)
            width = table.schema.field("embeds").type.list_size
            if hidden_size is not None and width != hidden_size:
                raise ShardError(
                    f"{path}: embeddings of width {width}, expected {hidden_size} "
                    f"(shards from another base model? rerun `extract`)"
                )
            hidden_size = width
            self.tables.append(table)
            for batch in table.to_batches():
                rows = batch.num_rows
                # Flatten the fixed-size lists to their value buffers: zero-copy views.
                self._embeds.append(_values(batch.column("embeds"), 1).reshape(rows, width))
                self._hidden.append(
                    _values(batch.column("hidden"), 2).reshape(rows, MAX_LENGTH, width)
                )
                self._mask.append(_values(batch.column("mask"), 1).reshape(rows, MAX_LENGTH))
        self.hidden_size = int(hidden_size)
        # [N] str: each row's kind (plain, split, combine, image), in row order.
        self.kinds = np.concatenate(
            [t.column("kind").to_numpy(zero_copy_only=False) for t in self.tables]
        ).astype(str)
        sizes = np.array([len(x) for x in self._embeds])
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_rows = int(self._starts[-1])
        self._check_against_meta(paths)

    def _check_against_meta(self, paths: list[Path]) -> None:
        """The split holds the rows and shards meta.json (written by `extract`) promises."""
        if not (self.split_dir.parent / "meta.json").is_file():
            return  # shards written without the stage (benchmarks)
        meta = read_meta(self.split_dir.parent)
        split = meta["splits"].get(self.split_dir.name)
        if not isinstance(split, dict) or "rows" not in split:
            return
        expected = [shard_path(self.split_dir, k).name for k in range(split.get("shards", 0))]
        missing = sorted(set(expected) - {p.name for p in paths})
        if self.num_rows != split["rows"] or missing:
            where = f"; missing {', '.join(missing)}" if missing else ""
            raise ShardError(
                f"{self.split_dir}: {self.num_rows} rows in {len(paths)} shards, but "
                f"{self.split_dir.parent / 'meta.json'} promises {split['rows']} rows in "
                f"{split.get('shards', '?')} shards{where}; rerun `deprojector extract`"
            )

    def __len__(self) -> int:
        return self.num_rows

    def embeddings(self) -> torch.Tensor:
        """[N, D] float32: every row's input embedding, in row order; the hidden states are
        not read."""
        return torch.from_numpy(np.concatenate(self._embeds))

    def batch(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, dtype=np.int64)
        chunk = np.searchsorted(self._starts, indices, side="right") - 1
        offset = indices - self._starts[chunk]
        embeds = np.empty((len(indices), self.hidden_size), np.float32)
        hidden = np.empty((len(indices), MAX_LENGTH, self.hidden_size), np.float32)
        mask = np.empty((len(indices), MAX_LENGTH), np.float32)
        for c in np.unique(chunk):
            rows = np.nonzero(chunk == c)[0]
            embeds[rows] = self._embeds[c][offset[rows]]
            hidden[rows] = self._hidden[c][offset[rows]]
            mask[rows] = self._mask[c][offset[rows]]
        return Batch(torch.from_numpy(embeds), torch.from_numpy(hidden), torch.from_numpy(mask))

    def rows_of(self, image: bool) -> np.ndarray:
        """Indices of the image rows (image=True) or of the caption rows (every other kind)."""
        return np.nonzero((self.kinds == "image") == image)[0]

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        rows: np.ndarray | None = None,
    ) -> Iterator[Batch]:
        """Batches in a per-epoch seeded order; `start` skips the first batches (resume);
        `rows`: only these row indices (in their order unless shuffled).

        With `world` processes, each global batch of `batch_size` rows is cut into `world`
        near-equal parts and process `rank` gets its part, so the effective batch stays
        `batch_size` in total.
        """
        order = np.arange(self.num_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if shuffle:
            order = order[np.random.default_rng([seed, epoch]).permutation(len(order))]
        for begin in range(start * batch_size, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            if world > 1:
                rows = np.array_split(rows, world)[rank]
            if len(rows):
                yield self.batch(rows)


def _values(array: pa.Array, depth: int) -> np.ndarray:
    for _ in range(depth):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=True)


META_KEYS = ("base_clip", "hidden_size", "projection_size", "splits")


def read_meta(shards_dir: Path) -> dict:
    path = shards_dir / "meta.json"
    if not path.exists():
        raise ShardError(f"{path}: missing; run the `extract` stage first")
    meta = read_json(path, ShardError, "rerun `deprojector extract` to rewrite it")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ShardError(
            f"{path}: missing keys {', '.join(missing)} (expected "
            f"{', '.join(META_KEYS)}); rerun `deprojector extract` to rewrite it"
        )
    return meta
