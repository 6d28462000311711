"""Does a picture show what its prompt asks for? The judge's adherence and the CLIP score.

- CLIP score (any base CLIP, the real CLIP-L included): 100 x max(0, cos(image_embeds,
  text_embeds)) with the base CLIP's own towers, the definition SD papers and torchmetrics use.
- Adherence (the embedded world only): the fraction of the attributes the prompt states
  (background colour, each object's colour and shape) that the world's judge finds.

`evaluate_adherence` scores held-out world prompts, single-embedding and comma-combined, for
the reference row (ordinary CLIP states) and every deprojector, all from the same seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.base_models import BASE_DIR, BUILTIN, MAX_LENGTH, ClipText, resolve
from pipeline.generation import generate_images
from pipeline.image_prompts import ImageTower, ModalityGap
from pipeline.models import Deprojector
from pipeline.params import Params
from pipeline.prompts import conditioning, negative_conditioning
from pipeline.world import scenes as world
from pipeline.world.judge import Judge

REFERENCE = "reference"
KINDS = ("single", "multi")  # whole prompt deprojected; comma-separated parts combined


@dataclass
class Scorer:
    """The base CLIP's two towers (CLIP score) and, for the builtin world, the judge."""

    model: object  # transformers.CLIPModel
    processor: object  # transformers.CLIPImageProcessor
    tokenizer: object
    judge: Judge | None

    @classmethod
    def load(cls, base_clip: str, base_sd: str, base_dir: Path = BASE_DIR) -> Scorer:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        source = resolve(base_clip, "clip", base_dir)
        judge = Judge.from_pretrained(base_dir / "judge") \
            if base_clip == BUILTIN and base_sd == BUILTIN else None
        return cls(CLIPModel.from_pretrained(source).eval(),
                   CLIPImageProcessor.from_pretrained(source),
                   CLIPTokenizer.from_pretrained(source), judge)

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


def held_out_scenes(count: int, seed: int, exclude: set[str]) -> list[world.Scene]:
    """`count` fresh scenes whose full descriptions (`describe`) are not in `exclude`."""
    rng = random.Random(f"adherence-{seed}")
    scenes: list[world.Scene] = []
    while len(scenes) < count:
        scene = world.random_scene(rng)
        if describe(scene, " ") not in exclude and describe(scene, ", ") not in exclude:
            scenes.append(scene)
    return scenes


def describe(scene: world.Scene, separator: str) -> str:
    """Every object's colour and shape, then the background, as tags joined by `separator`."""
    tags = [f"{t.color} {t.shape}" for t in scene.things]
    return separator.join([*tags, f"{scene.background} background"])


def held_out_prompts(count: int, seed: int, exclude: set[str]) -> dict[str, list[str]]:
    """`count` prompts per kind describing fresh scenes in full: as tags without commas
    (single) and with commas (multi)."""
    scenes = held_out_scenes(count, seed, exclude)
    return {"single": [describe(s, " ") for s in scenes],
            "multi": [describe(s, ", ") for s in scenes]}


def conditionings(prompts: list[str], clip: ClipText, model: Deprojector | None,
                  combine: bool) -> torch.Tensor:
    return torch.cat([conditioning(p, clip, model, combine)[0].float() for p in prompts])


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


def evaluate_adherence(params: Params, clip: ClipText, models: dict[str, Deprojector], pipe,
                       scorer: Scorer, exclude: set[str]) -> dict[str, dict]:
    """{kind: {row: summary}} over `evaluate.adherence_prompts` held-out prompts per kind."""
    e = params.evaluate
    prompts = held_out_prompts(e.adherence_prompts, e.seed, exclude)
    seeds = prompt_seeds(e.seed, e.adherence_prompts)
    negative = negative_conditioning(clip)
    result: dict[str, dict] = {}
    rows = {REFERENCE: None, **models}
    for kind in KINDS:
        texts = prompts[kind]
        objects = [len(world.parse_prompt(p).objects) for p in texts]
        summary = {}
        for name, model in tqdm(rows.items(), desc=f"adherence {kind}", unit="row"):
            embeds = conditionings(texts, clip, model, combine=kind == "multi")
            images = generate_images(pipe, embeds, negative, params.render, seeds)
            summary[name] = summarise(scorer.score(images, texts), objects)
        result[kind] = with_ratios(summary)
    return result


def evaluate_image_prompts(params: Params, clip: ClipText, models: dict[str, Deprojector],
                           pipe, scorer: Scorer, tower: ImageTower, gap: ModalityGap,
                           exclude: set[str]) -> dict[str, dict]:
    """Drawn held-out scenes as the only prompt, judged against their descriptions.

    Per run: `text` (the description's pooled embedding deprojected: the baseline), `image`
    (the scene through the vision tower, gap-corrected) and `image_no_gap` (uncorrected), and
    image_to_text = image adherence / text adherence; `reference`: the description's
    ordinary CLIP states. Same scenes and noise seeds for every row.
    """
    from pipeline.prompt_encoder import PromptEncoder

    e = params.evaluate
    scenes = held_out_scenes(e.image_prompts, e.seed + 1, exclude)
    texts = [describe(scene, " ") for scene in scenes]
    rng = random.Random(e.seed)
    drawn = [Image.fromarray(world.draw(scene, [(rng.uniform(-1, 1), rng.uniform(-1, 1))
                                                for _ in scene.things])) for scene in scenes]
    objects = [len(scene.things) for scene in scenes]
    seeds = prompt_seeds(e.seed + 1, len(scenes))
    negative = negative_conditioning(clip)

    def judged(embeds: torch.Tensor) -> dict[str, float]:
        images = generate_images(pipe, embeds, negative, params.render, seeds)
        return summarise(scorer.score(images, texts), objects)

    result = {REFERENCE: {"text": judged(conditionings(texts, clip, None, combine=False))}}
    for name, model in tqdm(models.items(), desc="image prompts", unit="model"):
        encoder = PromptEncoder(clip, model, tower, gap)
        rows = {"text": judged(conditionings(texts, clip, model, combine=False))}
        for key, correct in (("image", True), ("image_no_gap", False)):
            rows[key] = judged(model.generate(encoder.image_embedding(drawn, correct)))
        if rows["text"].get("adherence"):
            rows["image_to_text"] = rows["image"]["adherence"] / rows["text"]["adherence"]
        result[name] = rows
    return result
