"""Extraction overhead: the extract stage's wall time / the bare CLIP text-encoder forward time.

Both sides encode the same texts (the captions plus their split/combine augmentations, each
distinct text once) with the same batch size; the bare side is only the model forward over
pre-tokenised batches. Repeats are interleaved and the median ratio is reported, since this
machine is noisy. Target: <= 1.15.

Two cases: the base.clip of `--base` (default `builtin`: the world stage's models/world/clip;
or a hub id / folder), and `--clip-l`, a random-weight CLIPTextModelWithProjection with
openai/clip-vit-large-patch14's text config (D = 768, 12 layers) and a BPE tokenizer trained on
the builtin captions, whose shard bytes per row and captions per second give the
article-scale (50,000 captions) extrapolation.

    python -m pipeline.benchmarks.extraction [--captions 1000] [--repeats 5] [--json]
    python -m pipeline.benchmarks.extraction --clip-l [--captions 64] [--repeats 1]
    python -m pipeline.benchmarks.extraction --tiny [--clip-l]   # seconds (a smoke test)

--tiny: 20 captions, one repeat; with --clip-l 2 captions through one CLIP-L-width layer (its
shard bytes per row are CLIP-L's, its speed is not).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.base.clip_encode import encode_tokens, token_ids, tokenize
from pipeline.base.loaders import ClipText, load_clip
from pipeline.config.params import parse_params
from pipeline.data.extraction import compute_constants, extract_split, plan_rows
from pipeline.world.scenes import generate_captions
from pipeline.world.tokenizer import train_tokenizer

ARTICLE_CAPTIONS = 50_000
# openai/clip-vit-large-patch14's text_config (vocab 49408, 77 positions, quick_gelu).
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
# A few seconds each on 2 CPU cores: the code paths of the real runs, not their figures.
TINY = {"captions": 20, "repeats": 1}
TINY_CLIP_L = {"captions": 2, "repeats": 1, "layers": 1}


def clip_l_random(layers: int = 12) -> ClipText:
    """CLIP-L's text tower with random weights and a 2,048-token BPE (ids < 49408); `layers`
    below 12 only for quick checks."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = train_tokenizer(generate_captions(20_000, seed=1), 2048)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**CLIP_L_TEXT, "num_hidden_layers": layers},
    )
    torch.manual_seed(0)
    return ClipText(tokenizer, CLIPTextModelWithProjection(config).eval())


def measure(
    clip: ClipText,
    base: str,
    captions: int,
    repeats: int,
    batch: int = 64,
    full_warmup: bool = True,
) -> dict:
    """Interleaved extract / bare-forward timings of `captions` builtin captions."""
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        texts = list(dict.fromkeys(generate_captions(captions * 2, seed=0)))[:captions]
        params = parse_params(
            {
                "base": {"clip": base, "sd": base},  # sd unused here
                "extract": {"rows_per_shard": 1000, "batch_size": batch},
            }
        )
        null = compute_constants(clip)["null"]
        rows, _ = plan_rows(
            texts,
            params.augment.split,
            params.augment.combine,
            0,
            lambda ts: [len(ids) for ids in token_ids(clip, ts)],
        )
        # The same distinct texts the extraction encodes, shard by shard.
        per_shard = [rows[k : k + 1000] for k in range(0, len(rows), 1000)]
        shard_texts = [sorted({t for r in s for t in (*r.parts, r.target_text)}) for s in per_shard]

        def bare() -> float:
            tokens = [tokenize(clip, t) for t in shard_texts]
            start = time.perf_counter()
            for tok in tokens:
                for b in range(0, len(tok["input_ids"]), batch):
                    encode_tokens(
                        clip, tok["input_ids"][b : b + batch], tok["attention_mask"][b : b + batch]
                    )
            return time.perf_counter() - start

        def extract() -> float:
            out = work / "shards"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            extract_split(clip, texts, out, params, 0, null)
            return time.perf_counter() - start

        if full_warmup:
            bare(), extract()
        else:  # a large model: one small forward warms the kernels
            tok = tokenize(clip, shard_texts[0][:8])
            encode_tokens(clip, tok["input_ids"], tok["attention_mask"])
        pairs = []
        for k in range(repeats):  # alternate which side runs first
            if k % 2:
                b = bare()
                pairs.append((extract(), b))
            else:
                pairs.append((extract(), bare()))
        shard_bytes = sum(f.stat().st_size for f in (work / "shards").glob("*.arrow"))
        extract_s = statistics.median(e for e, _ in pairs)
        return {
            "captions": captions,
            "texts_encoded": sum(len(t) for t in shard_texts),
            "batch_size": batch,
            "hidden_size": clip.hidden_size,
            "extract_s_median": extract_s,
            "bare_forward_s_median": statistics.median(b for _, b in pairs),
            "ratio_median": statistics.median(e / b for e, b in pairs),
            "target": 1.15,
            "captions_per_s": captions / extract_s,
            "shard_bytes_per_row": shard_bytes / len(rows),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def article_scale(result: dict, captions: int = ARTICLE_CAPTIONS) -> dict:
    """Extraction time and shard disk for `captions` captions at the measured rates."""
    return {
        "captions": captions,
        "cpu_hours": captions / result["captions_per_s"] / 3600,
        "disk_gb": captions * result["shard_bytes_per_row"] / 1e9,
    }


def run(captions: int = 1000, repeats: int = 5, base: str = "builtin") -> dict:
    """The base.clip `base` (builtin: models/world/clip, built by `deprojector world`)."""
    return measure(load_clip(base), base, captions, repeats)


def run_clip_l(captions: int = 64, repeats: int = 1, layers: int = 12) -> dict:
    """CLIP-L width (random weights): a few minutes on 2 CPU cores at 64 captions."""
    result = measure(clip_l_random(layers), "clip-l-random", captions, repeats, full_warmup=False)
    return {**result, "layers": layers, "article_scale": article_scale(result)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--captions",
        type=int,
        default=None,
        help="captions to extract (default 1000; 64 with --clip-l)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats (default 5; 1 with --clip-l)"
    )
    parser.add_argument("--base", default="builtin", help="base.clip: builtin, hub id or folder")
    parser.add_argument(
        "--clip-l",
        action="store_true",
        help="random-weight CLIP-L text tower (D=768) instead of --base",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke-test sizes ({TINY}; with --clip-l {TINY_CLIP_L})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.tiny:
        result = run_clip_l(**TINY_CLIP_L) if args.clip_l else run(**TINY, base=args.base)
    elif args.clip_l:
        result = run_clip_l(args.captions or 64, args.repeats or 1)
    else:
        result = run(args.captions or 1000, args.repeats or 5, args.base)
    if args.json:
        print(json.dumps(result))
        return
    print_report(result)


def print_report(result: dict) -> None:
    """The text report of `run`'s result."""
    print(
        f"extract {result['extract_s_median']:.2f} s, bare forward "
        f"{result['bare_forward_s_median']:.2f} s over {result['texts_encoded']} texts "
        f"(D={result['hidden_size']}, batch {result['batch_size']}): ratio "
        f"{result['ratio_median']:.3f} (target <= {result['target']}); "
        f"{result['captions_per_s']:.2f} captions/s, "
        f"{result['shard_bytes_per_row']:,.0f} shard bytes per row"
    )
    if "article_scale" in result:
        scale = result["article_scale"]
        print(
            f"{scale['captions']:,} captions: {scale['cpu_hours']:.1f} h, "
            f"{scale['disk_gb']:.1f} GB of shards"
        )


if __name__ == "__main__":
    main()
