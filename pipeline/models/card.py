"""The model card of a deprojector folder (README.md): Hub YAML metadata (huggingface_hub's
`ModelCardData`: library, base models, tags, license, training budget, sampling settings,
evaluation figures with intervals) and a text, written by the pipeline: `deprojector train`,
then `deprojector card` with evaluate's figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from pipeline.core.atomic import write_text
from pipeline.core.conventions import BUILTIN
from pipeline.core.errors import DeprojectorError
from pipeline.core.names import CARD_FILE

LIBRARY_NAME = "clip-text-deprojector"
CARD_TAGS = ("clip", "stable-diffusion", "deprojector", "text-embeddings")  # + the model_type


@dataclass(frozen=True)
class Figure:
    """One evaluation figure of the card: its name, value and 95% interval (bootstrap)."""

    name: str
    value: float
    low: float | None  # None: no interval (below two rows)
    high: float | None
    source: str  # the file it was copied from, e.g. reports/metrics/NAME.json

    def interval(self) -> str:
        return (
            "n/a" if self.low is None or self.high is None else f"[{self.low:.4g}, {self.high:.4g}]"
        )


@dataclass(frozen=True)
class CardFacts:
    """What a model card says of one trained deprojector folder."""

    name: str  # the run name (models/NAME)
    model_type: str
    base_clip: str  # base.clip: `builtin`, a Hub id or a folder
    base_sd: str  # base.sd: the Stable Diffusion it is meant for
    rows: int  # training rows (shards' train split)
    epochs: int
    steps: int  # optimizer steps
    seconds: float  # training wall time
    captions: str  # where the training captions came from (captions.source)
    sampling: dict = field(default_factory=dict)  # render.* recorded in config.json
    figures: tuple[Figure, ...] = ()  # evaluate's, empty before `deprojector card`


def _hub_id(name: str) -> str | None:
    """`name` when it is a Hub repository id (a base model the Hub can link), else None."""
    if name == BUILTIN or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _describe(name: str, what: str) -> str:
    if name == BUILTIN:
        return f"the embedded world's {what} (`builtin`, in this project's repository)"
    return f"`{name}`"


def usage_snippet(folder: str, base_sd: str) -> str:
    """Python that draws one picture with the deprojector in `folder` (a path or a Hub id)
    from diffusers at its recorded sampling settings; what the card shows."""
    if base_sd == BUILTIN:
        pipe = 'pipe = load_sd_pipeline("builtin")  # the embedded world\'s SD (diffusers)'
        imports = ["import torch", "", "from pipeline import PromptEncoder"]
        imports.append("from pipeline.base.loaders import load_sd_pipeline")
    else:
        pipe = f'pipe = StableDiffusionPipeline.from_pretrained("{base_sd}")'
        imports = ["import torch", "from diffusers import StableDiffusionPipeline", ""]
        imports.append("from pipeline import PromptEncoder")
    return "\n".join(
        [
            *imports,
            "",
            f'encoder = PromptEncoder.from_pretrained("{folder}")  # + its base CLIP',
            pipe,
            "image = pipe(",
            '    prompt_embeds=encoder.encode_prompt("red circle:1.2, blue square"),',
            '    negative_prompt_embeds=encoder.encode_negative(""),',
            "    generator=torch.Generator().manual_seed(0),",
            "    **encoder.sampling_kwargs(),  # the settings the pipeline draws with",
            ").images[0]",
            'image.save("deprojected.png")',
        ]
    )


def model_card(facts: CardFacts, folder: str) -> ModelCard:
    """The card of one deprojector: Hub metadata (library, base models, tags, license, the
    figures as model-index results) and a text with the training budget, the figures with
    their intervals and `usage_snippet(folder, ...)`."""
    base_models = [b for b in (_hub_id(facts.base_clip), _hub_id(facts.base_sd)) if b]
    training = {
        "rows": facts.rows,
        "epochs": facts.epochs,
        "steps": facts.steps,
        "seconds": round(facts.seconds, 1),
        "captions": facts.captions,
    }
    evaluation = {
        f.name: {
            "value": f.value,
            "ci95": None if f.low is None else [f.low, f.high],
            "source": f.source,
        }
        for f in facts.figures
    }
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        license="other",
        base_model=base_models or None,
        tags=[*CARD_TAGS, facts.model_type],
        deprojector={"name": facts.name, "base_clip": facts.base_clip, "base_sd": facts.base_sd},
        training=training,
        evaluation=evaluation or None,
        sampling=facts.sampling or None,
    )
    table = (
        "\n".join(
            ["| figure | value | 95% interval | from |", "| --- | --- | --- | --- |"]
            + [
                f"| {f.name} | {f.value:.4g} | {f.interval()} | `{f.source}` |"
                for f in facts.figures
            ]
        )
        if facts.figures
        else "Not evaluated yet: `deprojector evaluate`, then `deprojector card "
        f"{facts.name}` copies its figures here."
    )
    text = "\n\n".join(
        [
            f"# {facts.name}: a CLIP text deprojector ({facts.model_type})",
            "Maps one pooled CLIP text embedding back to the 77 hidden states Stable Diffusion "
            "is conditioned on, so that sums, differences and image embeddings can be used as "
            "prompts of a stock checkpoint.",
            f"- base CLIP (the embeddings it deprojects): {_describe(facts.base_clip, 'CLIP')}\n"
            f"- Stable Diffusion it is meant for: {_describe(facts.base_sd, 'Stable Diffusion')}",
            "## Training\n\n"
            + (
                f"{facts.rows:,} training rows from {_describe(facts.captions, 'captions')}, "
                f"{facts.epochs} epochs, "
                f"{facts.steps:,} optimizer steps, {facts.seconds:.0f} s."
                if facts.epochs
                else "Trains nothing of its own (its members are trained runs)."
            ),
            "## Evaluation\n\n" + table,
            "## Use it from diffusers\n\n"
            "With this project installed (`pip install -e .` in its repository):\n\n"
            "```python\n" + usage_snippet(folder, facts.base_sd) + "\n```",
            "This card is written by the pipeline (`deprojector train`, `deprojector card`), "
            "not by hand.",
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}\n")


def write_card(facts: CardFacts, folder: Path, snippet_folder: str) -> ModelCard:
    """Write `model_card(facts, snippet_folder)` to folder/README.md (atomically)."""
    card = model_card(facts, snippet_folder)
    write_text(folder / CARD_FILE, str(card))
    return card


def _interval(ci95: list[float] | None) -> tuple[float | None, float | None]:
    return (ci95[0], ci95[1]) if ci95 else (None, None)


class CardError(DeprojectorError, ValueError):
    """A deprojector folder has no model card, or one the pipeline did not write."""


def read_card_facts(folder: Path) -> CardFacts:
    """The CardFacts of the card in folder/README.md (as `write_card` wrote them; the figures
    too). Raises CardError naming the file when it is missing or lacks the pipeline's keys."""
    file = folder / CARD_FILE
    if not file.is_file():
        raise CardError(
            f"{folder} has no model card ({CARD_FILE}): train it again (`deprojector train "
            f"{folder.name}`), which writes one"
        )
    data = ModelCard.load(file).data.to_dict()
    training, evaluation = data.get("training"), data.get("evaluation") or {}
    tags = [t for t in data.get("tags") or [] if t not in CARD_TAGS]
    facts = data.get("deprojector")
    if not isinstance(training, dict) or not isinstance(facts, dict) or len(tags) != 1:
        raise CardError(f"{file}: not a card `deprojector train` wrote; train it again")
    return CardFacts(
        name=facts["name"],
        model_type=tags[0],
        base_clip=facts["base_clip"],
        base_sd=facts["base_sd"],
        rows=training["rows"],
        epochs=training["epochs"],
        steps=training["steps"],
        seconds=training["seconds"],
        captions=training["captions"],
        sampling=data.get("sampling") or {},
        figures=tuple(
            Figure(name, f["value"], *_interval(f["ci95"]), f["source"])
            for name, f in evaluation.items()
        ),
    )
