"""ComfyUI nodes for CLIP text deprojectors: a thin adapter over the project's own code.

A deprojector maps one pooled CLIP embedding e [D] to the 77 x D hidden states Stable Diffusion
1.x is conditioned on (docs/architectures.md). These nodes take e from ComfyUI's own objects —
the CLIP of a loaded checkpoint (`clip.tokenize`, `clip.encode_from_tokens`) and the output of
CLIPVisionEncode (`image_embeds`) — combine it with the project's formulas
(pipeline.core.conventions: Σ_k w_k (e_k − null) + null, interpolation around null), and
deproject it (pipeline.prompting.encoder.deproject_checked). Every node that ends in states
returns CONDITIONING laid out as ComfyUI's CLIPTextEncode returns it,
`[[states [B, 77, D], {"pooled_output": e [B, D]}]]` (for SD 1.x checkpoints ComfyUI's pooled
output is the unprojected pooled embedding, as e is), and the embedding e itself
(DEPROJECTOR_EMBEDDING) for the combine and interpolate nodes.

Nothing here imports ComfyUI at module level: `folder_paths` is imported where the model folder
is listed, so the functions and classes can be tested without ComfyUI (tests/test_comfyui.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.conventions import combine_embeddings, interpolate_embeddings
from pipeline.core.names import BRIDGES
from pipeline.models import BaseMismatchError, Deprojector, load_deprojector
from pipeline.models.base import CONFIG_FILE
from pipeline.prompting.bridges import ModalityGap, saved_gap
from pipeline.prompting.encoder import bridged_image_embeds, deproject_checked
from pipeline.prompting.grammar import MAX_WEIGHT, PromptError, checked_weight, parse_weighted

MODEL_FOLDER = "deprojectors"  # ComfyUI/models/deprojectors, registered with folder_paths
CATEGORY = "conditioning/deprojector"
DEPROJECTOR = "DEPROJECTOR"  # a Loaded deprojector
EMBEDDING = "DEPROJECTOR_EMBEDDING"  # pooled embeddings [B, D] a deprojector reads
# |e_null(ComfyUI's CLIP) − null| / |null| above this: probably not the CLIP it was trained on.
NULL_TOLERANCE = 0.05
DEFAULT_BRIDGE = "default"  # the bridge the deprojector was trained with


class NodeError(PromptError):
    """A node's input that cannot give conditioning; the message says what to change."""


@dataclass
class Loaded:
    """A deprojector folder: the model and the modality-gap statistics saved with it."""

    model: Deprojector
    gap: ModalityGap | None
    name: str


# --- the model folder ----------------------------------------------------------------------


def register_model_folder() -> None:
    """Make `models/deprojectors` a ComfyUI model folder (extra_model_paths.yaml may add
    more under the key `deprojectors`); nothing outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return
    default = Path(folder_paths.models_dir) / MODEL_FOLDER
    folder_paths.add_model_folder_path(MODEL_FOLDER, str(default), is_default=True)
    default.mkdir(parents=True, exist_ok=True)


def model_dirs() -> list[Path]:
    """The folders ComfyUI's folder_paths registers for deprojectors."""
    import folder_paths

    return [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER)]


def deprojector_names() -> list[str]:
    """Every deprojector folder (one holding config.json) below the model folders, as a path
    relative to its model folder ('vt-rollout', 'study/queries')."""
    names = set()
    for root in model_dirs():
        for config in root.rglob(CONFIG_FILE):
            names.add(config.parent.relative_to(root).as_posix())
    names.discard(".")
    return sorted(names)


def find_deprojector(name: str) -> Path:
    """The folder of the deprojector `name` (as deprojector_names lists it)."""
    roots = model_dirs()
    for root in roots:
        if (root / name / CONFIG_FILE).is_file():
            return root / name
    raise NodeError(
        f"no deprojector {name!r} in the {MODEL_FOLDER} model folders "
        f"({', '.join(map(str, roots)) or 'none registered'}): put a trained deprojector "
        f"folder (config.json + model.safetensors) there and refresh"
    )


def load(folder: str | Path, name: str | None = None) -> Loaded:
    """The deprojector in `folder` and the gap statistics saved with it (None if none)."""
    folder = Path(folder)
    return Loaded(load_deprojector(folder), saved_gap(folder), name or folder.name)


# --- ComfyUI's CLIP -> pooled embeddings ------------------------------------------------------


