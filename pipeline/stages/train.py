"""The `train@NAME` stage: train one run of `models:` on the shards (pipeline/training)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.params import Params
from pipeline.config.runs import check_runs
from pipeline.training.loop import train_model


def run_train_stage(name: str, params: Params, shards_dir: Path = Path("data/shards")) -> None:
    """models/NAME (config.json + model.safetensors) and reports/train/NAME.json."""
    check_runs(params.models)
    train_model(name, params, shards_dir)
