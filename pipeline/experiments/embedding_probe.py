"""How much of a prompt its pooled CLIP embedding still holds: the ceiling of any deprojector.

A deprojector sees only the pooled embedding e [D] of a prompt. If e no longer tells which
colour goes with which shape, no deprojector can draw it. This probe measures that on the
embedded world, on the held-out prompts and noise seeds of `evaluate`'s adherence table:

1. A probe (an MLP, e -> the background colour and which of the 24 colour-shape pairs the
   prompt states) is trained on the pooled embeddings of `--scenes` fresh scene
   descriptions, written as evaluate's prompts are (`World.describe`; none of them a
   held-out prompt), of both kinds: `single` (the whole description's e) and `multi` (its
   comma parts combined, sum(e_k - null) + null, as a deprojector receives them).
2. On the held-out prompts, the probe reads e back into facts (`read_back`: how often all of
   them, and each attribute's recall / precision).
3. `rewritten`: the facts read back written as a prompt and drawn with that prompt's ordinary
   CLIP states (no deprojector), judged against the original prompt, beside the reference
   row (the original prompt's states). Its ratio to the reference is what a deprojector
   could reach through e if it only had to recover the prompt's facts; the reference and
   the seeds are evaluate's, so the ratio compares with `reports/metrics/adherence.json`.

    python -m pipeline.experiments.embedding_probe [--scenes 50000] [--out FILE]
    python -m pipeline.experiments.embedding_probe --captions data/captions/train.parquet
    python -m pipeline.experiments.embedding_probe --tiny   # seconds: the code path only
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from pipeline.base.clip_encode import encode_texts
from pipeline.config.params import load_params
from pipeline.core.conventions import BUILTIN, combine_embeddings
from pipeline.core.jsonio import write_json
from pipeline.metrics.adherence import (
    KINDS,
    REFERENCE,
    Scorer,
    judged_rows,
    prompt_seeds,
    summarise,
    with_ratios,
)
from pipeline.metrics.intervals import mean_with_ci
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.sd import load_pipeline
from pipeline.world import scenes
from pipeline.world.embedded import World

PROBE_SEED = 7  # the probe's scenes: another stream than the held-out prompts' seeds
TINY = {"scenes_count": 64, "prompts": 4, "epochs": 1}
REWRITTEN = "rewritten"


def facts(prompt: str) -> tuple[int, list[int]]:
    """(background index into COLOR_NAMES, indices into PAIRS) that a full description states."""
    stated = scenes.parse_prompt(prompt)
    assert stated.background is not None, prompt
    pairs = sorted({scenes.PAIRS.index((c, s)) for c, s in stated.objects})
    return scenes.COLOR_NAMES.index(stated.background), pairs


def as_prompt(background: int, pairs: list[int]) -> str:
    """The facts written as evaluate's single prompts are: 'red circle ... white background'."""
    tags = [" ".join(scenes.PAIRS[k]) for k in pairs]
    return " ".join([*tags, f"{scenes.COLOR_NAMES[background]} background"])


class Probe(nn.Module):
    """e [N, D] -> background logits [N, 6] and pair logits [N, 24]."""

    def __init__(self, D: int, width: int = 1024) -> None:
        super().__init__()
        outputs = len(scenes.COLOR_NAMES) + len(scenes.PAIRS)
        self.net = nn.Sequential(
            nn.LayerNorm(D),
            nn.Linear(D, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, outputs),
        )

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(e)
        return out[:, : len(scenes.COLOR_NAMES)], out[:, len(scenes.COLOR_NAMES) :]


