"""The `captions` stage: collect captions (`captions.source`), clean them, split train/test."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pipeline.base.loaders import load_tokenizer
from pipeline.config.params import Params
from pipeline.core.conventions import MAX_LENGTH
from pipeline.data.captions import clean_captions, collect_raw, split_train_test, write_captions


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
        counts = (
            iter(len(x) for x in tokenizer(short, truncation=False)["input_ids"])
            if short
            else iter(())
        )
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
