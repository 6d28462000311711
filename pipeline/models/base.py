"""What every deprojector shares: config, constants, null-relative inputs, saving and loading.

A deprojector maps one pooled CLIP text embedding e [D] to the 77 x D last hidden state H.
Position 0 of H is the same `sos` vector for every prompt, so it is prepended, not predicted.
Inputs are taken relative to `null` (the pooled embedding of the empty prompt); outputs are
absolute hidden states. An architecture is one module of this package: a config dataclass and
a `Deprojector` subclass implementing `predict` (teacher-forced) and `generation_steps` (its
fast autoregressive path, one state at a time), decorated with `@register`. What it takes from
the base CLIP text model is its own hook (`config_from_base`, `init_from_base`). See
docs/architectures.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers.activations import ACT2FN

from pipeline.core.atomic import save_tensors, write_text
from pipeline.core.conventions import MAX_LENGTH
from pipeline.core.errors import DeprojectorError, read_json, read_safetensors
from pipeline.core.hub import HubOptions, copy_companions, push_folder, resolve_folder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The sampling settings a config records (params.yaml's render.* names) and the keyword of
# StableDiffusionPipeline.__call__ each is (the scheduler is the pipeline's, not a keyword).
SAMPLING_KEYWORDS = {
    "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "height": "height",
    "width": "width",
    "scheduler": None,
}


class BaseMismatchError(DeprojectorError, ValueError):
    """A deprojector used with a base CLIP other than the one it was trained on."""


class ModelFileError(DeprojectorError, ValueError):
    """A deprojector folder's config.json or model.safetensors is corrupt, incomplete or does
    not describe a model this version can build; the message names the file."""


# Activations by the names CLIP's config uses for `hidden_act` ("quick_gelu", "gelu", ...).
ACTIVATIONS = ACT2FN


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is unknown (known: {', '.join(ACTIVATIONS)})")


Linear = Callable[..., torch.Tensor]  # (x, weight, bias) -> x @ weight.T + bias, like F.linear


def few_rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias (what nn.Linear computes), as (weight @ x.T + bias).T.

    Same numbers up to rounding, but for the few rows of a generation step the CPU BLAS runs
    this orientation about twice as fast (measured with MKL, 16 rows, D = 768).
    """
    x_t = x.T.contiguous()  # a contiguous [K, rows] operand is faster still, and cheap to make
    y = weight @ x_t if bias is None else torch.addmm(bias[:, None], weight, x_t)
    return y.T  # a transposed view; elementwise ops and the next call take it as it is


# Config fields are plain scalars (an ensemble's member list aside); values arrive from YAML
# and JSON, so check them by type.
# transformers' CLIPTextModel, as init_from_base reads it: submodules reached by name
# (encoder.layers[k].self_attn, final_layer_norm, config), which nn.Module's typing cannot
# follow (its attribute lookup says only "Tensor or Module").
ClipTextModel = Any

_FIELD_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "list[str]": list,
    "dict": dict,
}


