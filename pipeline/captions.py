"""Caption collection: read a source, clean it, split it into train and test deterministically."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.base_models import load_tokenizer
from pipeline.conventions import MAX_LENGTH
from pipeline.errors import DeprojectorError
from pipeline.params import Params
from pipeline.world.embedded import World

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
SUPPORTED_SUFFIXES = (".txt", *TABLE_SUFFIXES)


class CaptionSourceError(DeprojectorError, ValueError):
    """A caption source cannot be read; the message names the file, line or column."""


# --- reading sources ----------------------------------------------------------------------

def _decode_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file; a bad byte or a NUL is reported with its line number."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if b"\x00" in raw:
            raise CaptionSourceError(f"{path}:{number}: contains a NUL byte (expected UTF-8 text)")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CaptionSourceError(
                f"{path}:{number}: not valid UTF-8 (byte {err.start + 1} of the line: "
                f"{raw[err.start:err.start + 1]!r}); re-encode the file as UTF-8"
            ) from err
    text = data.decode("utf-8")
    return text.removeprefix("\ufeff").splitlines()


def _column(table: pa.Table, column: str, path: Path) -> list[str]:
    if column not in table.column_names:
        raise CaptionSourceError(
            f"{path}: no column {column!r} (columns: {', '.join(table.column_names)}); "
            f"set captions.column"
        )
    values = table.column(column).to_pylist()
    return ["" if v is None else str(v) for v in values]


def _read_delimited(path: Path, column: str, delimiter: str) -> list[str]:
    import csv
    import io

    rows = csv.DictReader(io.StringIO("\n".join(_decode_lines(path))), delimiter=delimiter)
    if rows.fieldnames is None:
        raise CaptionSourceError(f"{path}: empty file (expected a header row with {column!r})")
    if column not in rows.fieldnames:
        raise CaptionSourceError(
            f"{path}:1: no column {column!r} in the header (columns: "
            f"{', '.join(rows.fieldnames)}); set captions.column"
        )
    return [row[column] or "" for row in rows]


def _read_jsonl(path: Path, column: str) -> list[str]:
    texts = []
    for number, line in enumerate(_decode_lines(path), start=1):
        if not line.strip():
            texts.append("")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CaptionSourceError(f"{path}:{number}: not valid JSON: {err.msg}") from err
        if not isinstance(record, dict) or column not in record:
            raise CaptionSourceError(
                f"{path}:{number}: expected an object with the field {column!r}; "
                f"set captions.column"
            )
        texts.append("" if record[column] is None else str(record[column]))
    return texts


def read_caption_file(path: Path, column: str = "text") -> list[str]:
    """Raw captions of a local file, in file order (cleaning happens later)."""
    if not path.is_file():
        raise CaptionSourceError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _decode_lines(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, column, "," if suffix == ".csv" else "\t")
    if suffix == ".jsonl":
        return _read_jsonl(path, column)
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except pa.ArrowInvalid as err:
            raise CaptionSourceError(f"{path}: not a readable Parquet file: {err}") from err
        return _column(table, column, path)
    raise CaptionSourceError(
        f"{path}: unknown extension {suffix!r} (supported: {', '.join(SUPPORTED_SUFFIXES)})"
    )


def read_hub_dataset(name: str, column: str, split: str) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; all mean "cannot get it"
        raise CaptionSourceError(
            f"captions.source: cannot load the hub dataset {name!r} (split {split!r}): {err}. "
            f"Offline, export the captions to a local .txt/.parquet file and point to it."
        ) from err
    if column not in dataset.column_names:
        raise CaptionSourceError(
            f"captions.source {name!r}: no column {column!r} "
            f"(columns: {', '.join(dataset.column_names)}); set captions.column"
        )
    return ["" if v is None else str(v) for v in dataset[column]]


# --- cleaning -------------------------------------------------------------------------------

@dataclass
class CleanResult:
    captions: list[str]
    dropped: Counter = field(default_factory=Counter)


def normalize(text: str) -> str:
    return " ".join(text.split())


def clean_captions(raw: Iterable[str], count_tokens: Callable[[list[str]], list[int]],
                   max_tokens: int = 77) -> CleanResult:
    """Normalise whitespace; drop empty, duplicate and over-long captions, counting each reason.

    `count_tokens` gives each caption's token count including BOS and EOS.
    """
    result = CleanResult(captions=[])
    seen: set[str] = set()
    candidates = []
    for text in raw:
        text = normalize(text)
        if not text:
            result.dropped["empty"] += 1
        elif text in seen:
            result.dropped["duplicate"] += 1
        else:
            seen.add(text)
            candidates.append(text)
    for text, n in zip(candidates, count_tokens(candidates), strict=True):
        if n > max_tokens:
            result.dropped["too_long"] += 1
        else:
            result.captions.append(text)
    return result


def split_train_test(captions: list[str], train_size: int, test_size: int,
                     seed: int) -> tuple[list[int], list[int]]:
    """Indices of the test and train captions, from a seeded shuffle (test first)."""
    if len(captions) <= test_size:
        raise CaptionSourceError(
            f"only {len(captions)} captions after cleaning; captions.test_size={test_size} "
            f"leaves none for training"
        )
    order = list(range(len(captions)))
    random.Random(seed).shuffle(order)
    test = sorted(order[:test_size])
    train = sorted(order[test_size:test_size + train_size])
    return train, test


# --- the stage ------------------------------------------------------------------------------

def collect_raw(source: str, column: str, hub_split: str, needed: int, seed: int) -> list[str]:
    if source == "builtin":
        # Over-generate: the generator repeats short captions, cleaning removes duplicates.
        return World.captions(needed * 3, seed)
    path = Path(source)
    if path.suffix.lower() in SUPPORTED_SUFFIXES or path.exists():
        return read_caption_file(path, column)
    if "/" in source:
        return read_hub_dataset(source, column, hub_split)
    raise CaptionSourceError(
        f"captions.source: {source!r} is neither `builtin`, an existing file "
        f"({', '.join(SUPPORTED_SUFFIXES)}) nor a hub dataset id (owner/name)"
    )


def write_captions(out_dir: Path, captions: list[str], train: list[int], test: list[int],
                   stats: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, indices in (("train", train), ("test", test)):
        table = pa.table({
            "id": pa.array(indices, pa.int64()),
            "text": pa.array([captions[i] for i in indices], pa.string()),
        })
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def read_split(captions_dir: Path, split: str) -> list[str]:
    path = captions_dir / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the `captions` stage first")
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def run_captions_stage(params: Params, out_dir: Path = Path("data/captions")) -> dict:
    """The `captions` stage: collect, clean, split; returns the stats it writes."""
    p = params.captions
    tokenizer = load_tokenizer(params.base.clip)
    needed = p.train_size + p.test_size
    raw = collect_raw(p.source, p.column, p.hub_split, needed, p.seed)

    # No token spans more than `longest` characters (plus a space), so a longer text is over
    # the limit without tokenising it: a 1 MB line costs nothing.
    longest = max(len(token) for token in tokenizer.get_vocab()) + 1
    hopeless = MAX_LENGTH * longest

    def count_tokens(texts: list[str]) -> list[int]:
        short = [t for t in texts if len(t) <= hopeless]
        counts = iter(len(x) for x in tokenizer(short, truncation=False)["input_ids"]) \
            if short else iter(())
        return [next(counts) if len(t) <= hopeless else MAX_LENGTH + 1 for t in texts]

    cleaned = clean_captions(tqdm(raw, desc="cleaning captions", unit="caption"), count_tokens)
    train, test = split_train_test(cleaned.captions, p.train_size, p.test_size, p.seed)
    stats = {
        "source": p.source,
        "read": len(raw),
        "kept": len(cleaned.captions),
        "dropped": dict(sorted(cleaned.dropped.items())),
        "train": len(train),
        "test": len(test),
    }
    if len(train) < p.train_size:
        stats["note"] = f"asked for {p.train_size} train captions, the source had {len(train)}"
        tqdm.write(f"warning: {stats['note']}")
    write_captions(out_dir, cleaned.captions, train, test, stats)
    return stats
