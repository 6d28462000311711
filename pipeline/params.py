"""Typed view of `params.yaml`, validated when a stage starts so bad values fail by key name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import DeprojectorError

STORAGE_DTYPES = ("float16", "float32")
PRECISIONS = ("fp32", "bf16", "fp16")


class ParamsError(DeprojectorError, ValueError):
    """A value in params.yaml is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class BaseParams:
    clip: str = "builtin"
    sd: str = "builtin"


@dataclass(frozen=True)
class WorldParams:
    """The embedded world (pipeline/world/): sizes, steps and seeds of its trained parts."""

    seed: int = 0
    scenes: int = 20000  # drawn training scenes
    vocab_size: int = 1000  # BPE vocabulary trained on the captions
    width: int = 128  # D: the CLIP text tower's hidden size
    clip_steps: int = 1400
    clip_batch: int = 128
    clip_lr: float = 1e-3
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 3600
    unet_batch: int = 48
    unet_lr: float = 5e-4
    captions_per_scene: int = 1  # the UNet's caption bank, encoded once
    judge_steps: int = 1500
    judge_batch: int = 64
    judge_lr: float = 1e-3
    held_out: int = 1000  # drawn scenes of another seed for the judge's and CLIP's accuracy


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
    seed: int = 0


@dataclass(frozen=True)
class ExtractParams:
    batch_size: int = 64
    dtype: str = "float16"
    rows_per_shard: int = 1000
    device: str = "cpu"
    num_workers: int = 1
    worker_index: int = 0


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


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 100
    combination_pairs: int = 100
    seed: int = 0
    # Held-out prompts per kind (single, comma-combined) whose pictures are judged; 0 = off.
    adherence_prompts: int = 48
    # Held-out drawn scenes used as image prompts and judged against their captions; 0 = off.
    image_prompts: int = 48


@dataclass(frozen=True)
class GapParams:
    """Paired data for the modality-gap statistics of image prompts (the `gap` stage)."""

    pairs: int = 1000  # image/caption pairs averaged
    seed: int = 7  # world scenes of a seed no world part trains on (builtin base)
    folder: str = "data/gap-pairs"  # real CLIP: NAME.png/.jpg + NAME.txt caption pairs


# A run name is a folder name (models/NAME, reports/metrics/NAME.json), a word of a shell
# command (`deprojector train NAME`), a dvc.yaml stage key (train@NAME) and a params key DVC
# addresses with dots (models.NAME, `dvc exp run -S models.NAME.lr=...`). DVC refuses
# punctuation other than '_' and '-' in stage names; '.' splits the params key, '@' and ':'
# split stage targets (`dvc.yaml:train@NAME`), '/' makes a subfolder. So: letters, digits,
# '_' and '-'. These names are taken by other outputs or rows.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
RUN_NAME_RULE = ("letters, digits, '_' and '-', starting with a letter or digit (DVC "
                 "addresses a run as the stage train@NAME and the param models.NAME: '.' would "
                 "split the key, '@', ':', '/', spaces and other punctuation the stage name)")
RESERVED_RUN_NAMES = ("base", "world", "null-baseline", "reference", "adherence")


@dataclass(frozen=True)
class ModelSpec:
    """One entry of `models:`: a registered architecture and its hyperparameters."""

    type: str
    hparams: dict[str, Any] = field(default_factory=dict)
    # `train:` settings of this run only (e.g. {rollout: 2}); the others come from `train:`.
    train: dict[str, Any] = field(default_factory=dict)

# The grid prompts of the embedded world, mirroring the article's three pairs: two words
# that make one thing; one thing with several attributes; two things and a place.
WORLD_PROMPTS_SINGLE = ("red circle", "big yellow star black background",
                        "red circle blue square white background")
WORLD_PROMPTS_MULTI = ("red, circle", "big, yellow star, black background",
                       "red circle, blue square, white background")
# The article's comparison prompts (SPEC §4), for real base models.
ARTICLE_PROMPTS_SINGLE = ("cat maid", "1girl red hair blue eye black skirt",
                          "1boy 1girl in class room")
ARTICLE_PROMPTS_MULTI = ("cat, maid", "1girl, red hair, blue eye, black skirt",
                         "1boy, 1girl, in class room")
PROMPT_SETS = ("auto", "world", "article")
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
    article_prompts_single: list[str] = field(
        default_factory=lambda: list(ARTICLE_PROMPTS_SINGLE))
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

    def prompts(self, base_clip: str) -> tuple[list[str], list[str]]:
        """The (single, multi) grid prompts for the base model `base.clip`."""
        chosen = self.prompt_set
        if chosen == "auto":
            chosen = "world" if base_clip == "builtin" else "article"
        if chosen == "world":
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
    # Sections owned by later stages stay plain dicts until their stage reads them.
    extra: dict[str, Any] = field(default_factory=dict)


