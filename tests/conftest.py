"""Shared fixtures: a micro-world as the builtin base models and a small extracted dataset,
built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.base.loaders import load_clip
from pipeline.config.params import Params, parse_params
from pipeline.world.build import build_micro_world

SMALL = {
    "captions": {"train_size": 48, "test_size": 12, "seed": 0},
    "augment": {"split": 0.3, "combine": 0.3, "seed": 0},
    "extract": {"batch_size": 16, "rows_per_shard": 20, "dtype": "float16"},
}


def small_params(**sections: dict) -> Params:
    raw = {name: dict(values) for name, values in SMALL.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_params(raw)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "world"
    build_micro_world(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def clip(base_dir):
    return load_clip("builtin", base_dir=base_dir)


def project_dir(work: Path, base_dir: Path) -> Path:
    """A project-shaped folder (models/world linked to the session's micro-world)."""
    (work / "models").mkdir(parents=True, exist_ok=True)
    link = work / "models" / "world"
    if not link.exists():
        link.symlink_to(base_dir, target_is_directory=True)
    return work


def run_small_pipeline(
    work: Path, base_dir: Path, params: Params | None = None, before_extract=None
) -> Path:
    """captions + extract of a small builtin dataset in `work` (calling before_extract() in
    between, in `work`); returns the shards folder."""
    import os

    from pipeline.stages.captions import run_captions_stage
    from pipeline.stages.extract import run_extract_stage

    params = params or small_params()
    project_dir(work, base_dir)
    previous = os.getcwd()
    os.chdir(work)
    try:
        run_captions_stage(params)
        if before_extract is not None:
            before_extract()
        run_extract_stage(params)
    finally:
        os.chdir(previous)
    return work / "data" / "shards"


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, base_dir) -> Path:
    return run_small_pipeline(tmp_path_factory.mktemp("small"), base_dir)
