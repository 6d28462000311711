"""The `evaluate` stage: test-set metrics of every trained deprojector.

The metrics are described in docs/architectures.md (training data and loss).

For each model: loss and cosine similarity, teacher-forced and autoregressive; the
combination test (does deprojecting Σ(e_k − null) + null beat blending hidden states?);
the autoregressive cosine per position for a DVC plot. A `null-baseline` entry scores the
trivial predictor that outputs `null` at every position, the bar every model must clear.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.adherence import Scorer, evaluate_adherence, evaluate_image_prompts
from pipeline.base_models import ClipText
from pipeline.captions import read_split
from pipeline.clip_encode import encode_texts, token_counts
from pipeline.conventions import MAX_LENGTH, combine_embeddings
from pipeline.generation import load_encoders, load_pipeline
from pipeline.jsonio import write_json
from pipeline.losses import (
    cosine_per_position,
    masked_cosine,
    mse,
    predicted_in_mask,
    weighted_mse,
)
from pipeline.models import Deprojector
from pipeline.names import ADHERENCE, IMAGE_PROMPTS, NULL_BASELINE, REFERENCE
from pipeline.params import Params
from pipeline.prompt_encoder import PromptEncoder
from pipeline.shards import ShardReader, load_constants
from pipeline.world.embedded import World


class Scores:
    """Running sums of the metrics over batches, reduced once at the end."""

    def __init__(self) -> None:
        self.rows = 0
        self.sums = {"mse": 0.0, "weighted_mse": 0.0}
        self.cosine = torch.zeros(MAX_LENGTH)  # per position, summed over rows
        self.masked_cosine = 0.0
        self.masked_count = 0.0

    def add(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
            mask_weight: float) -> None:
        n = len(target)
        self.rows += n
        self.sums["mse"] += mse(pred, target).item() * n
        self.sums["weighted_mse"] += weighted_mse(pred, target, mask, mask_weight).item() * n
        cos = cosine_per_position(pred, target)
        self.cosine += cos.sum(dim=0).cpu()
        inside = predicted_in_mask(mask)
        self.masked_cosine += (cos * inside).sum().item()
        self.masked_count += inside.sum().item()

    def result(self) -> dict[str, float]:
        return {
            "mse": self.sums["mse"] / self.rows,
            "weighted_mse": self.sums["weighted_mse"] / self.rows,
            "cosine": (self.cosine[1:] / self.rows).mean().item(),
            "cosine_masked": self.masked_cosine / self.masked_count,
        }

    def per_position(self) -> list[float]:
        return (self.cosine[1:] / self.rows).tolist()


@torch.no_grad()
def score_model(model: Deprojector | None, reader: ShardReader, constants: dict,
                batch_size: int, mask_weight: float) -> tuple[dict, list[float]]:
    """Teacher-forced and autoregressive scores; model None scores the null predictor."""
    forced, free = Scores(), Scores()
    for batch in reader.iter_batches(batch_size):
        if model is None:
            pred = constants["null"].expand_as(batch.hidden).clone()
            pred[:, 0] = constants["sos"]
            forced.add(pred, batch.hidden, batch.mask, mask_weight)
            free.add(pred, batch.hidden, batch.mask, mask_weight)
            continue
        forced.add(model(batch.embeds, batch.hidden), batch.hidden, batch.mask, mask_weight)
        free.add(model.generate(batch.embeds), batch.hidden, batch.mask, mask_weight)
    return {"teacher_forced": forced.result(), "autoregressive": free.result()}, \
        free.per_position()


def combination_pairs(captions: list[str], count: int, seed: int, clip: ClipText) -> list:
    """Held-out pairs (A, B) of test captions whose joined text "A B" fits the context."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count * 4):
        if len(pairs) == count or len(captions) < 2:
            break
        a, b = rng.sample(captions, 2)
        if token_counts(clip, [f"{a} {b}"])[0] <= MAX_LENGTH:
            pairs.append((a, b))
    return pairs


