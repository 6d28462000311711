"""Extraction overhead: the extract stage's wall time / the bare CLIP text-encoder forward time.

Both sides encode the same texts (the captions plus their split/combine augmentations, each
distinct text once) with the same batch size; the bare side is only the model forward over
pre-tokenised batches. Repeats are interleaved and the median ratio is reported, since this
machine is noisy. Target: <= 1.15.

    python benchmarks/extraction.py [--captions 1000] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.base_models import build_builtin, load_clip
from pipeline.builtin_captions import generate_captions
from pipeline.clip_encode import encode_tokens, tokenize
from pipeline.extract import compute_constants, extract_split, plan_rows
from pipeline.params import parse_params


def run(captions: int = 1000, repeats: int = 5, base: str = "builtin") -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        if base == "builtin":
            build_builtin(work / "base", seed=0)
        clip = load_clip(base, base_dir=work / "base")
        texts = list(dict.fromkeys(generate_captions(captions * 2, seed=0)))[:captions]
        params = parse_params({"base": {"clip": base},
                               "extract": {"rows_per_shard": 1000, "batch_size": 64}})
        null = compute_constants(clip)["null"]
        rows, _ = plan_rows(texts, params.augment.split, params.augment.combine, 0,
                            lambda ts: [len(x) for x in clip.tokenizer(ts)["input_ids"]])
        # The same distinct texts the extraction encodes, shard by shard.
        per_shard = [rows[k:k + 1000] for k in range(0, len(rows), 1000)]
        shard_texts = [sorted({t for r in s for t in (*r.parts, r.target_text)})
                       for s in per_shard]
        batch = params.extract.batch_size

        def bare() -> float:
            tokens = [tokenize(clip, t) for t in shard_texts]
            start = time.perf_counter()
            for tok in tokens:
                for b in range(0, len(tok["input_ids"]), batch):
                    encode_tokens(clip, tok["input_ids"][b:b + batch],
                                  tok["attention_mask"][b:b + batch])
            return time.perf_counter() - start

        def extract() -> float:
            out = work / "shards"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            extract_split(clip, texts, out, params, 0, null)
            return time.perf_counter() - start

        bare(), extract()  # warm-up
        pairs = [(extract(), bare()) for _ in range(repeats)]
        ratios = [e / b for e, b in pairs]
        return {
            "captions": captions,
            "texts_encoded": sum(len(t) for t in shard_texts),
            "batch_size": batch,
            "extract_s_median": statistics.median(e for e, _ in pairs),
            "bare_forward_s_median": statistics.median(b for _, b in pairs),
            "ratio_median": statistics.median(ratios),
            "target": 1.15,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base", default="builtin", help="base.clip: builtin, hub id or folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args.captions, args.repeats, args.base)
    if args.json:
        print(json.dumps(result))
        return
    print(f"extract {result['extract_s_median']:.2f} s, bare forward "
          f"{result['bare_forward_s_median']:.2f} s over {result['texts_encoded']} texts "
          f"(batch {result['batch_size']}): ratio {result['ratio_median']:.3f} "
          f"(target <= {result['target']})")


if __name__ == "__main__":
    main()
