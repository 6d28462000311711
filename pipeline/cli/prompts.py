"""The CLI's `encode` and `generate`: one definition of the prompt options both take.

Both build their conditioning through `PromptEncoder` (pipeline/prompting/encoder.py), the one
path from prompts to prompt_embeds. A deprojector folder records its base CLIP and carries
its modality-gap statistics, so both commands work from any directory; a params file, when
there is one, supplies base.clip / base.sd and the render.* defaults.
"""

from __future__ import annotations

import functools
import inspect
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import typer

from pipeline.core.names import BRIDGES

# Paragraphs of one line each: the help formatter keeps line breaks as they are.
PROMPT_GRAMMAR = "\n\n".join(
    [
        "Prompt grammar: parts separated by commas, each optionally weighted with ':WEIGHT' "
        "('red circle:1.2, blue square:0.6'; no weight = 1; negative weights subtract; |WEIGHT| "
        "<= 100). With a deprojector the parts combine as Σ w_k (e_k − null) + null. A colon "
        "always starts a weight.",
        "Other tools' weights around a whole part set its weight: A1111's (text:1.2), (text) = "
        "1.1, [text] = 1/1.1; compel's text++ = 1.1^2, text-- = 0.9^2, (text)1.3. Inside a "
        "part, across a comma, A1111's AND / BREAK and a number before ':' ('16:9') are errors "
        "that say how to write them here. Words the base CLIP does not know are warned about.",
        "--image PATH[:WEIGHT] adds an image part: the CLIP vision tower, the bridge to text "
        "space (--bridge; statistics saved with the deprojector, or --gap), the pseudo-inverse "
        "of the text projection. A prompt of only images is allowed (pass '').",
        "--mix PROMPT_B with --t T (repeatable: a strip of images) interpolates from PROMPT to "
        "PROMPT_B around null, linearly or with --slerp.",
        "The base CLIP is the one the deprojector was trained on (its config.json records it), "
        "or base.clip of the params file when there is one; another CLIP is refused. Likewise "
        "its clip skip (--clip-skip, else extract.clip_skip of the params file when there is "
        "one, else the deprojector's own).",
    ]
)


@dataclass
class PromptOptions:
    """What encode and generate take to build conditioning (one typer option per field)."""

    prompt: str
    model: Path = Path("models/transformer")
    no_deprojector: bool = False
    blend: bool = False
    combine: bool = True
    images: list[str] = field(default_factory=list)
    mix: str | None = None
    mix_images: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    slerp: bool = False
    negative: str | None = None
    negative_reference: bool = False
    gap: Path | None = None
    bridge: str | None = None
    clip_skip: int | None = None

    def check(self) -> None:
        extras = [
            flag
            for flag, used in (
                ("--image", self.images),
                ("--mix", self.mix is not None),
                ("--mix-image", self.mix_images),
                ("--t", self.ts),
                ("--slerp", self.slerp),
            )
            if used
        ]
        if extras and self.no_deprojector:
            raise typer.BadParameter(f"{extras[0]} needs a deprojector (drop --no-deprojector)")
        clashes = extras + [
            flag
            for flag, used in (
                ("--no-deprojector", self.no_deprojector),
                ("--no-combine", not self.combine),
            )
            if used
        ]
        if self.blend and clashes:
            raise typer.BadParameter(
                f"--blend averages the CLIP states of the prompt's text parts: drop {clashes[0]}"
            )
        if extras and not self.combine:
            raise typer.BadParameter(f"{extras[0]} works on combined parts (drop --no-combine)")
        if (self.ts or self.mix_images or self.slerp) and self.mix is None:
            raise typer.BadParameter("--t, --mix-image and --slerp need --mix PROMPT_B")
        if self.bridge is not None and self.bridge not in BRIDGES:
            raise typer.BadParameter(
                f"--bridge must be one of {', '.join(BRIDGES)}, got {self.bridge!r}"
            )
        if self.clip_skip is not None and self.clip_skip < 0:
            raise typer.BadParameter(f"--clip-skip must be 0 or more, got {self.clip_skip}")
        bad = [t for t in self.ts if not 0.0 <= t <= 1.0]
        if bad:
            raise typer.BadParameter(f"--t must lie in [0, 1], got {bad[0]}")