def literal(text: str) -> str:
    """`text` with its brackets escaped, so ComfyUI's tokenizer reads them as characters, not
    as its (emphasis:weight) syntax: weights are the deprojector grammar's (a part's `:w`)."""
    return text.replace("(", "\\(").replace(")", "\\)")


def check_clip(clip: Any, loaded: Loaded) -> None:
    """Refuse a CLIP set to another layer than the one the deprojector gives (CLIPSetLastLayer:
    the deprojector gives the states of the layer it was trained on, its config's clip_skip in
    diffusers' count, whatever the CLIP is set to): ComfyUI's stop_at_clip_layer -(k + 1) is
    diffusers' clip_skip k (-1: the last layer, -2: the penultimate, A1111's "clip skip 2")."""
    layer = getattr(clip, "layer_idx", None)
    wanted = -(loaded.model.config.clip_skip + 1)
    if (layer if layer is not None else -1) != wanted:
        states = "the last layer's" if wanted == -1 else f"layer {wanted}'s (clip skip)"
        raise NodeError(
            f"this CLIP is set to stop at layer {layer if layer is not None else -1} "
            f"(CLIPSetLastLayer), but the deprojector {loaded.name!r} gives {states} states: "
            f"set stop_at_clip_layer to {wanted}"
            + (" or take the CLIP before CLIPSetLastLayer" if wanted == -1 else "")
        )


def pooled_of(clip: Any, text: str) -> torch.Tensor:
    """The unprojected pooled embedding [1, D] of `text` from ComfyUI's CLIP object (the
    EOS state after the final LayerNorm, as transformers' pooler_output); a text longer than
    CLIP's 75 tokens is split by ComfyUI, and its first chunk's pooled embedding is used."""
    tokens = clip.tokenize(literal(text))
    if any(len(chunks) > 1 for chunks in tokens.values()):
        warnings.warn(
            f"prompt part {text[:60]!r} is longer than CLIP's 75 tokens: the deprojector reads "
            "the pooled embedding of the first 77-token chunk only",
            stacklevel=3,
        )
    _, pooled = clip.encode_from_tokens(tokens, return_pooled="unprojected")
    if pooled is None:
        raise NodeError(
            "this CLIP gives no pooled embedding (a text encoder without one): a deprojector "
            "needs an SD 1.x CLIP text model"
        )
    return pooled[:1].float()


def check_base(null: torch.Tensor, loaded: Loaded) -> None:
    """null: the CLIP's pooled embedding of "" [1, D]. A BaseMismatchError if its width is not
    the deprojector's; a warning if it is far from the null the deprojector was trained with
    (another CLIP of the same width, e.g. a checkpoint's fine-tuned text encoder)."""
    model = loaded.model
    width = model.config.hidden_size
    if null.shape[-1] != width:
        raise BaseMismatchError(
            f"the deprojector {loaded.name!r} was trained for a CLIP of width D={width} "
            f"({model.config.base_clip or 'base not recorded'}), this CLIP's pooled "
            f"embedding has {null.shape[-1]}: load the checkpoint it was trained for"
        )
    distance = ((null.to(model.null) - model.null).norm() / model.null.norm()).item()
    if distance > NULL_TOLERANCE:
        warnings.warn(
            f"this CLIP's embedding of the empty prompt is {distance:.1%} away from the one the "
            f"deprojector {loaded.name!r} was trained with ({model.config.base_clip!r}): "
            "probably another text encoder; its pictures may not follow the prompt",
            stacklevel=3,
        )


def text_embedding(clip: Any, loaded: Loaded, text: str) -> torch.Tensor:
    """The pooled embedding [1, D] of a prompt in the project's grammar (comma parts with
    weights, pipeline/prompting/grammar.py): e = Σ_k w_k (e_k − null) + null, each part
    encoded alone by ComfyUI's CLIP (as PromptEncoder.embedding does with the base CLIP)."""
    check_clip(clip, loaded)
    parts = parse_weighted(text)
    check_base(pooled_of(clip, ""), loaded)
    null = loaded.model.null
    distinct = list(dict.fromkeys(part.text for part in parts))
    pooled = {t: pooled_of(clip, t).to(null) for t in distinct}
    stacked = torch.cat([pooled[part.text] for part in parts])
    weights = torch.tensor([part.weight for part in parts]).to(null)
    return combine_embeddings(stacked, null, weights)[None]


