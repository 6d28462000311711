"""Generation time of one-pass configurations at CLIP-L sizes (issue #30's target: <= 0.05 x a
CLIP-L text-encoder forward), beside the defaults `deprojector bench` times.

`queries` runs its layers over the 76 position queries, `latent-queries` over the K tokens
of the embedding with one read by the queries (docs/architectures.md gives each one's
multiply-adds); the variants here: `queries` with 1 layer and `latent-queries` with its
readout MLP. Random weights, so only the times mean anything; their quality is
`pipeline.experiments.training_variants`' (arms of the same names).

    python -m pipeline.benchmarks.one_pass --threads 1 --out docs/records/one_pass_speed.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.benchmarks import generation
from pipeline.core.jsonio import write_json

# name -> (type, hyperparameters)
VARIANTS: dict[str, tuple[str, dict]] = {
    "queries": ("queries", {}),
    "queries-1-layer": ("queries", {"num_layers": 1}),
    "latent-queries": ("latent-queries", {}),
    "latent-queries-mlp": ("latent-queries", {"readout_mlp": True}),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--tiny", action="store_true", help=f"smoke-test sizes ({generation.TINY})")
    parser.add_argument("--out", type=Path, help="write the result here (JSON)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = generation.TINY if args.tiny else {"batch": args.batch, "repeats": args.repeats}
    result = generation.run(**sizes, variants=VARIANTS, registered=False, naive=False)
    generation.print_report(result)
    if args.out:
        words = sys.argv[1:] if argv is None else argv
        command = " ".join(["python -m pipeline.benchmarks.one_pass", *words])
        write_json(args.out, {"command": command, **result})
    return result


if __name__ == "__main__":
    main()