T = TypeVar("T")


def _section(cls: type[T], raw: Any, name: str) -> T:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ParamsError(f"params: `{name}` must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ParamsError(f"params: unknown key `{name}.{key}` (known: {', '.join(known)})")
    values = {}
    for key, value in raw.items():
        expected = type(getattr(cls(), key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ParamsError(
                f"params: `{name}.{key}` must be {expected.__name__}, got {value!r}"
            )
        values[key] = value
    return cls(**values)


def _check(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ParamsError(f"params: `{key}` must be {expected}, got {value!r}")


def _check_render(r: RenderParams) -> None:
    _check(r.prompt_set in PROMPT_SETS, "render.prompt_set", f"one of {PROMPT_SETS}",
           r.prompt_set)
    for key in ("world_prompts_single", "world_prompts_multi", "article_prompts_single",
                "article_prompts_multi"):
        prompts = getattr(r, key)
        _check(len(prompts) > 0 and all(isinstance(p, str) and p.replace(",", " ").strip()
                                        for p in prompts),
               f"render.{key}", "a non-empty list of prompts with text", prompts)
    _check(r.seed >= 0, "render.seed", "0 or more", r.seed)
    _check(r.steps > 0, "render.steps", "a positive integer", r.steps)
    _check(r.guidance_scale >= 0, "render.guidance_scale", "0 or more", r.guidance_scale)
    # The UNet halves the latent size per level; multiples of 8 work for SD and the builtin.
    for key in ("height", "width"):
        value = getattr(r, key)
        _check(value > 0 and value % 8 == 0, f"render.{key}", "a positive multiple of 8", value)
    _check(r.scheduler in SCHEDULERS, "render.scheduler", f"one of {tuple(SCHEDULERS)}",
           r.scheduler)
    _check(r.interpolation_steps >= 2, "render.interpolation_steps", "2 or more",
           r.interpolation_steps)
    _check(r.interpolation_seeds >= 1, "render.interpolation_seeds", "1 or more",
           r.interpolation_seeds)


def _check_world(w: WorldParams) -> None:
    for f in fields(w):
        value = getattr(w, f.name)
        if f.name != "seed":
            _check(value > 0, f"world.{f.name}", "positive", value)
    for part in ("clip", "vae", "unet", "judge"):
        batch = getattr(w, f"{part}_batch")
        _check(batch <= w.scenes, f"world.{part}_batch", f"at most world.scenes = {w.scenes}",
               batch)
    _check(w.width % 4 == 0, "world.width", "a multiple of 4 (4 attention heads)", w.width)


def validate(p: Params) -> Params:
    c, a, e = p.captions, p.augment, p.extract
    _check_world(p.world)
    _check(p.evaluate.adherence_prompts >= 0, "evaluate.adherence_prompts", "0 (off) or more",
           p.evaluate.adherence_prompts)
    _check(c.train_size > 0, "captions.train_size", "a positive integer", c.train_size)
    _check(c.test_size > 0, "captions.test_size", "a positive integer", c.test_size)
    _check(0.0 <= a.split <= 1.0, "augment.split", "in [0, 1]", a.split)
    _check(0.0 <= a.combine <= 1.0, "augment.combine", "in [0, 1]", a.combine)
    _check(
        a.split + a.combine <= 1.0,
        "augment.split + augment.combine",
        "at most 1",
        a.split + a.combine,
    )
    _check(e.batch_size > 0, "extract.batch_size", "a positive integer", e.batch_size)
    _check(e.rows_per_shard > 0, "extract.rows_per_shard", "a positive integer", e.rows_per_shard)
    _check(e.num_workers > 0, "extract.num_workers", "a positive integer", e.num_workers)
    _check(0 <= e.worker_index < e.num_workers, "extract.worker_index",
           f"in [0, extract.num_workers - 1 = {e.num_workers - 1}]", e.worker_index)
    _check(e.dtype in STORAGE_DTYPES, "extract.dtype", f"one of {STORAGE_DTYPES}", e.dtype)
    t = p.train
    _check(t.epochs > 0, "train.epochs", "a positive integer", t.epochs)
    _check(t.batch_size > 0, "train.batch_size", "a positive integer", t.batch_size)
    _check(t.lr > 0, "train.lr", "positive", t.lr)
    _check(t.mask_weight > 0, "train.mask_weight", "positive", t.mask_weight)
    _check(t.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}", t.precision)
    _check(t.patience >= 0, "train.patience", "0 (off) or a positive integer", t.patience)
    _check(t.rollout >= 0, "train.rollout", "0 (teacher forcing) or more", t.rollout)
    _check(p.evaluate.batch_size > 0, "evaluate.batch_size", "a positive integer",
           p.evaluate.batch_size)
    _check(p.evaluate.combination_pairs >= 0, "evaluate.combination_pairs", "0 or more",
           p.evaluate.combination_pairs)
    _check_render(p.render)
    _check(p.render.showcase_model in ("first", *p.models), "render.showcase_model",
           f"first (the first run) or a run of `models` ({', '.join(p.models)})",
           p.render.showcase_model)
    _check(p.evaluate.image_prompts >= 0, "evaluate.image_prompts", "0 (off) or more",
           p.evaluate.image_prompts)
    _check(p.gap.pairs > 0, "gap.pairs", "a positive integer", p.gap.pairs)
    return p


def parse_models(raw: Any) -> dict[str, ModelSpec]:
    """`models:` -> run name -> ModelSpec; types and hyperparameter names checked by key."""
    from pipeline.models import ARCHITECTURES, hyperparameters  # imports torch: only here

    raw = raw or {}
    _check(isinstance(raw, dict), "models", "a mapping of run name to {type: ..., ...}", raw)
    known = ", ".join(sorted(ARCHITECTURES))
    specs = {}
    for name, entry in raw.items():
        _check(isinstance(name, str) and RUN_NAME.fullmatch(name) is not None,
               f"models.{name}", f"a run name of {RUN_NAME_RULE}", name)
        _check(name not in RESERVED_RUN_NAMES, f"models.{name}",
               f"a run name other than {', '.join(RESERVED_RUN_NAMES)} (taken by other "
               f"outputs)", name)
        twin = next((other for other in specs if other.lower() == name.lower()), None)
        _check(twin is None, f"models.{name}",
               f"a run name that differs from {twin!r} in more than letter case (models/NAME "
               f"folders would be one on a case-insensitive file system)", name)
        _check(isinstance(entry, dict), f"models.{name}",
               f"a mapping with `type` (one of {known}) and its hyperparameters", entry)
        hparams = dict(entry)
        model_type = hparams.pop("type", None)
        train = hparams.pop("train", None) or {}
        _check(model_type in ARCHITECTURES, f"models.{name}.type", f"one of {known}",
               model_type)
        _section(TrainParams, train, f"models.{name}.train")  # known keys of the right types
        allowed = hyperparameters(model_type)
        for key in hparams:
            _check(key in allowed, f"models.{name}.{key}",
                   f"a hyperparameter of {model_type} ({', '.join(allowed)}) or `train`", key)
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
    parsed = {name: _section(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    models = parse_models(raw.get("models"))
    extra = {k: v for k, v in raw.items() if k not in SECTIONS and k != "models"}
    return validate(Params(**parsed, models=models, extra=extra))


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with YAML 1.2's float syntax.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `1e-06` (what
    `dvc exp run -S train.lr=0.000001` writes), `1e-4`, `1E5` and `+.5` stay strings. DVC
    itself reads params.yaml as YAML 1.2, where all of them are floats; so do we. Integers,
    booleans and everything else resolve as before.
    """


_FLOAT = re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
  | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN)
)$""", re.VERBOSE)
FLOAT_TAG = "tag:yaml.org,2002:float"
ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver(FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _unique_mapping(loader: ParamsLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: PyYAML keeps the last of two equal keys silently (a
    run listed twice under `models:` would merge); YAML forbids it and DVC refuses it."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark)
        if isinstance(key, (str, int, float, bool)):
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


ParamsLoader.add_constructor("tag:yaml.org,2002:map", _unique_mapping)


def load_yaml(text: str):
    """Parse params YAML (ParamsLoader: floats as YAML 1.2 and DVC read them)."""
    return yaml.load(text, Loader=ParamsLoader)  # safe: a SafeLoader subclass


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; the error names the file and the key."""
    path = Path(path)
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, expected a params YAML file")
    if not path.exists():
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ParamsError(f"{path}:{line}: not valid UTF-8 (byte offset {err.start}: "
                          f"{data[err.start:err.start + 1]!r}); save it as UTF-8") from err
    try:
        raw = load_yaml(text) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        what = ", ".join(part for part in (err.context, err.problem) if part)
        raise ParamsError(f"{path}{where}: not valid YAML ({what})") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from err
