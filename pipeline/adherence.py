"""Does a picture show what its prompt asks for? The judge's adherence and the CLIP score.

- CLIP score (any base CLIP, the real CLIP-L included): 100 x max(0, cos(image_embeds,
  text_embeds)) with the base CLIP's own towers, the definition SD papers and torchmetrics use.
- Adherence (the embedded world only): the fraction of the attributes the prompt states
  (background colour, each object's colour and shape) that the world's judge finds.

`evaluate_adherence` scores held-out world prompts, single-embedding and comma-combined, for
the reference row (ordinary CLIP states) and every deprojector, all from the same seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.base_models import base_source
from pipeline.conventions import MAX_LENGTH
from pipeline.generation import generate_images
from pipeline.names import REFERENCE
from pipeline.params import Params
from pipeline.prompt_encoder import PromptEncoder
from pipeline.world.embedded import World
from pipeline.world.judge import Judge

KINDS = ("single", "multi")  # whole prompt deprojected; comma-separated parts combined


@dataclass
class Scorer:
    """The base CLIP's two towers (CLIP score) and, for the builtin world, the judge."""

    model: object  # transformers.CLIPModel
    processor: object  # transformers.CLIPImageProcessor
    tokenizer: object
    judge: Judge | None

    @classmethod
    def load(cls, base_clip: str, world: World | None) -> Scorer:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        source = base_source(base_clip, "clip")
        return cls(CLIPModel.from_pretrained(source).eval(),
                   CLIPImageProcessor.from_pretrained(source),
                   CLIPTokenizer.from_pretrained(source), world.judge if world else None)
    @torch.no_grad()
    def clip_scores(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                             return_tensors="pt")["input_ids"]
        image = F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output,
                            dim=-1)
        text = F.normalize(self.model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        return (100 * (image * text).sum(-1).clamp(min=0)).tolist()

    def adherence(self, images: list[Image.Image], prompts: list[str]) -> list[float] | None:
        return None if self.judge is None else self.judge.adherence(images, prompts)

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[dict[str, float]]:
        """Per image: clip_score, and adherence where a judge is available."""
        clip = self.clip_scores(images, prompts)
        adherence = self.adherence(images, prompts)
        return [{"clip_score": c, **({} if adherence is None else {"adherence": a})}
                for c, a in zip(clip, adherence or [None] * len(clip), strict=True)]


def summarise(scores: list[dict[str, float]], objects: list[int]) -> dict[str, float]:
    """Means over prompts; `all_parts`: how often every stated attribute was found; and the
    mean adherence of prompts with 1, 2, 3 objects."""
    out = {"clip_score": float(np.mean([s["clip_score"] for s in scores])),
           "prompts": len(scores)}
    if scores and "adherence" in scores[0]:
        out["adherence"] = float(np.mean([s["adherence"] for s in scores]))
        out["all_parts"] = float(np.mean([s["adherence"] == 1.0 for s in scores]))
        for k in sorted(set(objects)):
            picked = [s["adherence"] for s, n in zip(scores, objects, strict=True) if n == k]
            out[f"adherence_{k}_object{'s' if k > 1 else ''}"] = float(np.mean(picked))
    return out


def with_ratios(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Adds each row's ratio to the reference row (adherence and CLIP score)."""
    reference = rows[REFERENCE]
    for scores in rows.values():
        for key in ("adherence", "clip_score"):
            if key in scores and reference.get(key):
                scores[f"{key}_ratio"] = scores[key] / reference[key]
    return rows


def prompt_seeds(seed: int, count: int) -> list[int]:
    """The noise seed of each held-out prompt: the same for every row."""
    return [seed * 100_000 + i for i in range(count)]


def judged(pipe, conditioning: torch.Tensor, negative: torch.Tensor, params: Params,
           seeds: list[int], scorer: Scorer, prompts: list[str]) -> dict[str, float]:
    """Generate one picture per row of conditioning [N, 77, D] and summarise its scores."""
    images = generate_images(pipe, conditioning, negative, params.render, seeds)
    objects = [World.objects(p) for p in prompts]
    return summarise(scorer.score(images, prompts), objects)


def evaluate_adherence(params: Params, encoders: dict[str, PromptEncoder], pipe,
                       scorer: Scorer, exclude: set[str]) -> dict[str, dict]:
    """{kind: {row: summary}} over `evaluate.adherence_prompts` held-out prompts per kind;
    encoders: the reference row's (no deprojector) first, then each run's."""
    e = params.evaluate
    prompts = World.held_out_prompts(e.adherence_prompts, e.seed, exclude)
    seeds = prompt_seeds(e.seed, e.adherence_prompts)
    negative = encoders[REFERENCE].encode_negative("", deproject=False)
    result: dict[str, dict] = {}
    for kind in KINDS:
        texts = prompts[kind]
        summary = {}
        for name, encoder in tqdm(encoders.items(), desc=f"adherence {kind}", unit="row"):
            conditioning = encoder.encode_prompts(texts, combine=kind == "multi",
                                                  deproject=name != REFERENCE)
            summary[name] = judged(pipe, conditioning, negative, params, seeds, scorer, texts)
        result[kind] = with_ratios(summary)
    return result


def evaluate_image_prompts(params: Params, encoders: dict[str, PromptEncoder], pipe,
                           scorer: Scorer, world: World, exclude: set[str]) -> dict[str, dict]:
    """Drawn held-out scenes as the only prompt, judged against their descriptions.

    Per run: `text` (the description's pooled embedding deprojected: the baseline), `image`
    (the scene through the vision tower, gap-corrected) and `image_no_gap` (uncorrected), and
    image_to_text = image adherence / text adherence; `reference`: the description's
    ordinary CLIP states. Same scenes and noise seeds for every row.
    """
    e = params.evaluate
    scenes = world.held_out_scenes(e.image_prompts, e.seed + 1, exclude)
    texts = [world.describe(scene, " ") for scene in scenes]
    drawn = world.draw(scenes, e.seed)
    seeds = prompt_seeds(e.seed + 1, len(scenes))
    reference = encoders[REFERENCE]
    negative = reference.encode_negative("", deproject=False)

    def score(conditioning: torch.Tensor) -> dict[str, float]:
        return judged(pipe, conditioning, negative, params, seeds, scorer, texts)

    result = {REFERENCE: {"text": score(reference.encode_prompts(texts, deproject=False))}}
    runs = {name: encoder for name, encoder in encoders.items() if name != REFERENCE}
    for name, encoder in tqdm(runs.items(), desc="image prompts", unit="model"):
        rows = {"text": score(encoder.encode_prompts(texts, combine=False))}
        for key, correct in (("image", True), ("image_no_gap", False)):
            rows[key] = score(encoder.deproject(encoder.image_embedding(drawn, correct)))
        if rows["text"].get("adherence"):
            rows["image_to_text"] = rows["image"]["adherence"] / rows["text"]["adherence"]
        result[name] = rows
    return result
