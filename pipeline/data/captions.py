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

from pipeline.core.atomic import atomic_path, write_text
from pipeline.data.caption_files import (
    SUPPORTED_SUFFIXES,
    CaptionSourceError,
    read_caption_file,
    read_hub_dataset,
)
from pipeline.world.embedded import World

# --- reading sources ----------------------------------------------------------------------
#
# Every reader returns the raw captions in file order; a JSON null, a parquet null and an
# empty cell are "" (dropped and counted as `empty` by the cleaning), any other value that is
# not a string is an error naming the file, line or row, the column and the type found.


# --- cleaning -------------------------------------------------------------------------------

TOKENIZE_BATCH = 4096  # captions per tokenizer call in the cleaning


@dataclass
class CleanResult:
    captions: list[str]
    dropped: Counter = field(default_factory=Counter)


def normalize(text: str) -> str:
    return " ".join(text.split())


def clean_captions(
    raw: Iterable[str], count_tokens: Callable[[list[str]], list[int]], max_tokens: int = 77
) -> CleanResult:
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
    # Tokenised in batches: the tokenizer's encodings of a whole file at once would take
    # memory in proportion to its length (6.6 GB for 2,000,000 captions).
    for begin in range(0, len(candidates), TOKENIZE_BATCH):
        batch = candidates[begin : begin + TOKENIZE_BATCH]
        for text, n in zip(batch, count_tokens(batch), strict=True):
            if n > max_tokens:
                result.dropped["too_long"] += 1
            else:
                result.captions.append(text)
    return result


def split_train_test(
    captions: list[str], train_size: int, test_size: int, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of the test and train captions, from a seeded shuffle (test first)."""
    if len(captions) <= test_size:
        raise CaptionSourceError(
            f"only {len(captions)} captions after cleaning; captions.test_size={test_size} "
            f"leaves none for training"
        )
    order = list(range(len(captions)))
    random.Random(seed).shuffle(order)
    test = sorted(order[:test_size])
    train = sorted(order[test_size : test_size + train_size])
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


def write_captions(
    out_dir: Path, captions: list[str], train: list[int], test: list[int], stats: dict
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, indices in (("train", train), ("test", test)):
        table = pa.table(
            {
                "id": pa.array(indices, pa.int64()),
                "text": pa.array([captions[i] for i in indices], pa.string()),
            }
        )
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
    write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")


def read_split(captions_dir: Path, split: str) -> list[str]:
    path = captions_dir / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the `captions` stage first")
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    if not texts:
        raise CaptionSourceError(
            f"{path}: no captions in the {split} split; every split needs "
            f"at least one (rerun `deprojector captions` with "
            f"captions.{split}_size > 0 and a source that has them)"
        )
    return texts
