"""Typed view of `params.yaml`, validated when a stage starts so bad values fail by key name."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.conventions import BUILTIN
from pipeline.core.names import BRIDGES, RESERVED_RUN_NAMES
from pipeline.core.sections import ParamsError, check, read_params_file, section
from pipeline.world.config import WorldParams

STORAGE_DTYPES = ("float16", "float32")
# What extraction computes in. float64 rounds to the stored dtype identically on any CPU: a
# float32 forward differs between machines in the last bits (their BLAS and vector kernels),
# and those differences survive rounding to float16 in about one value in a thousand.
IMAGE_PROMPT_BRIDGES = ("own", "all")  # evaluate.bridges
COMPUTE_DTYPES = ("float64", "float32", "float16", "bfloat16")
PRECISIONS = ("fp32", "bf16", "fp16")
# train.loss: the position-weighted squared error of the states, the same error in the space
# of the base UNet's cross-attention keys and values, or their mean
# (pipeline/metrics/cross_attention.py); or the base UNet's guided noise prediction under the
# generated states against the true states' (pipeline/metrics/unet_loss.py).
LOSSES = ("states", "cross_attention", "mix", "unet")


@dataclass(frozen=True)
class BaseParams:
    clip: str = "builtin"
    sd: str = "builtin"


@dataclass(frozen=True)
class CaptionParams:
    source: str = "builtin"
    column: str = "text"
    hub_split: str = "train"
    train_size: int = 3000
    test_size: int = 200
    seed: int = 0


@dataclass(frozen=True)
class AugmentParams:
    split: float = 0.3
    combine: float = 0.3
    # Training rows whose input is an image of paired data (gap.source) bridged to text space
    # (gap.bridge) and whose target is its caption's states; the test split gains as many.
    image: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class ExtractParams:
    batch_size: int = 64
    dtype: str = "float16"
    compute_dtype: str = "float64"
    rows_per_shard: int = 1000
    device: str = "cpu"
    num_workers: int = 1
    worker_index: int = 0
    # The CLIP layer of the targets, diffusers' count: 0 the last layer, 1 the penultimate
    # (A1111's "clip skip 2"), after the final LayerNorm (pipeline.base.clip_encode). Models
    # trained on these shards record it; render, evaluate, encode and generate use it.
    clip_skip: int = 0


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 8
    batch_size: int = 100
    lr: float = 1e-3
    mask_weight: float = 25.0
    seed: int = 0
    patience: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    resume: bool = True
    # Free-running training: after the teacher-forced pass, this many more passes feed the
    # model its own (detached) predictions; after k passes positions 1..k+1 see exactly what
    # generation feeds them. The loss averages all passes. 0 = teacher forcing (the article).
    rollout: int = 0
    # What the error is measured in: states | cross_attention | mix | unet (LOSSES).
    loss: str = "states"
    # A fine-tune through the frozen base UNet (the `unet` loss) for this many epochs after the
    # `epochs` of `loss`, from their best epoch, at learning rate `unet_lr`. 0 = none.
    unet_epochs: int = 0
    unet_lr: float = 1e-4
    # Rows of each batch the `unet` loss reads (the first of the shuffled batch): its cost is a
    # run of the sampler per step, so it reads fewer rows than the states loss.
    unet_rows: int = 20
    # Exposure bias: the largest share of a batch's rows whose inputs are the model's own
    # generated states instead of the true ones (scheduled sampling with the model's own
    # prefixes), reached linearly over the epochs. 0 = teacher forcing.
    scheduled_sampling: float = 0.0


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 100
    combination_pairs: int = 100
    seed: int = 0
    # Held-out prompts per kind (single, comma-combined) whose pictures are judged; 0 = off.
    adherence_prompts: int = 48
    # Held-out drawn scenes used as image prompts and judged against their captions; 0 = off.
    image_prompts: int = 48
    # Image prompts through the run's own bridge (gap.bridge) or through every bridge of
    # BRIDGES side by side (`all`: 2.5 times the image-prompt pictures).
    bridges: str = "own"


@dataclass(frozen=True)
class GapParams:
    """Paired images and captions (the `gap` stage's bridge statistics and the image rows of
    `extract`) and the bridge from image to text space."""

    pairs: int = 1000  # image/caption pairs the bridge is fitted on
    seed: int = 7  # world scenes of a seed no world part trains on (builtin base)
    # Real CLIP: a folder of NAME.png/.jpg + NAME.txt pairs, or a `datasets` hub id with an
    # image and a text column (hub_split).
    source: str = "data/gap-pairs"
    image_column: str = "image"
    text_column: str = "text"
    hub_split: str = "train"
    bridge: str = "mean-shift"  # none | mean-shift | linear | text-projection
    bank: int = 2048  # training captions whose text embeddings text-projection combines
    temperature: float = 0.01  # text-projection's softmax temperature (cosine units)


# A run name is a folder name (models/NAME, reports/metrics/NAME.json), a word of a shell
# command (`deprojector train NAME`), a dvc.yaml stage key (train@NAME) and a params key DVC
# addresses with dots (models.NAME, `dvc exp run -S models.NAME.lr=...`). DVC refuses
# punctuation other than '_' and '-' in stage names; '.' splits the params key, '@' and ':'
# split stage targets (`dvc.yaml:train@NAME`), '/' makes a subfolder. So: letters, digits,
# '_' and '-'. pipeline.core.names lists the names other outputs and rows take.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
RUN_NAME_RULE = (
    "letters, digits, '_' and '-', starting with a letter or digit (DVC "
    "addresses a run as the stage train@NAME and the param models.NAME: '.' would "
    "split the key, '@', ':', '/', spaces and other punctuation the stage name)"
)


@dataclass(frozen=True)
class ModelSpec:
    """One entry of `models:`: a registered architecture and its hyperparameters, or a
    composite (`ensemble`) and its `members`, run names of other entries."""

    type: str
    hparams: dict[str, Any] = field(default_factory=dict)
    # `train:` settings of this run only (e.g. {rollout: 2}); the others come from `train:`.
    train: dict[str, Any] = field(default_factory=dict)


# The grid prompts of the embedded world, mirroring the article's three pairs: two words
# that make one thing; one thing with several attributes; two things and a place.
WORLD_PROMPTS_SINGLE = (
    "red circle",
    "big yellow star black background",
    "red circle blue square white background",
)
WORLD_PROMPTS_MULTI = (
    "red, circle",
    "big, yellow star, black background",
    "red circle, blue square, white background",
)
# The article's comparison prompts (SPEC §4), for real base models.
ARTICLE_PROMPTS_SINGLE = (
    "cat maid",
    "1girl red hair blue eye black skirt",
    "1boy 1girl in class room",
)
ARTICLE_PROMPTS_MULTI = (
    "cat, maid",
    "1girl, red hair, blue eye, black skirt",
    "1boy, 1girl, in class room",
)
PROMPT_SETS = ("auto", "world", "article")
MAX_STEPS = 1000  # SD's (and the world's) num_train_timesteps: no scheduler takes more
# Far beyond any useful scale (7.5 is SD's default); the latents overflow to NaN (a black
# picture) long before float32's limit.
MAX_GUIDANCE = 1000.0
MAX_SIDE = 8192  # px: 64 Mpx, under Pillow's 89 Mpx limit for the picture written
SCHEDULERS = {  # render.scheduler -> diffusers class
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


@dataclass(frozen=True)
class RenderParams:
    # Lists, not tuples: the values come from YAML lists and are type-checked against these.
    prompt_set: str = "auto"  # world | article | auto (world with the builtin base models)
    world_prompts_single: list[str] = field(default_factory=lambda: list(WORLD_PROMPTS_SINGLE))
    world_prompts_multi: list[str] = field(default_factory=lambda: list(WORLD_PROMPTS_MULTI))
    article_prompts_single: list[str] = field(default_factory=lambda: list(ARTICLE_PROMPTS_SINGLE))
    article_prompts_multi: list[str] = field(default_factory=lambda: list(ARTICLE_PROMPTS_MULTI))
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    height: int = 32
    width: int = 32
    scheduler: str = "pndm"
    device: str = "cpu"
    # The run shown in the grid's image-prompt row (`first`: the first entry of `models`).
    # World prompts only: it needs drawn scenes and the judge.
    showcase_model: str = "first"
    interpolation_from: str = "red circle"
    interpolation_to: str = "blue square"
    interpolation_steps: int = 9  # t = 0, 1/(n-1), ..., 1
    interpolation_seeds: int = 8  # images per t, judged and averaged
    interpolation_slerp: bool = True  # spherical around null (else linear)

    def showcase(self, models: list[str]) -> str:
        return self.showcase_model if self.showcase_model in models else models[0]

    def world_prompts(self, world: bool) -> bool:
        """Are the grid prompts the world's (`auto`: when the base models are the world)?"""
        return self.prompt_set == "world" or (self.prompt_set == "auto" and world)

    def prompts(self, world: bool) -> tuple[list[str], list[str]]:
        """The (single, multi) grid prompts, `world`: the base models are the world's."""
        if self.world_prompts(world):
            return self.world_prompts_single, self.world_prompts_multi
        return self.article_prompts_single, self.article_prompts_multi


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    world: WorldParams = field(default_factory=WorldParams)
    captions: CaptionParams = field(default_factory=CaptionParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    render: RenderParams = field(default_factory=RenderParams)
    gap: GapParams = field(default_factory=GapParams)
    # Run name -> architecture and hyperparameters: every entry is trained, scored, rendered.
    models: dict[str, ModelSpec] = field(default_factory=dict)


def _check_render(r: RenderParams) -> None:
    check(r.prompt_set in PROMPT_SETS, "render.prompt_set", f"one of {PROMPT_SETS}", r.prompt_set)
    for key in (
        "world_prompts_single",
        "world_prompts_multi",
        "article_prompts_single",
        "article_prompts_multi",
    ):
        prompts = getattr(r, key)
        check(
            len(prompts) > 0
            and all(isinstance(p, str) and p.replace(",", " ").strip() for p in prompts),
            f"render.{key}",
            "a non-empty list of prompts with text",
            prompts,
        )
    check(r.seed >= 0, "render.seed", "0 or more", r.seed)
    # Every scheduler takes at most as many steps as the UNet was trained with timesteps.
    check(
        0 < r.steps <= MAX_STEPS,
        "render.steps",
        f"in [1, {MAX_STEPS}] (the schedulers' training timesteps)",
        r.steps,
    )
    check(
        math.isfinite(r.guidance_scale) and 0 <= r.guidance_scale <= MAX_GUIDANCE,
        "render.guidance_scale",
        f"a finite number in [0, {MAX_GUIDANCE:g}]",
        r.guidance_scale,
    )
    # The UNet halves the latent size per level; multiples of 8 work for SD and the builtin.
    for key in ("height", "width"):
        value = getattr(r, key)
        check(
            0 < value <= MAX_SIDE and value % 8 == 0,
            f"render.{key}",
            f"a positive multiple of 8, at most {MAX_SIDE}",
            value,
        )
    check(r.scheduler in SCHEDULERS, "render.scheduler", f"one of {tuple(SCHEDULERS)}", r.scheduler)
    check(
        r.interpolation_steps >= 2, "render.interpolation_steps", "2 or more", r.interpolation_steps
    )
    check(
        r.interpolation_seeds >= 1, "render.interpolation_seeds", "1 or more", r.interpolation_seeds
    )


def validate(p: Params) -> Params:
    c, a, e = p.captions, p.augment, p.extract
    # One rule for "is this the embedded world?" (pipeline.world.embedded.World.named).
    check(
        (p.base.clip == BUILTIN) == (p.base.sd == BUILTIN),
        "base",
        "`builtin` for both clip and sd (the embedded world) or for neither",
        {"clip": p.base.clip, "sd": p.base.sd},
    )
    p.world.validate()
    check(
        p.evaluate.adherence_prompts >= 0,
        "evaluate.adherence_prompts",
        "0 (off) or more",
        p.evaluate.adherence_prompts,
    )
    check(c.train_size > 0, "captions.train_size", "a positive integer", c.train_size)
    check(c.test_size > 0, "captions.test_size", "a positive integer", c.test_size)
    check(0.0 <= a.split <= 1.0, "augment.split", "in [0, 1]", a.split)
    check(0.0 <= a.combine <= 1.0, "augment.combine", "in [0, 1]", a.combine)
    check(0.0 <= a.image <= 1.0, "augment.image", "in [0, 1]", a.image)
    check(
        a.split + a.combine + a.image <= 1.0,
        "augment.split + augment.combine + augment.image",
        "at most 1",
        a.split + a.combine + a.image,
    )
    check(e.batch_size > 0, "extract.batch_size", "a positive integer", e.batch_size)
    check(e.rows_per_shard > 0, "extract.rows_per_shard", "a positive integer", e.rows_per_shard)
    check(e.num_workers > 0, "extract.num_workers", "a positive integer", e.num_workers)
    check(
        0 <= e.worker_index < e.num_workers,
        "extract.worker_index",
        f"in [0, extract.num_workers - 1 = {e.num_workers - 1}]",
        e.worker_index,
    )
    check(
        e.clip_skip >= 0,
        "extract.clip_skip",
        "0 (the last CLIP layer) or more (1: the penultimate)",
        e.clip_skip,
    )
    check(e.dtype in STORAGE_DTYPES, "extract.dtype", f"one of {STORAGE_DTYPES}", e.dtype)
    check(
        e.compute_dtype in COMPUTE_DTYPES,
        "extract.compute_dtype",
        f"one of {COMPUTE_DTYPES}",
        e.compute_dtype,
    )
    t = p.train
    check(t.epochs > 0, "train.epochs", "a positive integer", t.epochs)
    check(t.batch_size > 0, "train.batch_size", "a positive integer", t.batch_size)
    for key in ("lr", "mask_weight"):  # section() refuses .inf in YAML; here any source
        check(math.isfinite(getattr(t, key)), f"train.{key}", "a finite number", getattr(t, key))
    check(t.lr > 0, "train.lr", "positive", t.lr)
    check(t.mask_weight > 0, "train.mask_weight", "positive", t.mask_weight)
    check(t.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}", t.precision)
    check(t.patience >= 0, "train.patience", "0 (off) or a positive integer", t.patience)
    check(t.rollout >= 0, "train.rollout", "0 (teacher forcing) or more", t.rollout)
    check(
        t.loss in LOSSES,
        "train.loss",
        f"one of {LOSSES} (cross_attention and mix measure the error through base.sd's "
        "UNet cross-attention keys and values, unet through its noise prediction)",
        t.loss,
    )
    check(
        t.unet_epochs >= 0 and not (t.unet_epochs and t.loss == "unet"),
        "train.unet_epochs",
        "0, or the epochs of a fine-tune through the UNet after those of a train.loss "
        "other than unet",
        t.unet_epochs,
    )
    check(math.isfinite(t.unet_lr) and t.unet_lr > 0, "train.unet_lr", "positive", t.unet_lr)
    check(t.unet_rows > 0, "train.unet_rows", "a positive integer", t.unet_rows)
    check(
        0 <= t.scheduled_sampling <= 1,
        "train.scheduled_sampling",
        "a share of the rows in [0, 1]",
        t.scheduled_sampling,
    )
    check(
        p.evaluate.batch_size > 0,
        "evaluate.batch_size",
        "a positive integer",
        p.evaluate.batch_size,
    )
    check(
        p.evaluate.combination_pairs >= 0,
        "evaluate.combination_pairs",
        "0 or more",
        p.evaluate.combination_pairs,
    )
    _check_render(p.render)
    check(
        p.render.showcase_model in ("first", *p.models),
        "render.showcase_model",
        f"first (the first run) or a run of `models` ({', '.join(p.models)})",
        p.render.showcase_model,
    )
    check(
        p.evaluate.image_prompts >= 0,
        "evaluate.image_prompts",
        "0 (off) or more",
        p.evaluate.image_prompts,
    )
    check(
        p.evaluate.bridges in IMAGE_PROMPT_BRIDGES,
        "evaluate.bridges",
        f"one of {IMAGE_PROMPT_BRIDGES}",
        p.evaluate.bridges,
    )
    check(p.gap.pairs > 0, "gap.pairs", "a positive integer", p.gap.pairs)
    check(p.gap.bridge in BRIDGES, "gap.bridge", f"one of {BRIDGES}", p.gap.bridge)
    check(p.gap.bank > 0, "gap.bank", "a positive integer", p.gap.bank)
    check(p.gap.temperature > 0, "gap.temperature", "positive", p.gap.temperature)
    return p


def parse_models(raw: Any) -> dict[str, ModelSpec]:
    """`models:` -> run name -> ModelSpec: run names and the entries' shape checked by key.

    Whether each `type` is a registered architecture and knows its hyperparameters is checked
    against the registry by `pipeline.config.runs.check_runs`, which the stages that build,
    load or list runs call (and `base`, the first stage of every `dvc repro`): this module does
    not import the architectures, so an edit to one reruns only the stages that use them."""
    raw = raw or {}
    check(isinstance(raw, dict), "models", "a mapping of run name to {type: ..., ...}", raw)
    specs: dict[str, ModelSpec] = {}
    for name, entry in raw.items():
        check(
            isinstance(name, str) and RUN_NAME.fullmatch(name) is not None,
            f"models.{name}",
            f"a run name of {RUN_NAME_RULE}",
            name,
        )
        check(
            name not in RESERVED_RUN_NAMES,
            f"models.{name}",
            f"a run name other than {', '.join(RESERVED_RUN_NAMES)} (taken by other outputs)",
            name,
        )
        twin = next((other for other in specs if other.lower() == name.lower()), None)
        check(
            twin is None,
            f"models.{name}",
            f"a run name that differs from {twin!r} in more than letter case (models/NAME "
            f"folders would be one on a case-insensitive file system)",
            name,
        )
        check(
            isinstance(entry, dict),
            f"models.{name}",
            "a mapping with `type` (an architecture, docs/architectures.md) and its "
            "hyperparameters",
            entry,
        )
        hparams = dict(entry)
        model_type = hparams.pop("type", None)
        train = hparams.pop("train", None) or {}
        check(
            isinstance(model_type, str),
            f"models.{name}.type",
            "the name of an architecture (docs/architectures.md)",
            model_type,
        )
        section(TrainParams, train, f"models.{name}.train")  # known keys of the right types
        specs[name] = ModelSpec(model_type, hparams, dict(train))
    return specs


SECTIONS = {
    "base": BaseParams,
    "world": WorldParams,
    "captions": CaptionParams,
    "augment": AugmentParams,
    "extract": ExtractParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "render": RenderParams,
    "gap": GapParams,
}


def parse_params(raw: dict[str, Any]) -> Params:
    unknown = [key for key in raw if key not in SECTIONS and key != "models"]
    if unknown:
        raise ParamsError(
            f"params: unknown section `{unknown[0]}` (known: {', '.join([*SECTIONS, 'models'])})"
        )
    # Each section its own dataclass: Params(**parsed) checks them by name.
    parsed: dict[str, Any] = {
        name: section(cls, raw.get(name), name) for name, cls in SECTIONS.items()
    }
    return validate(Params(**parsed, models=parse_models(raw.get("models"))))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; the error names the file and the key."""
    raw = read_params_file(path)
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from err