def targets(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Background classes [N] (-100 where a prompt states none: ignored), pair indicators
    [N, 24] and which of them a prompt decides [N, 24]: a colour or shape stated alone ('a red
    thing', 'star') leaves the pairs it could be undecided, every other pair is decided."""
    background = torch.full((len(prompts),), -100)
    pairs = torch.zeros(len(prompts), len(scenes.PAIRS))
    decided = torch.ones(len(prompts), len(scenes.PAIRS))
    for row, prompt in enumerate(prompts):
        stated = scenes.parse_prompt(prompt)
        if stated.background is not None:
            background[row] = scenes.COLOR_NAMES.index(stated.background)
        for color, shape in stated.objects:
            for k, (c, s) in enumerate(scenes.PAIRS):
                if color is not None and shape is not None:
                    pairs[row, k] = max(pairs[row, k].item(), float((c, s) == (color, shape)))
                elif (color or c) == c and (shape or s) == s:
                    decided[row, k] = 0.0
    return background, pairs, torch.maximum(decided, pairs)


def embeddings(encoder: PromptEncoder, prompts: list[str], kind: str) -> torch.Tensor:
    """[N, D]: what a deprojector receives for each prompt of `kind` (`single`: the pooled
    embedding of the whole prompt; `multi`: its comma parts' combined around null), as
    `PromptEncoder.embedding` computes it, the distinct texts in batched CLIP forwards."""
    parts = [[p] if kind == "single" else p.split(", ") for p in prompts]
    distinct = list(dict.fromkeys(t for ts in parts for t in ts))
    pooled = torch.cat(
        [
            encode_texts(encoder.clip, distinct[b : b + 256]).pooled.float()
            for b in range(0, len(distinct), 256)
        ]
    )
    row = {text: k for k, text in enumerate(distinct)}
    assert encoder.deprojector is not None, "the runs' null comes with a deprojector"
    null = encoder.deprojector.null.float()
    return torch.stack([combine_embeddings(pooled[[row[t] for t in ts]], null) for ts in parts])


def train_probe(e: torch.Tensor, prompts: list[str], epochs: int, seed: int = 0) -> Probe:
    """Adam, batch 256, cross-entropy on the background plus binary cross-entropy per pair."""
    torch.manual_seed(seed)
    probe = Probe(e.shape[1])
    background, pairs, decided = targets(prompts)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(e))
        for start in range(0, len(e), 256):
            rows = order[start : start + 256]
            bg_logits, pair_logits = probe(e[rows])
            pair_loss = nn.functional.binary_cross_entropy_with_logits(
                pair_logits, pairs[rows], weight=decided[rows], reduction="sum"
            ) / decided[rows].sum().clamp(min=1)
            bg_loss = (
                nn.functional.cross_entropy(bg_logits, background[rows])
                if (background[rows] >= 0).any()
                else bg_logits.sum() * 0
            )
            loss = bg_loss + pair_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


@torch.no_grad()
def read_back(probe: Probe, e: torch.Tensor) -> list[tuple[int, list[int]]]:
    """The facts the probe reads from each e: its background, and the pairs it gives p > 0.5
    (at least one, at most three: the world's scenes hold 1-3 objects)."""
    bg_logits, pair_logits = probe(e)
    p = pair_logits.sigmoid()
    out = []
    for row in range(len(e)):
        ranked = torch.argsort(p[row], descending=True).tolist()
        chosen = [k for k in ranked[:3] if p[row, k] > 0.5] or ranked[:1]
        out.append((int(bg_logits[row].argmax()), sorted(chosen)))
    return out


def read_back_scores(read: list[tuple[int, list[int]]], prompts: list[str], seed: int) -> dict:
    """Exact reads, background accuracy, and pair recall / precision (95 % intervals)."""
    truth = [facts(p) for p in prompts]
    exact = [r[0] == t[0] and r[1] == t[1] for r, t in zip(read, truth, strict=True)]
    bg = [r[0] == t[0] for r, t in zip(read, truth, strict=True)]
    recall = [len(set(r[1]) & set(t[1])) / len(t[1]) for r, t in zip(read, truth, strict=True)]
    precision = [len(set(r[1]) & set(t[1])) / len(r[1]) for r, t in zip(read, truth, strict=True)]
    out: dict = {}
    for key, values in (
        ("exact", exact),
        ("background", bg),
        ("pair_recall", recall),
        ("pair_precision", precision),
    ):
        out |= mean_with_ci(key, np.array(values, dtype=np.float64), seed)
    return out


def run(
    scenes_count: int = 50_000,
    prompts: int | None = None,
    epochs: int = 20,
    params_file: Path = Path("params.yaml"),
    model: str = "vt-rollout",
    captions: Path | None = None,
) -> dict:
    """The probe trained on `scenes_count` fresh descriptions, or on the texts of `captions` (a
    captions-stage parquet, e.g. data/captions/train.parquet: the deprojectors' own training
    captions, partial statements included); read-back scores and pictures per kind."""
    params = load_params(params_file)
    e_params = params.evaluate
    prompts = prompts or e_params.adherence_prompts
    single, multi = params.render.prompts(True)
    exclude = set(single) | set(multi)
    held_out = World.held_out_prompts(prompts, e_params.seed, exclude, distinct=True)
    held = set(held_out["single"]) | set(held_out["multi"])
    rng = random.Random(PROBE_SEED)
    training: list[scenes.Scene] = []
    while captions is None and len(training) < scenes_count:
        scene = scenes.random_scene(rng)
        if World.describe(scene, " ") not in held:
            training.append(scene)
    # null (CLIP's embedding of the empty prompt) as the runs hold it
    encoder = PromptEncoder.from_pretrained(Path("models") / model, images=False)
    world = World.of(BUILTIN, BUILTIN)
    scorer = Scorer.load(BUILTIN, world)
    pipe = load_pipeline(BUILTIN, params.render)
    seeds = prompt_seeds(e_params.seed, prompts)
    negative = encoder.encode_negative("", deproject=False)
    trained_on = (
        pq.read_table(captions, columns=["text"]).column("text").to_pylist()
        if captions is not None
        else None
    )
    result: dict = {
        "scenes": scenes_count if captions is None else None,
        "captions": None if captions is None else str(captions),
        "epochs": epochs,
        "prompts_per_kind": prompts,
        "render": {"steps": params.render.steps, "guidance_scale": params.render.guidance_scale},
    }
    for kind in KINDS:
        separator = ", " if kind == "multi" else " "
        texts = trained_on or [World.describe(s, separator) for s in training]
        probe = train_probe(embeddings(encoder, texts, kind), texts, epochs)
        test = held_out[kind]
        read = read_back(probe, embeddings(encoder, test, kind))
        rewritten = [as_prompt(b, ks) for b, ks in read]
        conditionings = {
            REFERENCE: encoder.encode_prompts(test, combine=False, deproject=False),
            REWRITTEN: encoder.encode_prompts(rewritten, combine=False, deproject=False),
        }
        scores = judged_rows(pipe, conditionings, negative, params, seeds, scorer, test)
        objects = [World.objects(p) for p in test]
        summary = {name: summarise(s, objects, e_params.seed) for name, s in scores.items()}
        result[kind] = {
            "read_back": read_back_scores(read, test, e_params.seed),
            "pictures": with_ratios(summary, scores, e_params.seed),
            "examples": [
                {"prompt": p, "read": r} for p, r in zip(test[:8], rewritten[:8], strict=True)
            ],
        }
    return result


def print_report(result: dict) -> None:
    source = result["captions"] or f"{result['scenes']} scenes"
    print(f"probe on {source}, {result['prompts_per_kind']} held-out prompts")
    for kind in KINDS:
        r, pics = result[kind]["read_back"], result[kind]["pictures"]
        ref, rw = pics[REFERENCE], pics[REWRITTEN]
        print(
            f"{kind}: exact {r['exact']:.3f}, background {r['background']:.3f}, pair recall "
            f"{r['pair_recall']:.3f}, precision {r['pair_precision']:.3f}; adherence reference "
            f"{ref['adherence']:.3f}, rewritten {rw['adherence']:.3f} (ratio "
            f"{rw['adherence_ratio']:.3f} {rw.get('adherence_ratio_ci95')})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=50_000, help="probe training scenes")
    parser.add_argument(
        "--captions",
        type=Path,
        default=None,
        help="train the probe on these captions instead (e.g. data/captions/train.parquet)",
    )
    parser.add_argument("--prompts", type=int, default=None, help="default: evaluate's")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help=f"smoke-test sizes ({TINY})")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = (
        TINY
        if args.tiny
        else {"scenes_count": args.scenes, "prompts": args.prompts, "epochs": args.epochs}
    )
    if args.captions is not None:
        sizes = {**sizes, "captions": args.captions}
    result = run(**sizes)
    if args.out:
        write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