@dataclass
class DeprojectorConfig:
    model_type: str
    hidden_size: int  # D: width of the CLIP text model
    projection_size: int  # P: width of text_embeds / image_embeds
    num_positions: int = 77
    # The base CLIP it was trained on (`builtin`, a hub id or a folder) and the fingerprint of
    # that CLIP's files (pipeline.base.files.clip_fingerprint); "" when not recorded.
    base_clip: str = ""
    base_fingerprint: str = ""
    # The sampling settings the base SD draws best with, recorded at training from render.*
    # (steps, guidance_scale, height, width, scheduler): the defaults of `generate` and of
    # PromptEncoder.sampling_kwargs outside a project. {} when not recorded (older folders).
    sampling: dict = dataclasses.field(default_factory=dict)
    # The CLIP layer of its targets, in diffusers' count (pipeline.base.clip_encode): 0 the
    # last layer, 1 the penultimate (A1111's "clip skip 2"); folders saved before it was
    # recorded were trained on the last layer.
    clip_skip: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            expected = f.type if isinstance(f.type, type) else _FIELD_TYPES[f.type]
            value = getattr(self, f.name)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            # bool is an int subclass, but True is no valid hidden_size.
            is_bool = isinstance(value, bool)
            if not isinstance(value, expected) or (is_bool and expected is not bool):
                raise ValueError(f"{type(self).__name__}.{f.name} must be {f.type}, got {value!r}")
        for name in ("hidden_size", "projection_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.sampling) - set(SAMPLING_KEYWORDS))
        if unknown:
            raise ValueError(
                f"sampling: unknown setting(s) {', '.join(unknown)} "
                f"(known: {', '.join(SAMPLING_KEYWORDS)})"
            )
        if self.clip_skip < 0:
            raise ValueError(f"clip_skip must be >= 0, got {self.clip_skip}")
        if self.num_positions != MAX_LENGTH:  # every prompt_embeds SD takes has CLIP's 77
            raise ValueError(
                f"num_positions must be {MAX_LENGTH} (CLIP's context, the "
                f"positions Stable Diffusion is conditioned on), got "
                f"{self.num_positions}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeprojectorConfig:
        """The config of a parsed config.json; the keys diffusers' ConfigMixin adds
        (`_class_name`, `_diffusers_version`, ...: a leading underscore) are not fields."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s) {', '.join(unknown)} (known: {', '.join(known)})"
            )
        return cls(**d)


ARCHITECTURES: dict[str, type[Deprojector]] = {}  # model_type -> class, filled by @register
# Deprojectors made of other saved deprojectors, with no weights of their own (the ensemble):
# model_type -> class, filled by @register_composite; loaded by their own `from_folder`.
COMPOSITES: dict[str, type[Deprojector]] = {}

D_ = TypeVar("D_", bound="type[Deprojector]")


def register(cls: D_) -> D_:
    """Class decorator: make an architecture buildable and loadable by its `model_type`."""
    if not cls.model_type or cls.model_type in ARCHITECTURES:
        raise ValueError(f"{cls.__name__}: model_type {cls.model_type!r} is empty or taken")
    ARCHITECTURES[cls.model_type] = cls
    return cls


def register_composite(cls: D_) -> D_:
    """Class decorator: make a deprojector built from saved ones loadable by its model_type."""
    if not cls.model_type or cls.model_type in ARCHITECTURES or cls.model_type in COMPOSITES:
        raise ValueError(f"{cls.__name__}: model_type {cls.model_type!r} is empty or taken")
    COMPOSITES[cls.model_type] = cls
    return cls


class Deprojector(ModelMixin, ConfigMixin):
    """The base of every architecture: a diffusers `ModelMixin` + `ConfigMixin` whose config
    (the `config` property) is the architecture's config dataclass, the same fields as the
    ConfigMixin config saved to config.json (with diffusers' `_class_name` and
    `_diffusers_version`). Folders and Hub repositories load with `from_pretrained`, save
    with `save_pretrained`, upload with `push_to_hub`."""

    # ConfigMixin's file name (ModelMixin's too; ConfigMixin types it as None).
    config_name = CONFIG_FILE  # type: ignore[assignment]
    model_type: str = ""  # set by each registered subclass; its key in ARCHITECTURES
    config_class: type[DeprojectorConfig] = DeprojectorConfig
    # True: training passes the base CLIP text model to config_from_base and init_from_base.
    uses_base_model: bool = False
    # The base CLIP's constants (buffers, registered in __init__), typed for the checker:
    # nn.Module's attribute lookup says only "Tensor or Module".
    sos: torch.Tensor
    null: torch.Tensor
    deprojection: torch.Tensor

    def __init__(self, config: DeprojectorConfig) -> None:
        super().__init__()
        if config.model_type != self.model_type:
            raise ValueError(
                f"model_type {config.model_type!r} does not match {type(self).__name__} "
                f"({self.model_type!r})"
            )
        self._deprojector_config = config
        self.register_to_config(**config.to_dict())  # ConfigMixin's copy, saved as config.json
        self.name_or_path = "(unsaved deprojector)"
        D, P = config.hidden_size, config.projection_size
        # Constants of the base CLIP model, filled by set_constants and saved with the weights.
        self.register_buffer("sos", torch.zeros(D))
        self.register_buffer("null", torch.zeros(D))
        self.register_buffer("deprojection", torch.zeros(D, P))

    @property
    def config(self) -> DeprojectorConfig:  # type: ignore[override]
        """The architecture's config dataclass (ConfigMixin's FrozenDict holds its fields)."""
        return self._deprojector_config

    def to_json_string(self) -> str:
        """config.json's text: ConfigMixin's, refreshed from the config dataclass (training
        records the base CLIP and the sampling settings in it after construction)."""
        self.register_to_config(**self.config.to_dict())
        return super().to_json_string()

    def __getattr__(self, name: str) -> Any:
        # nn.Module's lookup (parameters, buffers, submodules), not ModelMixin's, which would
        # answer a config key first: `norm` the setting instead of `norm` the LayerNorm.
        return nn.Module.__getattr__(self, name)

    # --- subclass interface -----------------------------------------------------------------

    def predict(self, e_rel: torch.Tensor, prev_rel: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: e - null [B,D] and s_1..s_T - null [B,T,D] -> s_1..s_{T+1} [B,T+1,D]."""
        raise NotImplementedError

    def generation_steps(self, e_rel: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
        """Autoregressive, one state at a time (the fast path): from e - null [B,D], yields
        s_1 [B,D], receives (`send`) the state to feed back in its place, yields s_2, ...
        up to s_76. `generate_states` sends each state back; an ensemble sends its members'
        mean."""
        raise NotImplementedError
        yield  # a generator

    @classmethod
    def config_from_base(cls, text_config: Any) -> dict[str, Any]:
        """Hyperparameters taken from the base CLIP text model's config (params override)."""
        return {}

    def init_from_base(self, text_model: ClipTextModel) -> None:
        """Start from the base CLIP text model's weights (no-op for a fresh architecture)."""

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Hyperparameters for tests and quick runs at a tiny width (D = 32)."""
        return {}

    def generate_states(self, e_rel: torch.Tensor) -> torch.Tensor:
        """Autoregressive: e - null [B,D] -> s_1..s_76 [B,76,D], each fed back as input."""
        steps = self.generation_steps(e_rel)
        states = [next(steps)]
        for _ in range(self.config.num_positions - 2):
            states.append(steps.send(states[-1]))
        steps.close()
        return torch.stack(states, dim=1)

    def generate_states_naive(self, e_rel: torch.Tensor) -> torch.Tensor:
        """Reference generation: re-run `predict` on the whole prefix for every position.

        Quadratic, but plainly what generation means; `generate_states` must give the same.
        """
        prev = e_rel.new_zeros(e_rel.shape[0], 0, e_rel.shape[1])
        states = []
        for _ in range(self.config.num_positions - 1):
            s = self.predict(e_rel, prev)[:, -1]
            states.append(s)
            prev = torch.cat([prev, (s - self.null)[:, None]], dim=1)
        return torch.stack(states, dim=1)

    # --- public API ---------------------------------------------------------------------------

    @torch.no_grad()
    def set_constants(
        self, sos: torch.Tensor, null: torch.Tensor, deprojection: torch.Tensor
    ) -> None:
        for name, value in (("sos", sos), ("null", null), ("deprojection", deprojection)):
            buffer = getattr(self, name)
            if tuple(value.shape) != tuple(buffer.shape):
                raise ValueError(
                    f"constant {name} must have shape {tuple(buffer.shape)}, "
                    f"got {tuple(value.shape)}"
                )
            buffer.copy_(value)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced prediction of the whole sequence: [B,D], [B,77,D] -> [B,77,D]."""
        # Shapes only: a finiteness check here would cost a device sync every training step.
        n, D = self.config.num_positions, self.config.hidden_size
        if embeds.dim() != 2 or embeds.shape[1] != D:
            raise ValueError(f"embeds must have shape [B, {D}], got {list(embeds.shape)}")
        if hidden.dim() != 3 or hidden.shape[1:] != (n, D):
            raise ValueError(f"hidden must have shape [B, {n}, {D}], got {list(hidden.shape)}")
        embeds, hidden = embeds.to(self.null), hidden.to(self.null)
        # s_1..s_{n-2} are the previous states; the last state s_{n-1} is never an input.
        states = self.predict(embeds - self.null, hidden[:, 1 : n - 1] - self.null)
        return self._with_sos(states)

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states [B,77,D] from pooled embeddings [B,D]."""
        embeds = self._check_embeds(embeds, self.config.hidden_size, "embeds")
        return self._with_sos(self.generate_states(embeds - self.null))

    def check_base(
        self,
        hidden_size: int,
        projection_size: int,
        fingerprint: str | None = None,
        clip_skip: int | None = None,
    ) -> None:
        """Raise BaseMismatchError unless this deprojector fits a base CLIP of these widths,
        where both are known of this fingerprint, and where given of this clip skip (the
        layer whose states it was trained to produce)."""
        if clip_skip is not None and clip_skip != self.config.clip_skip:
            raise BaseMismatchError(
                f"deprojector in {self.name_or_path} was trained on the states of clip_skip "
                f"{self.config.clip_skip} (diffusers' count: 0 = last CLIP layer, 1 = "
                f"penultimate), not {clip_skip}: ask for clip_skip {self.config.clip_skip} "
                f"(--clip-skip {self.config.clip_skip}, extract.clip_skip) or train one on "
                f"clip_skip {clip_skip} shards"
            )
        for what, trained, base in (
            ("D", self.config.hidden_size, hidden_size),
            ("P", self.config.projection_size, projection_size),
        ):
            if trained != base:
                raise BaseMismatchError(
                    f"deprojector in {self.name_or_path} was trained for {what}={trained}, "
                    f"base model has {what}={base}; retrain it or use its base CLIP "
                    f"({self.config.base_clip or 'not recorded'})"
                )
        recorded = self.config.base_fingerprint
        if fingerprint and recorded and fingerprint != recorded:
            raise BaseMismatchError(
                f"deprojector in {self.name_or_path} was trained on the base CLIP "
                f"{self.config.base_clip!r} (fingerprint {recorded[:12]}), not on this one "
                f"(fingerprint {fingerprint[:12]}): same widths, other weights or tokenizer. "
                "Use its base CLIP or retrain it on this one"
            )

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | Path, companions: bool = True
    ) -> None:
        """config.json (ConfigMixin's, with `_class_name` and `_diffusers_version`) and
        model.safetensors in `save_directory`; with `companions`, the modality-gap statistics
        and the model card (README.md) of the folder it was loaded from, where it has them."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / CONFIG_FILE, self.to_json_string())
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_tensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        if companions:
            copy_companions(Path(str(self.name_or_path)), folder)

    def push_to_hub(  # type: ignore[override]
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload `save_pretrained`'s folder (config.json, model.safetensors, the members of
        an ensemble, and the modality_gap.safetensors and README.md model card of the folder
        it was loaded from) to the Hub repository `repo_id` ("owner/name"; created if
        missing) in one commit; returns the commit's URL. Needs a Hub token (`hf auth
        login` or `token=`)."""
        return push_folder(self.save_pretrained, repo_id, commit_message, private, token, create_pr)

    @classmethod
    def from_folder(
        cls, folder: Path, raw: dict[str, Any], device: str | torch.device = "cpu"
    ) -> Deprojector:
        """A composite's loader (register_composite): the deprojector whose parsed config.json
        is `raw`; from_pretrained calls it. Architectures with weights of their own have none."""
        raise NotImplementedError(f"{cls.__name__} is not a composite: use from_pretrained")

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        device: str | torch.device = "cpu",
        **hub: Any,
    ) -> Deprojector:
        """Load any saved deprojector (dispatching on model_type), in eval mode, from a folder
        or a Hub repository id ("owner/name", downloaded once into the Hugging Face cache;
        `HF_HUB_OFFLINE=1` or local_files_only=True reads the cache only). `hub`: the
        keywords of `HubOptions` (revision, cache_dir, local_files_only, token, subfolder).
        Folders saved before the diffusers layout (no `_class_name`) load the same.

        Raises FileNotFoundError (no such folder or repository), ModelFileError (a corrupt
        or foreign config.json / model.safetensors)."""
        # ARCHITECTURES is complete here: importing this module imports the package first,
        # whose __init__ imports every architecture.
        folder = resolve_folder(pretrained_model_name_or_path, HubOptions(**hub))
        config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"no deprojector in {folder}: {CONFIG_FILE} is missing")
        advice = "save or train the deprojector again (`deprojector train NAME`)"
        raw = read_json(config_file, ModelFileError, advice)
        model_type = raw.get("model_type")
        if isinstance(model_type, str) and model_type in COMPOSITES:
            return COMPOSITES[model_type].from_folder(folder, raw, device)
        if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
            raise ModelFileError(
                f"{config_file}: unknown model_type {model_type!r} "
                f"(known: {', '.join([*ARCHITECTURES, *COMPOSITES])})"
            )
        if not weights_file.is_file():
            raise FileNotFoundError(f"no deprojector in {folder}: {WEIGHTS_FILE} is missing")
        model_class = ARCHITECTURES[model_type]
        if not issubclass(model_class, cls):
            raise ModelFileError(f"{folder} holds a {model_type!r} model, not a {cls.__name__}")
        model = model_class(model_class.config_from_file(config_file, raw, advice))
        tensors = read_safetensors(weights_file, ModelFileError, advice)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as err:
            detail = " ".join(str(err).split())
            raise ModelFileError(
                f"{weights_file}: its tensors do not fit {config_file} ({detail}); {advice}"
            ) from err
        model.name_or_path = str(folder)
        nn.Module.to(model, device)  # in place (ModelMixin's `to` is typed for dtypes only)
        return model.eval()

    @classmethod
    def from_config(  # type: ignore[override]
        cls, config: dict[str, Any], **overrides: Any
    ) -> Deprojector:
        """A freshly initialised deprojector (random weights, zero constants) of a parsed
        config.json (`Deprojector.load_config(folder or Hub id)`) or of
        `model.config.to_dict()`: diffusers' `from_config`, `overrides` replacing fields, the
        architecture its model_type names. Raises ModelFileError for an unknown model_type
        or a composite (an ensemble is made of saved members: EnsembleDeprojector.of),
        ValueError for bad fields."""
        raw = {**config, **overrides}
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
            raise ModelFileError(
                f"from_config: model_type {model_type!r} has no architecture to build "
                f"(known: {', '.join(ARCHITECTURES)}; an ensemble is built from saved members)"
            )
        model_class = ARCHITECTURES[model_type]
        return model_class(model_class.config_class.from_dict(raw))

    @classmethod
    def config_from_file(
        cls, config_file: Path, raw: dict[str, Any], advice: str
    ) -> DeprojectorConfig:
        """This class's config from the parsed `config_file`, or ModelFileError naming it."""
        missing = [
            f.name
            for f in dataclasses.fields(cls.config_class)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in raw
        ]
        if missing:
            raise ModelFileError(
                f"{config_file}: missing keys {', '.join(missing)} (a "
                f"{cls.model_type} config needs them); {advice}"
            )
        try:
            return cls.config_class.from_dict(raw)
        except (TypeError, ValueError) as err:
            raise ModelFileError(f"{config_file}: {err}; {advice}") from err

    # --- helpers ------------------------------------------------------------------------------

    def _check_embeds(self, embeds: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if embeds.dim() != 2 or embeds.shape[1] != width:
            raise ValueError(f"{what} must have shape [B, {width}], got {list(embeds.shape)}")
        if not torch.isfinite(embeds).all():
            raise ValueError(f"{what} contain NaN or Inf values; expected finite embeddings")
        return embeds.to(self.null)  # the buffers' device and dtype

    def _with_sos(self, states: torch.Tensor) -> torch.Tensor:
        sos = self.sos.expand(states.shape[0], 1, -1)
        return torch.cat([sos, states], dim=1)
