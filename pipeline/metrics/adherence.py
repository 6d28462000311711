"""Does a picture show what its prompt asks for? The judge's adherence and the CLIP score.

- CLIP score (any base CLIP, the real CLIP-L included): 100 x max(0, cos(image_embeds,
  text_embeds)) with the base CLIP's own towers, the definition SD papers and torchmetrics use.
- Adherence (the embedded world only): the fraction of the attributes the prompt states
  (background colour, each object's colour and shape) that the world's judge finds.

`evaluate_adherence` scores held-out world prompts, single-embedding and comma-combined, for
the reference row (ordinary CLIP states) and every deprojector, all from the same seeds. Every
mean over prompts comes with its 95 % bootstrap interval over the prompts
(pipeline/metrics/intervals.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.base.loaders import base_source
from pipeline.config.params import Params
from pipeline.core.conventions import MAX_LENGTH
from pipeline.core.names import BRIDGES, REFERENCE
from pipeline.metrics.intervals import ci_key, interval, mean_with_ci, ratio_of_sums, ratio_with_ci
from pipeline.metrics.records import (
    ADHERENCE,
    ALL_PARTS,
    CLIP_SCORE,
    IMAGE_TO_TEXT,
    PICTURE_SCORES,
    PROMPTS,
    AdherenceResults,
    HeldOutScores,
    ImagePromptResults,
    Kind,
    PictureScores,
    Summary,
)
from pipeline.prompting.encoder import PromptEncoder
from pipeline.sampling.sd import generate_pixels
from pipeline.world.embedded import World
from pipeline.world.judge import Images, Judge
from pipeline.world.scenes import IMAGE_SIZE

KINDS: tuple[Kind, ...] = ("single", "multi")  # whole prompt deprojected; comma parts combined


@dataclass
class Scorer:
    """The base CLIP's two towers (CLIP score) and, for the builtin world, the judge.

    Images are PIL images or uint8 arrays [N, H, W, 3] (`generate_pixels`' pictures, judged
    without a PIL round trip); each prompt's text features are computed once and kept."""

    # Any: transformers' classes (CLIPModel, CLIPImageProcessor, CLIPTokenizer) are typed
    # too loosely for their call results to be checked here.
    model: Any
    processor: Any
    tokenizer: Any
    judge: Judge | None
    texts: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt -> text features
    batch: int = 512  # images per pass of the vision tower

    @classmethod
    def load(cls, base_clip: str, world: World | None) -> Scorer:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        source = base_source(base_clip, "clip")
        judge = Judge.from_pretrained(world.judge_folder) if world else None
        return cls(
            CLIPModel.from_pretrained(source).eval(),
            CLIPImageProcessor.from_pretrained(source),
            CLIPTokenizer.from_pretrained(source),
            judge,
        )

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """[N, P]: the normalised text features of each prompt (computed once per prompt)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.texts]
        if new:
            ids = self.tokenizer(
                new,
                padding="max_length",
                max_length=MAX_LENGTH,
                truncation=True,
                return_tensors="pt",
            )["input_ids"]
            text = F.normalize(self.model.get_text_features(input_ids=ids).pooler_output, dim=-1)
            self.texts.update(zip(new, text, strict=True))
        return torch.stack([self.texts[p] for p in prompts])

    @torch.inference_mode()
    def clip_scores(self, images: Images, prompts: list[str]) -> list[float]:
        scores = []
        for begin in range(0, len(prompts), self.batch):
            chunk = images[begin : begin + self.batch]
            size = self.processor.crop_size
            if isinstance(chunk, np.ndarray) and chunk.shape[1:3] != (
                size["height"],
                size["width"],
            ):
                chunk = as_pil(chunk)  # resized as PIL images always were
            pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"]
            image = F.normalize(
                self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1
            )
            text = self.text_features(prompts[begin : begin + self.batch])
            scores += (100 * (image * text).sum(-1).clamp(min=0)).tolist()
        return scores

    def adherence(self, images: Images, prompts: list[str]) -> list[float] | None:
        if self.judge is None:
            return None
        if isinstance(images, np.ndarray) and images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
            images = as_pil(images)  # the judge resizes PIL images to its size
        return self.judge.adherence(images, prompts)

    def score(self, images: Images, prompts: list[str]) -> list[PictureScores]:
        """Per image: clip_score, and adherence where a judge is available."""
        clip = self.clip_scores(images, prompts)
        adherence = self.adherence(images, prompts)
        if adherence is None:
            return [PictureScores(clip_score=c) for c in clip]
        return [
            PictureScores(clip_score=c, adherence=a) for c, a in zip(clip, adherence, strict=True)
        ]


def as_pil(images: np.ndarray) -> list[Image.Image]:
    """uint8 [N, H, W, 3] as PIL images."""
    return [Image.fromarray(image) for image in images]


def column(scores: Sequence[Mapping[str, object]], key: str) -> np.ndarray:
    """[prompts]: one score of every prompt."""
    return np.array([s[key] for s in scores], dtype=np.float64)


def summarise(scores: list[PictureScores], objects: list[int], seed: int = 0) -> Summary:
    """Means over prompts, each with its interval over resampled prompts (KEY_ci95);
    `all_parts`: how often every stated attribute was found; and the mean adherence of
    prompts with 1, 2, 3 objects."""
    out: Summary = {
        **mean_with_ci(CLIP_SCORE, column(scores, CLIP_SCORE), seed),
        PROMPTS: len(scores),
    }
    if scores and ADHERENCE in scores[0]:
        adherence = column(scores, ADHERENCE)
        out |= mean_with_ci(ADHERENCE, adherence, seed)
        out |= mean_with_ci(ALL_PARTS, adherence == 1.0, seed)
        out |= by_object_count(adherence, objects, seed)
    return out


def objects_key(k: int) -> str:
    """`1_object`, `2_objects`, ...: how results name prompts that state k objects."""
    return f"{k}_object{'s' if k > 1 else ''}"


def by_object_count(adherence: np.ndarray, objects: list[int], seed: int = 0) -> Summary:
    """`adherence_K_object(s)` (with its interval) over the prompts stating K objects, for each
    K in `objects` (one count per prompt)."""
    out: Summary = {}
    for k in sorted(set(objects)):
        out |= mean_with_ci(
            f"{ADHERENCE}_{objects_key(k)}", adherence[np.array(objects) == k], seed
        )
    return out


Row = TypeVar("Row", bound=MutableMapping[str, Any])  # a row's means (and what it adds)


def with_ratios(
    rows: dict[str, Row], per_prompt: dict[str, list[PictureScores]] | None = None, seed: int = 0
) -> dict[str, Row]:
    """Adds each row's ratio to the reference row (adherence and CLIP score); given every
    row's per-prompt scores, with its interval: Σ row / Σ reference over the same resampled
    prompts."""
    reference = rows[REFERENCE]
    for name, scores in rows.items():
        for key in PICTURE_SCORES:
            value, against = scores.get(key), reference.get(key)
            if isinstance(value, int | float) and isinstance(against, int | float) and against:
                scores[f"{key}_ratio"] = value / against
                if per_prompt is not None:
                    scores[ci_key(f"{key}_ratio")] = interval(
                        ratio_of_sums,
                        [column(per_prompt[name], key), column(per_prompt[REFERENCE], key)],
                        seed,
                    )
    return rows


def prompt_seeds(seed: int, count: int) -> list[int]:
    """The noise seed of each held-out prompt: the same for every row."""
    return [seed * 100_000 + i for i in range(count)]


def judged(
    pipe,
    conditioning: torch.Tensor,
    negative: torch.Tensor,
    params: Params,
    seeds: list[int],
    scorer: Scorer,
    prompts: list[str],
) -> list[PictureScores]:
    """Generate one picture per row of conditioning [N, 77, D]; each picture's scores."""
    images = generate_pixels(pipe, conditioning, negative, params.render, seeds)
    return scorer.score(images, prompts)


