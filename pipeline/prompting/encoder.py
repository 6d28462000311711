"""The one path from prompts to Stable Diffusion conditioning, as diffusers' `encode_prompt`.

    from pipeline import PromptEncoder
    encoder = PromptEncoder.from_pretrained("models/vicinity-batch")   # its base CLIP, gap
    embeds = encoder.encode_prompt("red circle:1.2, blue square")      # [1, 77, D]
    image = pipe(prompt_embeds=embeds,
                 negative_prompt_embeds=encoder.encode_negative("")).images[0]

Every form of prompt goes through this class: the reference (the ordinary CLIP last hidden
state of the prompt, no deprojector), the whole prompt's pooled embedding deprojected, the
comma-separated parts combined as e = Σ_k w_k (e_k − null) + null over text parts (grammar:
pipeline/prompting/grammar.py) and image parts (pipeline/prompting/images.py), interpolation
between two
such embeddings around null, and negative prompts. The deprojector turns e into the 77 hidden
states a StableDiffusionPipeline takes as prompt_embeds.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from PIL import Image

from pipeline.base.clip_encode import Encoded, encode_texts, token_ids
from pipeline.base.loaders import ClipText, load_clip
from pipeline.base.vision import ImageTower
from pipeline.core.conventions import MAX_LENGTH, combine_embeddings, interpolate_embeddings
from pipeline.models import Deprojector, load_deprojector
from pipeline.models.base import SAMPLING_KEYWORDS
from pipeline.prompting.bridges import ModalityGap, image_pooled, saved_gap
from pipeline.prompting.grammar import WEIGHT_NUMBER, PromptError, checked_weight, parse_weighted
from pipeline.prompting.images import ImagePromptError, checked_rgb, load_image
from pipeline.world.config import WORLD_DIR


@dataclass
class ImagePart:
    """An image prompt: a file path or an RGB PIL image, and its weight."""

    image: str | Path | Image.Image
    weight: float = 1.0

    def __post_init__(self) -> None:
        checked_weight(self.weight, f"image prompt {self.name!r}")

    @classmethod
    def parse(cls, argument: str) -> ImagePart:
        """`PATH[:WEIGHT]` as the CLI's --image takes it (a path's own colons are kept
        unless what follows the last one is a number)."""
        path, colon, weight = argument.rpartition(":")
        if colon and path and WEIGHT_NUMBER.fullmatch(weight.strip()):
            return cls(path, float(weight))
        return cls(argument)

    @property
    def name(self) -> str:
        return "<PIL image>" if isinstance(self.image, Image.Image) else str(self.image)

    def load(self) -> Image.Image:
        if isinstance(self.image, Image.Image):
            return checked_rgb(self.image, self.name)
        return load_image(self.image)


ENCODE_BATCH = 64  # distinct prompt parts per CLIP forward
# A word the base CLIP's BPE vocabulary splits into more pieces than this (or maps to its
# unknown token) is reported: a misspelling or a word the CLIP never learned, whose meaning
# the pieces may not carry. 2 lets through a stem and an ending.
MAX_WORD_PIECES = 2
WORD = re.compile(r"[^\W\d_]+")  # a run of letters: digits are single tokens in CLIP's BPE


def unknown_words(clip: ClipText, text: str) -> dict[str, int]:
    """The words (runs of letters) of `text` the base CLIP's tokenizer does not know: word ->
    the number of tokens it is split into (more than MAX_WORD_PIECES, or any unknown token)."""
    words = list(dict.fromkeys(WORD.findall(text)))
    if not words:
        return {}
    unknown = clip.tokenizer.unk_token_id
    pieces = {w: ids[1:-1] for w, ids in zip(words, token_ids(clip, words), strict=True)}
    return {
        w: len(ids) for w, ids in pieces.items() if len(ids) > MAX_WORD_PIECES or unknown in ids
    }


def truncated_text(clip: ClipText, text: str, ids: list[int] | None = None) -> str:
    """The words of `text` beyond CLIP's 75-token limit ("" if it fits); `ids`: its token
    ids, when already known."""
    ids = token_ids(clip, [text])[0] if ids is None else ids
    if len(ids) <= MAX_LENGTH:
        return ""
    # ids = BOS, tokens..., EOS; the encoder keeps BOS, 75 tokens and puts EOS last.
    # One sequence decodes to one str (transformers types decode for batches too).
    cut = cast(str, clip.tokenizer.decode(ids[MAX_LENGTH - 1 : -1], skip_special_tokens=True))
    return cut.strip()


def deproject_checked(
    deprojector: Deprojector, embeds: torch.Tensor, what: str = "the embedding"
) -> torch.Tensor:
    """Hidden states [N, 77, D] of pooled embeddings [N, D] (`deprojector.generate`); a
    PromptError naming `what` when the embeddings or the states are not finite."""
    if not torch.isfinite(embeds).all():
        raise PromptError(f"{what!r}: its pooled embedding is not finite (NaN or Inf)")
    states = deprojector.generate(embeds)
    if not torch.isfinite(states).all():
        raise PromptError(
            f"{what!r}: the deprojector's states are not finite (NaN or "
            "Inf); the embedding lies far outside what it was trained on "
            "(smaller weights?)"
        )
    return states


def bridged_image_embeds(
    image_embeds: torch.Tensor,
    deprojector: Deprojector,
    gap: ModalityGap | None,
    bridge: str | None = None,
) -> torch.Tensor:
    """Pooled-space embeddings [N, D] of a vision tower's image_embeds [N, P]: the bridge to
    text space (a name of BRIDGES; None: the statistics' default, the one the deprojector was
    trained with), then the pseudo-inverse of the text projection (bridges.image_pooled). An
    ImagePromptError when a bridge other than 'none' is asked for without statistics."""
    if bridge != "none" and gap is None:
        raise ImagePromptError(
            "image prompts need the modality-gap statistics of this base CLIP: run "
            "`deprojector gap` (writes data/gap/) and load them, or use no bridge "
            "(bridge='none', --bridge none)"
        )
    return image_pooled(
        image_embeds, deprojector.deprojection, None if bridge == "none" else gap, bridge
    )


class PromptEncoder:
    """A base CLIP (text tower; vision tower and gap statistics for image prompts) and,
    optionally, a deprojector: prompts of every kind -> Stable Diffusion conditioning.

    Without a deprojector only the reference (`deproject=False`) is available."""

    def __init__(
        self,
        clip: ClipText,
        deprojector: Deprojector | None = None,
        tower: ImageTower | None = None,
        gap: ModalityGap | None = None,
    ) -> None:
        if deprojector is not None:
            deprojector.check_base(
                clip.hidden_size, clip.projection_size, clip.fingerprint, clip.clip_skip
            )
        self.clip, self.deprojector, self.tower, self.gap = clip, deprojector, tower, gap
        self.cut: dict[str, str] = {}  # text -> the words CLIP's truncation dropped
        self.unknown: dict[str, dict[str, int]] = {}  # text -> its unknown_words

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        clip: str | None = None,
        gap: str | Path | None = None,
        images: bool = True,
        device: str = "cpu",
        base_dir: Path = WORLD_DIR,
        clip_skip: int | None = None,
    ) -> PromptEncoder:
        """The deprojector folder or Hugging Face Hub id `model` (None: the reference only)
        with its base CLIP.

        clip: `builtin`, a folder or a hub id; None: the base the deprojector was trained on
        (its config records it). gap: modality-gap statistics (a `gap` stage folder or file);
        None: those saved with the deprojector, if any. images: also load the vision tower
        (image prompts without gap statistics need bridge='none'). clip_skip: the CLIP layer
        of the conditioning (diffusers' count, pipeline.base.clip_encode); None: the one the
        deprojector was trained on (0 without one). A deprojector trained on another clip
        skip raises BaseMismatchError."""
        deprojector = load_deprojector(model, device=device) if model is not None else None
        if clip is None:
            clip = deprojector.config.base_clip if deprojector is not None else ""
            if not clip:
                raise PromptError(
                    "give the base CLIP (clip=...): "
                    + (
                        "no deprojector"
                        if deprojector is None
                        else f"the deprojector in {model} does not record its base"
                    )
                )
        if clip_skip is None:
            clip_skip = deprojector.config.clip_skip if deprojector is not None else 0
        text = load_clip(clip, device=device, base_dir=base_dir, clip_skip=clip_skip)
        tower = ImageTower.load(clip, device, base_dir) if images else None
        if not images:
            stats = None
        elif gap is not None:
            stats = ModalityGap.load(gap)
        else:
            # the folder it loaded from: a Hub id resolves to its cached snapshot
            folder = deprojector.name_or_path if deprojector is not None else None
            stats = saved_gap(folder) if folder is not None else None
        return cls(text, deprojector, tower, stats)

    def sampling_kwargs(self) -> dict[str, int | float]:
        """The keywords of StableDiffusionPipeline.__call__ the deprojector's folder records
        (num_inference_steps, guidance_scale, height, width: params.yaml's render.* when it
        was trained): `pipe(prompt_embeds=..., **encoder.sampling_kwargs())` draws what the
        pipeline draws. {} without a deprojector or for a folder saved before they were
        recorded (diffusers' defaults then apply). The scheduler is the pipeline's own:
        `deprojector.config.sampling["scheduler"]` names the one it was drawn with."""
        sampling = self.deprojector.config.sampling if self.deprojector is not None else {}
        return {
            keyword: value
            for key, value in sampling.items()
            if (keyword := SAMPLING_KEYWORDS[key]) is not None
        }

    def with_deprojector(self, deprojector: Deprojector | None) -> PromptEncoder:
        """The same base CLIP, tower and statistics with another deprojector (None: the
        reference only)."""
        return type(self)(self.clip, deprojector, self.tower, self.gap)

    # --- pooled space ---------------------------------------------------------------------

    def _encode(self, text: str) -> Encoded:
        """The CLIP output of one text (as the SD pipeline encodes a prompt: alone, 77
        positions), warning about what truncation cut and words CLIP does not know."""
        self._warn_text(text)
        return encode_texts(self.clip, [text])

    def _warn_text(self, text: str, ids: list[int] | None = None) -> None:
        unknown = unknown_words(self.clip, text)
        if unknown:
            self.unknown[text] = unknown
            words = ", ".join(f"{w!r} ({n} tokens)" for w, n in unknown.items())
            warnings.warn(
                f"prompt part {text[:60]!r}: the base CLIP's vocabulary does not know {words}; "
                "split into pieces, their meaning may be lost (a misspelling?)",
                stacklevel=4,
            )
        cut = truncated_text(self.clip, text, ids)
        if cut:
            self.cut[text] = cut
            warnings.warn(
                f"prompt part {text[:60]!r} is longer than CLIP's {MAX_LENGTH - 2} "
                f"tokens; cut off: {cut!r}",
                stacklevel=4,
            )

    def _pooled(self, texts: list[str]) -> torch.Tensor:
        """Pooled CLIP outputs [len(texts), D], each text encoded as alone (no attention mask:
        rows do not interact): every distinct text once, ENCODE_BATCH per forward. A prompt
        of 10,000 parts from 12 distinct words costs one forward of 12 texts."""
        distinct = list(dict.fromkeys(texts))
        for text, ids in zip(distinct, token_ids(self.clip, distinct), strict=True):
            self._warn_text(text, ids)
        pooled = torch.cat(
            [
                encode_texts(self.clip, distinct[b : b + ENCODE_BATCH]).pooled
                for b in range(0, len(distinct), ENCODE_BATCH)
            ]
        )
        row = {text: k for k, text in enumerate(distinct)}
        return pooled[[row[text] for text in texts]]

    def image_embedding(self, images: list[Image.Image], bridge: str | None = None) -> torch.Tensor:
        """Pooled-space embeddings [N, D] of RGB images: vision tower, the bridge to text
        space (a name of BRIDGES; None: the statistics' default, the one the deprojector
        was trained with), pseudo-inverse of the text projection."""
        model = self._deprojector()
        if self.tower is None:
            raise ImagePromptError(
                "this PromptEncoder has no vision tower: load it with "
                "images=True (a base CLIP with both towers)"
            )
        return bridged_image_embeds(self.tower.embed(images), model, self.gap, bridge)

    def embedding(
        self,
        prompt: str = "",
        images: Sequence[ImagePart] = (),
        bridge: str | None = None,
        combine: bool = True,
    ) -> torch.Tensor:
        """The pooled embedding [1, D] a deprojector receives.

        combine: e = Σ_k w_k (e_k − null) + null over the text parts and images; otherwise
        the pooled embedding of the whole prompt as written (no weights, no images)."""
        null = self._deprojector().null
        parts = parse_weighted(prompt) if prompt.strip() or not images else []
        if not combine:
            if images:
                raise PromptError(
                    "image parts are combined with the text parts: they need "
                    "combine=True (drop --no-combine)"
                )
            self._refuse_weights(prompt, parts, "the whole-prompt mode")
            return self._encode(prompt).pooled.to(null)
        pooled = [self._pooled([part.text for part in parts]).to(null)] if parts else []
        weights = [part.weight for part in parts]
        if images:
            pooled.append(self.image_embedding([part.load() for part in images], bridge))
            weights += [part.weight for part in images]
        return combine_embeddings(torch.cat(pooled), null, torch.tensor(weights).to(null))[None]

    # --- conditioning ---------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str = "",
        images: Sequence[ImagePart] = (),
        bridge: str | None = None,
        combine: bool = True,
        deproject: bool = True,
    ) -> torch.Tensor:
        """prompt_embeds [1, 77, D] of a prompt.

        deproject False: the reference, the CLIP last hidden state of the prompt as written.
        Otherwise the deprojected `embedding(prompt, images, bridge, combine)`."""
        if not deproject:
            if images:
                raise PromptError("image prompts need a deprojector (drop --no-deprojector)")
            self._refuse_weights(prompt, parse_weighted(prompt), "the reference")
            return self._encode(prompt).hidden
        return self.deproject(self.embedding(prompt, images, bridge, combine), prompt)

    def encode_prompts(
        self, prompts: Sequence[str], combine: bool = True, deproject: bool = True
    ) -> torch.Tensor:
        """encode_prompt of each text prompt, stacked: [N, 77, D]."""
        return torch.cat(
            [self.encode_prompt(p, combine=combine, deproject=deproject) for p in prompts]
        )

    def encode_blend(self, prompt: str) -> torch.Tensor:
        """prompt_embeds [1, 77, D]: the ordinary CLIP states of the comma parts, averaged with
        their weights, Σ_k w_k H(part_k) / Σ_k w_k, computed by compel's `.blend()` (what
        compel and ComfyUI's ConditioningAverage offer for "A, B" without a deprojector).

        Raises PromptError for an empty prompt or weights that sum to 0."""
        from compel import Compel, ReturnedEmbeddingsType
        from compel.prompt_parser import Blend, FlattenedPrompt, Fragment

        # compel's states of the CLIP's layer: the last, or the penultimate through the final
        # LayerNorm (its "clip skip", diffusers' clip_skip 1); it has no deeper one.
        layers = {
            0: ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
            1: ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED,
        }
        if self.clip.clip_skip not in layers:
            raise PromptError(
                f"the blend baseline (compel) knows clip skip 0 and 1, not {self.clip.clip_skip}"
            )
        parts = parse_weighted(prompt)
        weights = [part.weight for part in parts]
        if not parts or sum(weights) == 0:
            raise PromptError(f"{prompt!r}: a blend needs parts whose weights do not sum to 0")
        for part in parts:
            self._warn_text(part.text)
        blend = Blend(
            [FlattenedPrompt([Fragment(part.text)]) for part in parts],
            weights,
            normalize_weights=True,
        )
        compel = Compel(
            tokenizer=self.clip.tokenizer,
            text_encoder=self.clip.model,
            returned_embeddings_type=layers[self.clip.clip_skip],
        )
        with torch.inference_mode():
            (states, _tokens), _options = compel.build_conditioning_tensor_for_prompt_object(blend)
        return states

    def deproject(self, embeds: torch.Tensor, what: str = "the embedding") -> torch.Tensor:
        """Hidden states [N, 77, D] of pooled embeddings [N, D], checked finite."""
        return deproject_checked(self._deprojector(), embeds, what)

    def interpolate(
        self, start: torch.Tensor, end: torch.Tensor, ts: Sequence[float], spherical: bool = False
    ) -> torch.Tensor:
        """prompt_embeds [len(ts), 77, D] along start -> end (pooled [1, D] each), centred on
        null: linear, or spherical with `spherical`."""
        null = self._deprojector().null
        embeds = torch.cat([interpolate_embeddings(start, end, null, t, spherical) for t in ts])
        return self.deproject(embeds, "the interpolation")

    def encode_negative(self, prompt: str = "", deproject: bool = True) -> torch.Tensor:
        """negative_prompt_embeds [1, 77, D]: deprojected like a prompt (weights allowed; ""
        deprojects null), or with deproject=False the ordinary CLIP states, as the pipeline
        encodes its negative_prompt."""
        if not deproject:
            return (
                self.encode_prompt(prompt, deproject=False)
                if prompt.strip()
                else self._encode("").hidden
            )
        if not prompt.strip():
            return self.deproject(self._deprojector().null[None], "the empty negative prompt")
        return self.encode_prompt(prompt)

    def metadata(self) -> dict[str, str]:
        """What made this encoder's conditioning, as strings (a safetensors header's
        metadata): `deprojector` (its folder, "" for the reference), `model_type`,
        `base_clip` (the deprojector's recorded base, else the CLIP's folder or hub id),
        `base_fingerprint` and `clip_skip`."""
        config = self.deprojector.config if self.deprojector is not None else None
        return {
            "deprojector": str(self.deprojector.name_or_path) if self.deprojector else "",
            "model_type": config.model_type if config else "",
            "base_clip": (config.base_clip if config else "") or str(self.clip.model.name_or_path),
            "base_fingerprint": self.clip.fingerprint,
            "clip_skip": str(self.clip.clip_skip),
        }

    # --- helpers --------------------------------------------------------------------------

    def _deprojector(self) -> Deprojector:
        if self.deprojector is None:
            raise PromptError(
                "this PromptEncoder has no deprojector: only the reference "
                "(deproject=False) is available"
            )
        return self.deprojector

    @staticmethod
    def _refuse_weights(prompt: str, parts, mode: str) -> None:
        weighted = [p for p in parts if p.explicit]
        if weighted:
            raise PromptError(
                f"prompt {prompt!r}: the weight of {weighted[0].text!r} needs a deprojector "
                f"combining the parts (weights scale e_k − null); {mode} encodes the text as "
                "it is"
            )


__all__ = [
    "ImagePart",
    "PromptEncoder",
    "PromptError",
    "ImagePromptError",
    "bridged_image_embeds",
    "deproject_checked",
]