def _option(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


# field of PromptOptions -> its typer parameter; `None` lists become [] in PromptOptions.
PROMPT_PARAMETERS = [
    inspect.Parameter(
        "prompt",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=str,
        default=typer.Argument(
            ...,
            help="The prompt, e.g. 'cat, maid' or 'red circle:1.2, blue "
            "square:0.6' ('' with --image only). Commas separate the parts that "
            "--combine adds up.",
        ),
    ),
    _option(
        "model",
        Path,
        typer.Option(
            Path("models/transformer"),
            "--model",
            "-m",
            help="Deprojector folder (config.json + model.safetensors), e.g. "
            "models/vicinity-batch, or a Hugging Face Hub id OWNER/NAME (downloaded once into "
            "the HF cache; HF_HUB_OFFLINE=1 reads only the cache).",
        ),
    ),
    _option(
        "no_deprojector",
        bool,
        typer.Option(
            False,
            "--no-deprojector",
            help="Use the ordinary CLIP last hidden state of the prompt (the reference) instead.",
        ),
    ),
    _option(
        "blend",
        bool,
        typer.Option(
            False,
            "--blend",
            help="No deprojector: the ordinary CLIP states of the comma-separated parts, "
            "averaged with their weights (compel's .blend(), ComfyUI's ConditioningAverage) — "
            "the baseline a deprojector's 'A, B' is judged against.",
        ),
    ),
    _option(
        "combine",
        bool,
        typer.Option(
            True,
            "--combine/--no-combine",
            help="Encode the comma-separated parts and deproject Σ w_k (e_k − null) + null, or "
            "deproject the pooled embedding of the whole prompt.",
        ),
    ),
    _option(
        "images",
        list[str] | None,
        typer.Option(
            None,
            "--image",
            metavar="PATH[:WEIGHT]",
            help="An RGB image as a prompt part (repeatable), e.g. scene.png:0.8.",
        ),
    ),
    _option(
        "mix",
        str | None,
        typer.Option(
            None,
            "--mix",
            metavar="PROMPT_B",
            help="Interpolate from PROMPT to this prompt (same grammar).",
        ),
    ),
    _option(
        "mix_images",
        list[str] | None,
        typer.Option(
            None,
            "--mix-image",
            metavar="PATH[:WEIGHT]",
            help="An image part of PROMPT_B (repeatable).",
        ),
    ),
    _option(
        "ts",
        list[float] | None,
        typer.Option(
            None,
            "--t",
            help="Interpolation fraction (0 = PROMPT, 1 = PROMPT_B; repeatable for "
            "a strip; default 0.5).",
        ),
    ),
    _option(
        "slerp",
        bool,
        typer.Option(
            False, "--slerp", help="Spherical interpolation around null instead of linear."
        ),
    ),
    _option(
        "negative",
        str | None,
        typer.Option(
            None,
            "--negative",
            metavar="TEXT",
            help="Negative prompt (default ''), deprojected like the prompt (weights allowed).",
        ),
    ),
    _option(
        "negative_reference",
        bool,
        typer.Option(
            False,
            "--negative-reference",
            help="Use the ordinary CLIP states of --negative instead of deprojecting it.",
        ),
    ),
    _option(
        "gap",
        Path | None,
        typer.Option(
            None,
            "--gap",
            help="Modality-gap statistics (a `gap` stage folder such as data/gap); "
            "default: those saved with the deprojector.",
        ),
    ),
    _option(
        "bridge",
        str | None,
        typer.Option(
            None,
            "--bridge",
            metavar="|".join(BRIDGES),
            help="How image embeddings reach text space (default: the deprojector's, the one it "
            "was trained with; `none` needs no statistics).",
        ),
    ),
    _option(
        "clip_skip",
        int | None,
        typer.Option(
            None,
            "--clip-skip",
            metavar="N",
            help="The CLIP layer of the conditioning, diffusers' count: 0 = last, 1 = "
            "penultimate (A1111's 'clip skip 2'). Default: extract.clip_skip of the params file "
            "when there is one, else the deprojector's own (0 with --no-deprojector). A "
            "deprojector trained on another clip skip is refused.",
        ),
    ),
]


def with_prompt_options(command):
    """Give `command(options: PromptOptions, ...)` the prompt options as CLI parameters."""
    hints = typing.get_type_hints(command)  # the real types, not `from __future__` strings
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
        for p in inspect.signature(command).parameters.values()
        if p.name != "options"
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {p.name: kwargs.pop(p.name) for p in PROMPT_PARAMETERS}
        for key in ("images", "mix_images", "ts"):
            values[key] = values[key] or []
        return command(options=PromptOptions(**values), **kwargs)

    wrapper.__signature__ = inspect.Signature([*PROMPT_PARAMETERS, *own])
    wrapper.__annotations__ = {}  # the signature carries the real types
    return wrapper


def params_or_defaults(path: Path, model: Path | None = None):
    """The params file if it exists; else, for the default name, the defaults (base.clip,
    base.sd `builtin`, render.*), so the commands work outside the project, with the sampling
    settings (render.steps, guidance_scale, height, width, scheduler) the deprojector
    `model` records. Options given on the command line override either."""
    import dataclasses

    from pipeline.config.params import Params, load_params
    from pipeline.models import recorded_sampling

    if path.exists() or path != Path("params.yaml"):
        return load_params(path)
    defaults = Params()
    recorded = recorded_sampling(model) if model is not None else {}
    return dataclasses.replace(defaults, render=dataclasses.replace(defaults.render, **recorded))


def conditionings(o: PromptOptions, params, params_file: bool):
    """(prompt_embeds [N, 77, D], negative_prompt_embeds [N, 77, D], one label per row, what
    made them as strings: the encoder's metadata and the prompt options)."""
    from pipeline.prompting.encoder import ImagePart, PromptEncoder

    o.check()
    images = [ImagePart.parse(a) for a in o.images]
    mix_images = [ImagePart.parse(a) for a in o.mix_images]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = o.no_deprojector or o.blend  # CLIP's own states, no deprojector
        encoder = PromptEncoder.from_pretrained(
            None if reference else o.model,
            clip=params.base.clip if params_file or reference else None,
            gap=None if o.bridge == "none" else o.gap,
            images=bool(images or mix_images),
            device=params.render.device,
            clip_skip=o.clip_skip
            if o.clip_skip is not None
            else (params.extract.clip_skip if params_file else None),
        )
        if o.no_deprojector:
            embeds, labels = encoder.encode_prompt(o.prompt, deproject=False), ["reference"]
        elif o.blend:
            embeds, labels = encoder.encode_blend(o.prompt), ["blend"]
        elif o.mix is not None:
            ts = o.ts or [0.5]
            start = encoder.embedding(o.prompt, images, o.bridge)
            end = encoder.embedding(o.mix, mix_images, o.bridge)
            embeds = encoder.interpolate(start, end, ts, o.slerp)
            labels = [f"t = {t:g}" for t in ts]
        else:
            embeds = encoder.encode_prompt(o.prompt, images, o.bridge, combine=o.combine)
            labels = ["deprojected" if o.combine else "whole"]
        negative = encoder.encode_negative(
            o.negative or "", deproject=not (reference or o.negative_reference)
        )
    for warning in caught:
        typer.secho(f"warning: {warning.message}", fg=typer.colors.YELLOW, err=True)
    given = {
        "prompt": o.prompt,
        "negative": o.negative,
        "images": " ".join(o.images) or None,
        "mix": o.mix,
        "mix_images": " ".join(o.mix_images) or None,
        "t": " ".join(f"{t:g}" for t in o.ts or [0.5]) if o.mix is not None else None,
        "slerp": "true" if o.slerp else None,
        "blend": "true" if o.blend else None,
        "combine": None if o.combine else "false",
        "bridge": o.bridge,
        "negative_reference": "true" if o.negative_reference else None,
    }
    metadata = {**encoder.metadata(), **{k: v for k, v in given.items() if v is not None}}
    # diffusers wants as many negative rows as prompt rows.
    return embeds, negative.expand(len(embeds), -1, -1), labels, metadata