def judged_rows(
    pipe,
    conditionings: dict[str, torch.Tensor],
    negative: torch.Tensor,
    params: Params,
    seeds: list[int],
    scorer: Scorer,
    prompts: list[str],
) -> dict[str, list[PictureScores]]:
    """`judged` of every row's conditioning [N, 77, D] (the same prompts and seeds in each),
    all rows' pictures drawn in shared UNet batches: {row: each picture's scores}."""
    names, n = list(conditionings), len(prompts)
    scores = judged(
        pipe,
        torch.cat([conditionings[name].float() for name in names]),
        negative,
        params,
        seeds * len(names),
        scorer,
        prompts * len(names),
    )
    return {name: scores[k * n : (k + 1) * n] for k, name in enumerate(names)}


# A baseline row of the adherence table: (prompts, kind) -> their conditioning [N, 77, D], or
# None where the baseline has no row of that kind.
BaselineRow = Callable[[list[str], Kind], torch.Tensor | None]


def evaluate_adherence(
    params: Params,
    encoders: dict[str, PromptEncoder],
    pipe,
    scorer: Scorer,
    exclude: set[str],
    baselines: Mapping[str, BaselineRow] | None = None,
) -> tuple[AdherenceResults, HeldOutScores]:
    """{kind: {row: summary}} over `evaluate.adherence_prompts` held-out prompts per kind,
    and {kind: {row: per-prompt scores}} (the same prompts, in the same order, in every row);
    encoders: the reference row's (no deprojector) first, then each run's; baselines: rows
    after the runs' (e.g. retrieval, blend)."""
    e = params.evaluate
    prompts = World.held_out_prompts(e.adherence_prompts, e.seed, exclude, distinct=True)
    seeds = prompt_seeds(e.seed, e.adherence_prompts)
    negative = encoders[REFERENCE].encode_negative("", deproject=False)
    result: AdherenceResults = {}
    per_prompt: HeldOutScores = {}
    for kind in KINDS:
        texts = prompts[kind]
        objects = [World.objects(p) for p in texts]
        conditionings = {
            name: encoder.encode_prompts(
                texts, combine=kind == "multi", deproject=name != REFERENCE
            )
            for name, encoder in tqdm(encoders.items(), desc=f"adherence {kind}", unit="row")
        }
        for name, row in (baselines or {}).items():
            states = row(texts, kind)
            if states is not None:
                conditionings[name] = states
        scores = judged_rows(pipe, conditionings, negative, params, seeds, scorer, texts)
        summary = {name: summarise(s, objects, e.seed) for name, s in scores.items()}
        result[kind] = with_ratios(summary, scores, e.seed)
        per_prompt[kind] = scores
    return result, per_prompt


