"""Invalid params are rejected when a stage starts, naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.params import ParamsError, load_params, parse_params


@pytest.mark.parametrize("raw, key", [
    ({"captions": {"train_size": -5}}, "captions.train_size"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"augment": {"split": 1.5}}, "augment.split"),
    ({"augment": {"split": 0.6, "combine": 0.6}}, "augment.split + augment.combine"),
    ({"extract": {"dtype": "bfloat8"}}, "extract.dtype"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"extract": {"num_workers": 2, "worker_index": 2}}, "extract.worker_index"),
    ({"models": {"transfomer": {}}}, "models.transfomer.type"),
    ({"models": {"foo": {"type": "mlp"}}}, "models.foo.type"),
    ({"models": {"foo": {"type": "vicinity-batch", "vicinityy": 2}}}, "models.foo.vicinityy"),
    ({"models": {"foo": 3}}, "models.foo"),
    ({"models": {"base": {"type": "vicinity-batch"}}}, "models.base"),
    ({"models": {"a/b": {"type": "vicinity-batch"}}}, "models.a/b"),
    ({"captions": {"train_size": "many"}}, "captions.train_size"),
    ({"captions": {"trian_size": 3}}, "captions.trian_size"),
    ({"captoins": {"train_size": 3}}, "captoins"),
    ({"base": {"clip": "builtin", "sd": "some/sd"}}, "base"),
    ({"base": {"clip": "some/clip"}}, "base"),
])
def test_invalid_values_name_their_key(raw, key):
    with pytest.raises(ParamsError, match=re.escape(f"`{key}`")):
        parse_params(raw)


def test_reserved_run_names_are_every_name_another_output_or_row_takes():
    from pipeline.names import IMAGE_ROWS, RESERVED_RUN_NAMES

    for name in ("null-baseline", "adherence", "image_prompts", "reference", "world", "base",
                 *IMAGE_ROWS):
        assert name in RESERVED_RUN_NAMES
        with pytest.raises(ParamsError, match=re.escape(f"`models.{name}`")):
            parse_params({"models": {name: {"type": "vicinity-batch"}}})


def test_the_file_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("augment:\n  combine: -1\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: .*`augment\.combine`"):
        load_params(path)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_vicinity_below_one_is_rejected_when_training_starts(tmp_path, small_shards):
    from pipeline.train import build_model
    from tests.conftest import small_params

    p = small_params(models={"vicinity-batch": {"type": "vicinity-batch", "vicinity": 0}})
    with pytest.raises(ParamsError, match=r"models\.vicinity-batch .*vicinity must be >= 1"):
        build_model("vicinity-batch", p, small_shards)


def test_shards_of_another_base_model_are_refused(small_shards):
    from pipeline.shards import ShardError
    from pipeline.train import build_model
    from tests.conftest import small_params

    p = small_params(base={"clip": "openai/clip-vit-large-patch14", "sd": "some/sd"},
                     models={"transformer": {"type": "transformer"}})
    with pytest.raises(ShardError, match="extracted with base.clip='builtin'"):
        build_model("transformer", p, small_shards)


def test_params_survive_a_dvc_style_rewrite(tmp_path):
    """`dvc exp run -S` rewrites params.yaml; no default may turn into another YAML type."""
    import dataclasses

    import yaml

    project_params = Path(__file__).resolve().parents[1] / "params.yaml"
    original = load_params(project_params)
    rewritten = tmp_path / "params.yaml"
    raw = yaml.safe_load(project_params.read_text())
    # Unquoted, as a YAML writer may leave them.
    rewritten.write_text(yaml.safe_dump(raw, sort_keys=False).replace("'", ""))
    assert dataclasses.asdict(load_params(rewritten)) == dataclasses.asdict(original)