def image_embedding(
    clip_vision_output: Any, loaded: Loaded, weight: float = 1.0, bridge: str = DEFAULT_BRIDGE
) -> torch.Tensor:
    """The pooled embedding [1, D] of CLIPVisionEncode's output: its image_embeds [N, P]
    (projected, as transformers' CLIPVisionModelWithProjection gives them) bridged to text
    space with the deprojector folder's statistics and brought to pooled space
    (bridged_image_embeds), the N images combined as parts of one prompt of weight `weight`
    each: Σ_k w (e_k − null) + null (PromptEncoder.embedding with image parts)."""
    checked_weight(weight, "the image weight")
    embeds = getattr(clip_vision_output, "image_embeds", None)
    if embeds is None:
        raise NodeError(
            "this CLIP vision output has no image_embeds: encode the image with a CLIP vision "
            "model with projection (CLIPVisionEncode)"
        )
    model = loaded.model
    width = model.config.projection_size
    if embeds.dim() != 2 or embeds.shape[-1] != width:
        raise BaseMismatchError(
            f"the deprojector {loaded.name!r} reads image embeddings of width P={width} "
            f"({model.config.base_clip or 'base not recorded'}); this CLIP vision output's "
            f"image_embeds are {list(embeds.shape)}: load the vision model of its base CLIP"
        )
    pooled = bridged_image_embeds(
        embeds.float(), model, loaded.gap, None if bridge == DEFAULT_BRIDGE else bridge
    )
    weights = torch.full((pooled.shape[0],), float(weight))
    return combine_embeddings(pooled, model.null, weights)[None]


def conditioning(loaded: Loaded, embeds: torch.Tensor, what: str) -> list:
    """CONDITIONING of pooled embeddings [B, D] as CLIPTextEncode lays it out:
    [[states [B, 77, D], {"pooled_output": embeds [B, D]}]]."""
    if embeds.dim() != 2 or embeds.shape[-1] != loaded.model.config.hidden_size:
        raise NodeError(
            f"{what}: an embedding of shape {list(embeds.shape)} does not fit the deprojector "
            f"{loaded.name!r} (D={loaded.model.config.hidden_size}): combine embeddings made "
            "with the same deprojector"
        )
    embeds = embeds.to(loaded.model.null)
    return [[deproject_checked(loaded.model, embeds, what), {"pooled_output": embeds}]]


# --- the nodes ------------------------------------------------------------------------------

WEIGHT = ("FLOAT", {"default": 1.0, "min": -MAX_WEIGHT, "max": MAX_WEIGHT, "step": 0.05})
OUTPUTS = ("CONDITIONING", EMBEDDING)
OUTPUT_NAMES = ("conditioning", "embedding")


class DeprojectorLoader:
    """Load a deprojector folder from models/deprojectors."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (DEPROJECTOR,)
    RETURN_NAMES = ("deprojector",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Loads a trained deprojector (a folder with config.json and model.safetensors, and the "
        "modality-gap statistics for image prompts) from ComfyUI/models/deprojectors."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"deprojector_name": (deprojector_names(),)}}

    def load(self, deprojector_name: str) -> tuple[Loaded]:
        return (load(find_deprojector(deprojector_name), deprojector_name),)


class DeprojectText:
    """A text prompt in the deprojector's grammar -> deprojected CONDITIONING."""

    CATEGORY = CATEGORY
    RETURN_TYPES = OUTPUTS
    RETURN_NAMES = OUTPUT_NAMES
    FUNCTION = "encode"
    DESCRIPTION = (
        "Comma-separated parts with optional weights ('red circle:1.2, blue square:-0.5'), "
        "each encoded alone by the checkpoint's CLIP, combined as Σ w (e − null) + null and "
        "deprojected to 77 states; brackets are plain text, not ComfyUI's emphasis."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "the CLIP the deprojector was trained on"}),
                "deprojector": (DEPROJECTOR,),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            }
        }

    def encode(self, clip: Any, deprojector: Loaded, text: str) -> tuple[list, torch.Tensor]:
        embeds = text_embedding(clip, deprojector, text)
        return conditioning(deprojector, embeds, text), embeds


class DeprojectImage:
    """A CLIP vision output (an image prompt) -> deprojected CONDITIONING."""

    CATEGORY = CATEGORY
    RETURN_TYPES = OUTPUTS
    RETURN_NAMES = OUTPUT_NAMES
    FUNCTION = "encode"
    DESCRIPTION = (
        "CLIPVisionEncode's image embedding brought across the modality gap (the bridge the "
        "deprojector was trained with, or another) to the pooled text space, deprojected; a "
        "batch of images is one prompt of several parts."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "deprojector": (DEPROJECTOR,),
                "clip_vision_output": ("CLIP_VISION_OUTPUT",),
                "weight": WEIGHT,
                "bridge": ([DEFAULT_BRIDGE, *BRIDGES], {"default": DEFAULT_BRIDGE}),
            }
        }

    def encode(
        self, deprojector: Loaded, clip_vision_output: Any, weight: float, bridge: str
    ) -> tuple[list, torch.Tensor]:
        embeds = image_embedding(clip_vision_output, deprojector, weight, bridge)
        return conditioning(deprojector, embeds, "the image prompt"), embeds