def evaluate_image_prompts(
    params: Params,
    encoders: dict[str, PromptEncoder],
    pipe,
    scorer: Scorer,
    world: World,
    exclude: set[str],
) -> ImagePromptResults:
    """Drawn held-out scenes as the only prompt, judged against their descriptions.

    Per run: `text` (the description's pooled embedding deprojected: the baseline), `image`
    (the scene through the vision tower and the run's bridge, gap.bridge) with image_to_text
    = image adherence / text adherence (its interval: both means over the same resampled
    scenes), and with evaluate.bridges `all`, `bridges`: the same for every bridge of BRIDGES
    side by side (the run's own among them); `reference`: the description's ordinary CLIP
    states. Same scenes and noise seeds for every row.
    """
    e = params.evaluate
    scenes = world.held_out_scenes(e.image_prompts, e.seed + 1, exclude, distinct=True)
    texts = [world.describe(scene, " ") for scene in scenes]
    drawn = world.draw(scenes, e.seed)
    seeds = prompt_seeds(e.seed + 1, len(scenes))
    objects = [World.objects(text) for text in texts]
    reference = encoders[REFERENCE]
    negative = reference.encode_negative("", deproject=False)

    def score(conditioning: torch.Tensor) -> list[PictureScores]:
        return judged(pipe, conditioning, negative, params, seeds, scorer, texts)

    def with_ratio(scores: list[PictureScores], text: list[PictureScores]) -> Summary:
        summary = summarise(scores, objects, e.seed)
        if any(s.get(ADHERENCE) for s in text):
            summary |= ratio_with_ci(
                IMAGE_TO_TEXT, column(scores, ADHERENCE), column(text, ADHERENCE), e.seed
            )
        return summary

    text = score(reference.encode_prompts(texts, deproject=False))
    result: ImagePromptResults = {REFERENCE: {"text": summarise(text, objects, e.seed)}}
    runs = {name: encoder for name, encoder in encoders.items() if name != REFERENCE}
    judged_bridges = BRIDGES if e.bridges == "all" else (params.gap.bridge,)
    for name, encoder in tqdm(runs.items(), desc="image prompts", unit="model"):
        conditionings = {
            kind: encoder.deproject(encoder.image_embedding(drawn, kind)) for kind in judged_bridges
        }
        scored = judged_rows(
            pipe,
            {"text": encoder.encode_prompts(texts, combine=False), **conditionings},
            negative,
            params,
            seeds,
            scorer,
            texts,
        )
        text = scored.pop("text")
        bridges = {kind: with_ratio(scored[kind], text) for kind in judged_bridges}
        own = bridges[params.gap.bridge]
        result[name] = {
            "text": summarise(text, objects, e.seed),
            "image": {k: v for k, v in own.items() if not k.startswith(IMAGE_TO_TEXT)},
            **{k: v for k, v in own.items() if k.startswith(IMAGE_TO_TEXT)},
            "bridge": params.gap.bridge,
        }
        if e.bridges == "all":
            result[name]["bridges"] = bridges
    return result
