"""Deprojector architectures: the registry, building from hyperparameters, loading a folder.

Every module of this package that defines a `@register`-ed `Deprojector` subclass is an
architecture; importing the package imports them all, so adding one is adding its file.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.conventions import CONSTANT_NAMES
from pipeline.core.errors import read_json
from pipeline.core.hub import HubOptions, resolve_folder
from pipeline.models.base import (
    ARCHITECTURES,
    COMPOSITES,
    CONFIG_FILE,
    BaseMismatchError,
    Deprojector,
    DeprojectorConfig,
    ModelFileError,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# Config fields that come from the base model and the architecture, never from params.
FIXED_FIELDS = (
    "model_type",
    "hidden_size",
    "projection_size",
    "base_clip",
    "base_fingerprint",
    "sampling",  # render.*, recorded by training
    "clip_skip",
)


def architecture(model_type: str) -> type[Deprojector]:
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {model_type!r} (known: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]


def hyperparameters(model_type: str) -> dict[str, Any]:
    """The settable hyperparameters of an architecture and their defaults."""
    config_class = architecture(model_type).config_class
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None)
        for f in dataclasses.fields(config_class)
        if f.name not in FIXED_FIELDS
    }


def check_hyperparameters(model_type: str, hparams: dict[str, Any]) -> None:
    """Raise naming the first key that `model_type` does not know."""
    allowed = hyperparameters(model_type)
    for key in hparams:
        if key not in allowed:
            raise ValueError(
                f"unknown hyperparameter {key!r} for {model_type} (known: {', '.join(allowed)})"
            )


def build_deprojector(
    model_type: str,
    hidden_size: int,
    projection_size: int,
    constants: dict[str, torch.Tensor],
    base: nn.Module | None = None,
    **hparams: Any,
) -> Deprojector:
    """A freshly initialised `model_type` deprojector with the base model's constants set.

    With `base` (a CLIP text model), the architecture takes its defaults from the base config
    (`config_from_base`; explicit hparams win) and its initial weights (`init_from_base`).
    """
    model_class = architecture(model_type)
    check_hyperparameters(model_type, hparams)
    if sorted(constants) != sorted(CONSTANT_NAMES):
        raise ValueError(
            f"constants must be exactly {', '.join(CONSTANT_NAMES)}, "
            f"got {', '.join(sorted(constants))}"
        )
    if base is not None:
        text_model = getattr(base, "text_model", base)  # CLIPTextModelWithProjection wraps it
        hparams = {**model_class.config_from_base(text_model.config), **hparams}
    config = model_class.config_class(
        model_type=model_type, hidden_size=hidden_size, projection_size=projection_size, **hparams
    )
    model = model_class(config)
    model.set_constants(**constants)
    if base is not None:
        model.init_from_base(text_model)
    return model


def load_deprojector(
    path: str | Path, device: str | torch.device = "cpu", **hub: Any
) -> Deprojector:
    """Deprojector.from_pretrained: a folder or a Hub id (`hub`: HubOptions' keywords)."""
    return Deprojector.from_pretrained(path, device=device, **hub)


def recorded_sampling(path: str | Path, **hub: Any) -> dict[str, Any]:
    """The sampling settings (render.* names: steps, guidance_scale, height, width,
    scheduler) the deprojector in `path` (a folder or a Hub id) records; {} for a folder
    saved before they were recorded, or where there is no deprojector (loading it then
    says why)."""
    try:
        folder = resolve_folder(path, HubOptions(**hub))
    except FileNotFoundError:
        return {}
    if not (folder / CONFIG_FILE).is_file():
        return {}
    raw = read_json(folder / CONFIG_FILE, ModelFileError, "train or save it again")
    sampling = raw.get("sampling") or {}
    return dict(sampling) if isinstance(sampling, dict) else {}


__all__ = [
    "ARCHITECTURES",
    "COMPOSITES",
    "BaseMismatchError",
    "Deprojector",
    "DeprojectorConfig",
    "ModelFileError",
    "architecture",
    "build_deprojector",
    "check_hyperparameters",
    "hyperparameters",
    "load_deprojector",
    "recorded_sampling",
]
