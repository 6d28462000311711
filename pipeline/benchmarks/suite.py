"""Every benchmark in one process (`deprojector bench`): their results and the printed report."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.benchmarks import extraction, generation, pictures, training
from pipeline.experiments import schedulers as scheduler_bench

REPORTS = {
    "extraction": extraction,
    "extraction_clip_l": extraction,
    "generation": generation,
    "training": training,
    "pictures": pictures,
    "schedulers": scheduler_bench,
}


def run_suite(
    repeats: int = 3,
    clip_l_captions: int = 64,
    schedulers: bool = False,
    tiny: bool = False,
    threads: int = 0,
) -> dict:
    """Each benchmark's results (medians over `repeats`); `tiny`: each module's TINY sizes
    (code paths only, numbers meaningless); `threads`: torch CPU threads (0: its default)."""
    if threads:
        torch.set_num_threads(threads)
    if tiny:
        clip_l = extraction.TINY_CLIP_L
        sizes = {
            "extraction": extraction.TINY,
            "generation": generation.TINY,
            "training": training.TINY,
            "pictures": pictures.TINY,
            "schedulers": scheduler_bench.TINY,
        }
    else:
        clip_l = {"captions": clip_l_captions, "repeats": repeats} if clip_l_captions else None
        sizes = {
            "extraction": {"repeats": repeats},
            "generation": {"batch": 16, "repeats": repeats},
            "training": {"repeats": repeats},
            "pictures": {"repeats": repeats},
            "schedulers": {},
        }
    results: dict = {
        "threads": torch.get_num_threads(),
        "tiny": tiny,
        "extraction": extraction.run(**sizes["extraction"]),
    }
    if clip_l:
        results["extraction_clip_l"] = extraction.run_clip_l(**clip_l)
    results["generation"] = generation.run(**sizes["generation"])
    results["training"] = training.run(**sizes["training"])
    results["pictures"] = pictures.run(**sizes["pictures"])
    if schedulers:
        results["schedulers"] = scheduler_bench.run(**sizes["schedulers"])
    return results


def print_suite(results: dict, echo: Callable[[str], None] = print) -> None:
    """The human-readable report of `run_suite`'s results, a section per benchmark."""
    echo(f"{results['threads']} torch threads{' (tiny sizes)' * results['tiny']}")
    for section, module in REPORTS.items():
        if section in results:
            echo(f"[{section}]")
            module.print_report(results[section])
