"""Generation speed of the deprojectors at real CLIP ViT-L/14 text sizes (random weights).

A deprojector replaces one CLIP text encoder call in image generation, so each registered
architecture's generate time is reported relative to the encoder's forward pass (target:
<= 0.25), and its fast path (key/value cache, carried LSTM state, ...) against re-running the
teacher-forced model on the prefix for each position (the transformer's target: >= 15).

    python -m pipeline.benchmarks.generation [--batch 16] [--repeats 5] [--threads N] [--json]
    python -m pipeline.benchmarks.generation --tiny   # seconds: D=64, 2 layers (a smoke test)

On a shared machine, other processes slow the many small steps of generation far more than
the encoder's large matmuls (the threads of each small op wait for each other); compare
numbers from a quiet machine, or with --threads 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.models import ARCHITECTURES, build_deprojector

D, LAYERS, HEADS, INTERMEDIATE, POSITIONS, VOCAB = 768, 12, 12, 3072, 77, 49408
# A few seconds on 2 CPU cores: the code paths of the real run, not its figures.
TINY = {"batch": 2, "repeats": 1, "width": 64, "layers": 2}


def _median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function. Rounds interleave the functions, so a slow spell of a
    shared machine hits all of them alike and the ratios stay meaningful."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(
    batch: int = 16,
    repeats: int = 5,
    width: int = D,
    layers: int = LAYERS,
    variants: dict[str, tuple[str, dict]] | None = None,
    registered: bool = True,
    naive: bool = True,
) -> dict:
    """Median seconds of the CLIP encoder forward and of each model's generate, with ratios.

    `width` and `layers` shrink the text model (CLIP-L: 768, 12; heads: one per 64 of width)
    for quick checks; the figures quoted in the README are at CLIP-L's. The models: every
    registered architecture at its defaults (`registered`), and `variants` (name -> (type,
    hyperparameters)); `naive`: also time each model's re-run of the prefix (minutes at CLIP-L
    sizes; pointless for one-pass models, whose generation is already one pass)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    heads = HEADS if width == D else max(1, width // 64)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB,
            hidden_size=width,
            intermediate_size=INTERMEDIATE * width // D,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=POSITIONS,
            projection_dim=width,
        )
    ).eval()
    input_ids = torch.randint(0, VOCAB, (batch, POSITIONS))
    constants = {
        "sos": torch.randn(width),
        "null": torch.randn(width),
        "deprojection": torch.randn(width, width),
    }
    embeds = torch.randn(batch, width)
    # Shaped (and initialised) by the CLIP-L sized text model as training would do it.
    specs = {name: (name, {}) for name in ARCHITECTURES} if registered else {}
    models = {
        name: build_deprojector(kind, width, width, constants, base=clip, **hparams).eval()
        for name, (kind, hparams) in {**specs, **(variants or {})}.items()
    }
    fns: dict[str, Callable[[], object]] = {"encoder": lambda: clip(input_ids=input_ids)}
    prefix_reruns: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        fns[name] = lambda m=model: m.generate(embeds)
        if naive:
            prefix_reruns[name] = lambda m=model: m.generate_states_naive(embeds - m.null)

    with torch.inference_mode():
        seconds = _median_seconds(fns, repeats)
        # Re-running the prefix is one to two orders of magnitude slower: one timed run each
        # (after the fast path warmed the weights up) keeps the whole benchmark to minutes.
        for name, fn in prefix_reruns.items():
            start = time.perf_counter()
            fn()
            seconds[f"{name}-naive"] = time.perf_counter() - start
    encoder_s = seconds["encoder"]
    result: dict = {
        "batch": batch,
        "repeats": repeats,
        "hidden_size": width,
        "layers": layers,
        "threads": torch.get_num_threads(),
        "clip_encoder_forward_s": encoder_s,
        "models": {
            name: {
                "generate_s": seconds[name],
                "ratio_to_encoder": seconds[name] / encoder_s,
                # re-running the teacher-forced model on the prefix for every position
                **(
                    {"naive_generate_s": rerun, "cache_speedup": rerun / seconds[name]}
                    if (rerun := seconds.get(f"{name}-naive"))
                    else {}
                ),
            }
            for name in models
        },
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=D, help="text model width (CLIP-L: 768)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="text model layers (12)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke-test sizes ({TINY}); overrides the options above",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (
        TINY
        if args.tiny
        else {
            "batch": args.batch,
            "repeats": args.repeats,
            "width": args.width,
            "layers": args.layers,
        }
    )
    result = run(**sizes)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print_report(result)


def print_report(result: dict) -> None:
    """The text report of `run`'s result."""
    print(
        f"D={result['hidden_size']}, {result['layers']} layers, batch {result['batch']}, "
        f"{result['threads']} threads, median of {result['repeats']}"
    )
    print(f"CLIP text encoder forward     {result['clip_encoder_forward_s'] * 1e3:9.1f} ms")
    for name, entry in result["models"].items():
        verdict = "ok" if entry["ratio_to_encoder"] <= 0.25 else "MISSED (target <= 0.25)"
        print(
            f"{name:<20} generate {entry['generate_s'] * 1e3:9.1f} ms"
            f"  = {entry['ratio_to_encoder']:.3f} x encoder  {verdict}"
        )
    for name, entry in result["models"].items():
        if "naive_generate_s" not in entry:
            continue
        print(
            f"{name:<20} naive generate {entry['naive_generate_s'] * 1e3:9.1f} ms"
            f"  fast-path speedup {entry['cache_speedup']:.1f}x"
        )


if __name__ == "__main__":
    main()