@torch.no_grad()
def combination_scores(models: dict[str, Deprojector], pairs: list, clip: ClipText,
                       null: torch.Tensor) -> dict[str, dict[str, float]]:
    """Deprojected Σ(e_k − null) + null vs averaged hidden states, against H("A B")."""
    a = encode_texts(clip, [p[0] for p in pairs])
    b = encode_texts(clip, [p[1] for p in pairs])
    joined = encode_texts(clip, [f"{x} {y}" for x, y in pairs])
    embeds = combine_embeddings(torch.stack([a.pooled, b.pooled], dim=1), null)
    blend = masked_cosine((a.hidden + b.hidden) / 2, joined.hidden, joined.mask).item()
    return {
        name: {"deprojector_cosine": masked_cosine(model.generate(embeds), joined.hidden,
                                                   joined.mask).item(),
               "blend_cosine": blend, "pairs": len(pairs)}
        for name, model in models.items()
    }


def run_evaluate_stage(params: Params, shards_dir: Path = Path("data/shards"),
                       captions_dir: Path = Path("data/captions"),
                       models_dir: Path = Path("models"),
                       metrics_dir: Path = Path("reports/metrics"),
                       plots_dir: Path = Path("reports/plots"),
                       gap_dir: Path = Path("data/gap")) -> dict:
    e, t = params.evaluate, params.train
    constants = load_constants(shards_dir / "constants.safetensors")
    reader = ShardReader(shards_dir / "test")
    world = World.of(params.base.clip, params.base.sd)
    image_prompts = world is not None and e.image_prompts > 0
    encoders = load_encoders(params, models_dir, gap_dir if image_prompts else None)
    clip = encoders[REFERENCE].clip
    models = {name: encoder.deprojector for name, encoder in encoders.items()
              if encoder.deprojector is not None}
    pairs = combination_pairs(read_split(captions_dir, "test"), e.combination_pairs,
                              e.seed, clip)
    combination = combination_scores(models, pairs, clip, constants["null"]) if pairs else {}

    results, curves = {}, {}
    for name in tqdm([NULL_BASELINE, *params.models], desc="evaluate", unit="model"):
        model = models.get(name)
        metrics, curves[name] = score_model(model, reader, constants, e.batch_size,
                                            t.mask_weight)
        if name in combination:
            metrics["combination"] = combination[name]
        results[name] = metrics
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for name, metrics in results.items():
        write_json(metrics_dir / f"{name}.json", metrics)
    plots_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"position": i + 1, **{n: c[i] for n, c in curves.items()}}
            for i in range(MAX_LENGTH - 1)]
    write_json(plots_dir / "cosine_per_position.json", rows, indent=1)
    pictures = run_pictures(params, encoders, world)
    for name in (ADHERENCE, IMAGE_PROMPTS):
        (metrics_dir / f"{name}.json").unlink(missing_ok=True)
        if name in pictures:
            results[name] = pictures[name]
            write_json(metrics_dir / f"{name}.json", pictures[name])
    return results


def run_pictures(params: Params, encoders: dict[str, PromptEncoder],
                 world: World | None) -> dict:
    """Pictures of held-out prompts and of drawn scenes as prompts (the world only), judged:
    see pipeline/adherence.py."""
    e = params.evaluate
    image_prompts = world is not None and e.image_prompts > 0
    if not e.adherence_prompts and not image_prompts:
        return {}
    pipe = load_pipeline(params.base.sd, params.render)
    scorer = Scorer.load(params.base.clip, world)
    single, multi = params.render.prompts(world is not None)
    exclude = set(single) | set(multi)
    results = {}
    if e.adherence_prompts:
        results[ADHERENCE] = evaluate_adherence(params, encoders, pipe, scorer, exclude)
    if image_prompts:
        results[IMAGE_PROMPTS] = evaluate_image_prompts(params, encoders, pipe, scorer, world,
                                                        exclude)
    return results
