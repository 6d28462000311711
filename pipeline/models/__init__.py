"""Deprojector models: the registry, building from hyperparameters, loading from a folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.models.base import Deprojector, DeprojectorConfig
from pipeline.models.transformer import TransformerConfig, TransformerDeprojector
from pipeline.models.vicinity import (
    VicinityBatchDeprojector,
    VicinityConfig,
    VicinityDeprojector,
    VicinityIndividualDeprojector,
)

MODELS: dict[str, type[Deprojector]] = {
    cls.model_type: cls
    for cls in (TransformerDeprojector, VicinityBatchDeprojector, VicinityIndividualDeprojector)
}

CONSTANTS = ("sos", "null", "deprojection")


def build_deprojector(
    name: str,
    hidden_size: int,
    projection_size: int,
    constants: dict[str, torch.Tensor],
    **hparams: object,
) -> Deprojector:
    """A freshly initialised model of type `name` with the base model's constants set."""
    if name not in MODELS:
        raise ValueError(f"unknown deprojector {name!r} (known: {', '.join(MODELS)})")
    model_class = MODELS[name]
    fixed = {"model_type", "hidden_size", "projection_size"}
    allowed = [f.name for f in dataclasses.fields(model_class.config_class) if f.name not in fixed]
    for key in hparams:
        if key not in allowed:
            raise ValueError(
                f"unknown hyperparameter {key!r} for {name} (known: {', '.join(allowed)})"
            )
    if sorted(constants) != sorted(CONSTANTS):
        raise ValueError(
            f"constants must be exactly {', '.join(CONSTANTS)}, got {', '.join(sorted(constants))}"
        )
    config = model_class.config_class(
        model_type=name, hidden_size=hidden_size, projection_size=projection_size, **hparams
    )
    model = model_class(config)
    model.set_constants(**constants)
    return model


def load_deprojector(path: str | Path, device: str | torch.device = "cpu") -> Deprojector:
    return Deprojector.from_pretrained(path, device=device)


__all__ = [
    "MODELS",
    "Deprojector",
    "DeprojectorConfig",
    "TransformerConfig",
    "TransformerDeprojector",
    "VicinityConfig",
    "VicinityBatchDeprojector",
    "VicinityDeprojector",
    "VicinityIndividualDeprojector",
    "build_deprojector",
    "load_deprojector",
]