class DeprojectorCombine:
    """Two embeddings as parts of one prompt: w_a (a − null) + w_b (b − null) + null."""

    CATEGORY = CATEGORY
    RETURN_TYPES = OUTPUTS
    RETURN_NAMES = OUTPUT_NAMES
    FUNCTION = "combine"
    DESCRIPTION = (
        "Adds two embeddings (a text and an image, two texts) as the parts of one prompt: "
        "w_a (a − null) + w_b (b − null) + null, then deprojects; a negative weight subtracts."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "deprojector": (DEPROJECTOR,),
                "embedding_a": (EMBEDDING,),
                "weight_a": WEIGHT,
                "embedding_b": (EMBEDDING,),
                "weight_b": WEIGHT,
            }
        }

    def combine(
        self,
        deprojector: Loaded,
        embedding_a: torch.Tensor,
        weight_a: float,
        embedding_b: torch.Tensor,
        weight_b: float,
    ) -> tuple[list, torch.Tensor]:
        null = deprojector.model.null
        weights = torch.tensor(
            [checked_weight(weight_a, "weight_a"), checked_weight(weight_b, "weight_b")]
        )
        a, b = (
            matching(e, embedding_a, deprojector, "combine") for e in (embedding_a, embedding_b)
        )
        embeds = combine_embeddings(torch.stack([a, b], dim=-2), null, weights)
        return conditioning(deprojector, embeds, "the combination"), embeds


class DeprojectorInterpolate:
    """The embedding a fraction t of the way from a to b around null, linear or slerp."""

    CATEGORY = CATEGORY
    RETURN_TYPES = OUTPUTS
    RETURN_NAMES = OUTPUT_NAMES
    FUNCTION = "interpolate"
    DESCRIPTION = (
        "Interpolates between two embeddings centred on null (the empty prompt): linear, or "
        "spherical (slerp) on the offsets from null, which keeps their length; then deprojects."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "deprojector": (DEPROJECTOR,),
                "embedding_a": (EMBEDDING,),
                "embedding_b": (EMBEDDING,),
                "t": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05}),
                "method": (["linear", "slerp"], {"default": "linear"}),
            }
        }

    def interpolate(
        self,
        deprojector: Loaded,
        embedding_a: torch.Tensor,
        embedding_b: torch.Tensor,
        t: float,
        method: str,
    ) -> tuple[list, torch.Tensor]:
        if method not in ("linear", "slerp"):
            raise NodeError(f"method {method!r}: use 'linear' or 'slerp'")
        a, b = (
            matching(e, embedding_a, deprojector, "interpolate") for e in (embedding_a, embedding_b)
        )
        embeds = interpolate_embeddings(a, b, deprojector.model.null, t, method == "slerp")
        return conditioning(deprojector, embeds, f"the interpolation at t={t:g}"), embeds


def matching(embeds: torch.Tensor, first: torch.Tensor, loaded: Loaded, node: str) -> torch.Tensor:
    """`embeds` [B, D] on the deprojector's device, checked to share `first`'s shape."""
    if embeds.shape != first.shape or embeds.shape[-1] != loaded.model.config.hidden_size:
        raise NodeError(
            f"{node}: the embeddings have shapes {list(first.shape)} and {list(embeds.shape)}; "
            f"both must be [B, {loaded.model.config.hidden_size}] from the same deprojector"
        )
    return embeds.to(loaded.model.null)


NODE_CLASS_MAPPINGS = {
    "DeprojectorLoader": DeprojectorLoader,
    "DeprojectText": DeprojectText,
    "DeprojectImage": DeprojectImage,
    "DeprojectorCombine": DeprojectorCombine,
    "DeprojectorInterpolate": DeprojectorInterpolate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DeprojectorLoader": "Load Deprojector",
    "DeprojectText": "Deproject Text (CLIP)",
    "DeprojectImage": "Deproject Image (CLIP Vision)",
    "DeprojectorCombine": "Deprojector Combine",
    "DeprojectorInterpolate": "Deprojector Interpolate",
}
