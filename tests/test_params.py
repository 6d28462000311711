"""Invalid params are rejected when a stage starts, naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config.params import ParamsError, load_params, parse_params
from pipeline.config.runs import check_runs


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"captions": {"train_size": -5}}, "captions.train_size"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"augment": {"split": 1.5}}, "augment.split"),
        (
            {"augment": {"split": 0.6, "combine": 0.6}},
            "augment.split + augment.combine + augment.image",
        ),
        (
            {"augment": {"split": 0.4, "combine": 0.3, "image": 0.4}},
            "augment.split + augment.combine + augment.image",
        ),
        ({"augment": {"image": -0.1}}, "augment.image"),
        ({"gap": {"bridge": "nearest"}}, "gap.bridge"),
        ({"gap": {"temperature": 0}}, "gap.temperature"),
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
        # An ensemble names 2 or more distinct trained runs, and nothing else.
        (
            {"models": {"a": {"type": "lstm"}, "e": {"type": "ensemble", "members": ["a"]}}},
            "models.e.members",
        ),
        (
            {"models": {"a": {"type": "lstm"}, "e": {"type": "ensemble", "members": ["a", "b"]}}},
            "models.e.members",
        ),
        (
            {"models": {"a": {"type": "lstm"}, "e": {"type": "ensemble", "members": ["a", "a"]}}},
            "models.e.members",
        ),
        (
            {
                "models": {
                    "a": {"type": "lstm"},
                    "b": {"type": "lstm"},
                    "e": {"type": "ensemble", "members": ["a", "b"]},
                    "f": {"type": "ensemble", "members": ["a", "e"]},
                }
            },
            "models.f.members",
        ),
        (
            {
                "models": {
                    "a": {"type": "lstm"},
                    "b": {"type": "lstm"},
                    "e": {"type": "ensemble", "members": ["a", "b"], "train": {"seed": 1}},
                }
            },
            "models.e",
        ),
        (
            {
                "models": {
                    "a": {"type": "lstm"},
                    "b": {"type": "lstm"},
                    "e": {"type": "ensemble", "members": "a, b"},
                }
            },
            "models.e.members",
        ),
    ],
)
def test_invalid_values_name_their_key(raw, key):
    """Each stage parses its params file and, where it builds, loads or lists runs (and in
    `base`, the first stage of every `dvc repro`), checks `models:` against the registry."""
    with pytest.raises(ParamsError, match=re.escape(f"`{key}`")):
        check_runs(parse_params(raw).models)


def test_reserved_run_names_are_every_name_another_output_or_row_takes():
    from pipeline.core.names import IMAGE_ROWS, RESERVED_RUN_NAMES

    for name in (
        "null-baseline",
        "retrieval",
        "comparison",
        "adherence",
        "image_prompts",
        "reference",
        "blend",
        "world",
        "base",
        *IMAGE_ROWS,
    ):
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
    from pipeline.training.loop import build_model
    from tests.conftest import small_params

    p = small_params(models={"vicinity-batch": {"type": "vicinity-batch", "vicinity": 0}})
    with pytest.raises(ParamsError, match=r"models\.vicinity-batch .*vicinity must be >= 1"):
        build_model("vicinity-batch", p, small_shards)


def test_shards_of_another_base_model_are_refused(small_shards):
    from pipeline.data.shards import ShardError
    from pipeline.training.loop import build_model
    from tests.conftest import small_params

    p = small_params(
        base={"clip": "openai/clip-vit-large-patch14", "sd": "some/sd"},
        models={"transformer": {"type": "transformer"}},
    )
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


FLOAT_SPELLINGS = [
    "1e-06",
    "1e-4",
    "5.0e-4",
    "1E5",
    ".5",
    "1.0e-3",
    "-1e3",
    "+.5",
    "2e+2",
    "1_000.5",
    "3.",
]


@pytest.mark.parametrize("text", FLOAT_SPELLINGS)
def test_every_float_param_takes_what_dvc_and_people_write(tmp_path, text):
    """PyYAML (YAML 1.1) reads `1e-06` as a string; DVC (YAML 1.2) and we read a float."""
    from dvc.utils.serialize import parse_yaml

    value = parse_yaml(f"v: {text}\n", "dvc")["v"]
    assert isinstance(value, float)  # what DVC itself makes of it
    path = tmp_path / "params.yaml"
    path.write_text(
        f"train:\n  lr: {text}\n  mask_weight: {text.lstrip('-')}\n"
        f"world:\n  unet_lr: {text.lstrip('-')}\n"
        f"models:\n  vt:\n    type: transformer\n    train:\n      lr: {text}\n"
    )
    if value <= 0:  # lr must be positive: the check names the key, with the number read
        with pytest.raises(ParamsError, match=rf"`train\.lr` must be positive, got {value}"):
            load_params(path)
        return
    params = load_params(path)
    assert params.train.lr == value and params.world.unet_lr == abs(value)
    assert params.models["vt"].train == {"lr": value}


def test_dvc_exp_run_set_param_round_trips(tmp_path):
    """What `dvc exp run -S train.lr=0.000001 -S models.NAME.train.lr=...` writes loads back."""
    from dvc.utils.serialize import dumps_yaml

    from pipeline.core.sections import load_yaml

    project_params = Path(__file__).resolve().parents[1] / "params.yaml"
    raw = load_yaml(project_params.read_text())
    raw["train"]["lr"] = 0.000001
    name = next(iter(raw["models"]))
    raw["models"][name].setdefault("train", {})["lr"] = 2e-7
    text = dumps_yaml(raw)
    assert "lr: 1e-06" in text and "lr: 2e-07" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load_params(path)
    assert params.train.lr == 1e-06 and params.models[name].train["lr"] == 2e-07
    assert load_yaml("lrs: [1e-4, 2E-5, 7]\n") == {"lrs": [1e-4, 2e-5, 7]}  # lists too


@pytest.mark.parametrize("text", ["fast", "1e-4x", "1.2.3", "e5", "'1e-4'"])
def test_a_float_param_that_is_no_number_still_names_the_key(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(f"models:\n  vt:\n    type: transformer\n    train:\n      lr: {text}\n")
    with pytest.raises(
        ParamsError,
        match=r"params\.yaml: params: `models\.vt\.train\.lr` must "
        r"be float, got '",
    ):
        load_params(path)


@pytest.mark.parametrize(
    "name", ["vb.v2", "a@b", "a:b", "a/b", "a b", "a$b", "-a", "a,b", "a+b", "é"]
)
def test_run_names_are_what_dvc_can_address(name):
    with pytest.raises(
        ParamsError,
        match=re.escape(f"`models.{name}` must be a run name of letters, digits, '_' and '-'")
        + r".*'\.' would split the key",
    ):
        parse_params({"models": {name: {"type": "vicinity-batch"}}})


def test_run_names_differing_only_in_case_are_refused():
    models = {"VB": {"type": "vicinity-batch"}, "vb": {"type": "vicinity-batch"}}
    with pytest.raises(
        ParamsError,
        match=r"`models\.vb` must be a run name that differs from "
        r"'VB' in more than letter case",
    ):
        parse_params({"models": models})
    assert list(parse_params({"models": {"vb_2": models["vb"], "vb-3": models["vb"]}}).models) == [
        "vb_2",
        "vb-3",
    ]


def test_every_run_name_in_params_yaml_is_a_valid_dvc_stage_name():
    from dvc.stage.utils import is_valid_name

    from pipeline.config.params import RUN_NAME

    project = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert project.models and all(is_valid_name(n) for n in project.models)
    # DVC refuses punctuation other than '_' and '-' in stage names; so do we. We refuse
    # spaces as well: the name is a word of the stage's shell command.
    for name in ("a.b", "a@b", "a:b", "a/b", "a,b", "a$b"):
        assert not is_valid_name(name) and RUN_NAME.fullmatch(name) is None, name
    assert is_valid_name("a b") and RUN_NAME.fullmatch("a b") is None
    assert is_valid_name("ok_1-x") and RUN_NAME.fullmatch("ok_1-x")


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "models:\n  vb: {type: vicinity-batch}\n  vb: {type: transformer}\n",
            r"params\.yaml:3:3: not valid YAML \(duplicate key 'vb' \(first on line 2\)\)",
        ),
        (
            "train:\n  lr: 1e-3\n  epochs: 2\n  lr: 1e-4\n",
            r"params\.yaml:4:3: not valid YAML \(duplicate key 'lr' \(first on line 2\)\)",
        ),
        ("train:\n  lr: [1, 2\n", r"params\.yaml:3:1: not valid YAML \(while parsing a flow"),
        (
            b"train:\n  lr: 1e-3 # \xe9\n",
            r"params\.yaml:2: not valid UTF-8 \(byte offset 20: "
            r"b'\\xe9'\)",
        ),
    ],
)
def test_a_bad_params_file_names_line_and_column(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_a_folder_given_as_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"params\.yaml: is a folder, expected a params YAML"):
        (tmp_path / "params.yaml").mkdir() or load_params(tmp_path / "params.yaml")
