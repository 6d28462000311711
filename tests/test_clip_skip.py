"""Clip skip (issue 31, item 3): the penultimate CLIP layer's states with the final LayerNorm,
as diffusers computes them, as the targets of extraction and the conditioning of every
consumer; a deprojector records its clip skip and refuses another."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.base.clip_encode import encode_texts
from pipeline.base.files import BaseModelError
from pipeline.base.loaders import load_clip, load_sd_pipeline
from pipeline.cli import app
from pipeline.data.shards import ShardError, ShardReader, open_shard
from pipeline.models import BaseMismatchError, build_deprojector, load_deprojector
from pipeline.prompting.encoder import PromptEncoder
from pipeline.training.loop import build_model, record_base
from tests.conftest import run_small_pipeline, small_params

PROMPTS = ["red circle", "big yellow star black background", ""]


def test_clip_skip_states_are_diffusers_encode_prompt(base_dir) -> None:
    """encode_texts at clip_skip k == StableDiffusionPipeline.encode_prompt(clip_skip=k), the
    states the UNet of an SD pipeline run with clip_skip receives; 0 is the last layer."""
    pipe = load_sd_pipeline("builtin", base_dir=base_dir)
    # diffusers 0.42 reads `text_encoder.text_model.final_layer_norm`; transformers 5's
    # CLIPTextModel holds final_layer_norm itself (no .text_model), so encode_prompt with a
    # clip_skip raises AttributeError there. Give it the attribute (outside the module tree).
    object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    last = encode_texts(load_clip("builtin", base_dir=base_dir), PROMPTS)
    for skip in (0, 1, 2):
        ours = encode_texts(load_clip("builtin", base_dir=base_dir, clip_skip=skip), PROMPTS)
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=skip or None)
        torch.testing.assert_close(ours.hidden, theirs, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.pooled, last.pooled)  # the input stays the last layer's
        assert skip == 0 or (ours.hidden - last.hidden).abs().max() > 0.1


@pytest.mark.parametrize("skip", [-1, 99, True])
def test_a_clip_skip_the_model_does_not_have_is_refused(base_dir, skip) -> None:
    with pytest.raises(BaseModelError, match=r"clip_skip must be an integer in \[0, "):
        load_clip("builtin", base_dir=base_dir, clip_skip=skip)


def test_params_refuse_a_negative_clip_skip() -> None:
    from pipeline.config.params import ParamsError

    with pytest.raises(ParamsError, match="extract.clip_skip"):
        small_params(extract={"clip_skip": -1})


@pytest.fixture(scope="module")
def skip_project(tmp_path_factory, base_dir):
    """A project folder with clip_skip 1 shards of the small dataset: (folder, shards)."""
    work = tmp_path_factory.mktemp("skip")
    return work, run_small_pipeline(work, base_dir, small_params(extract={"clip_skip": 1}))


def test_clip_skip_shards_hold_the_chosen_layer_and_record_it(skip_project, base_dir) -> None:
    _, shards = skip_project
    assert json.loads((shards / "meta.json").read_text())["clip_skip"] == 1
    table = open_shard(next((shards / "test").glob("shard-*.arrow")))
    rows = [k for k, kind in enumerate(table["kind"].to_pylist()) if kind == "plain"][:3]
    texts = [table["target_text"][k].as_py() for k in rows]
    batch = ShardReader(shards / "test").batch(np.array(rows))
    skip = encode_texts(load_clip("builtin", base_dir=base_dir, clip_skip=1), texts)
    last = encode_texts(load_clip("builtin", base_dir=base_dir), texts)
    torch.testing.assert_close(batch.hidden, skip.hidden, rtol=0, atol=5e-3)  # float16 shards
    assert (batch.hidden - last.hidden).abs().max() > 0.1
    torch.testing.assert_close(batch.embeds, last.pooled)  # the input: the last layer's
    constants = load_file(str(shards / "constants.safetensors"))
    empty = encode_texts(load_clip("builtin", base_dir=base_dir, clip_skip=1), [""])
    torch.testing.assert_close(constants["sos"], empty.hidden[0, 0])  # H("")[0] at clip skip 1


def test_training_refuses_shards_of_another_clip_skip(skip_project) -> None:
    _, shards = skip_project
    params = small_params(
        extract={"clip_skip": 0}, models={"vb": {"type": "vicinity-batch", "vicinity": 2}}
    )
    with pytest.raises(ShardError, match="extracted with extract.clip_skip=1, but params name 0"):
        build_model("vb", params, shards)


def test_a_deprojector_records_its_clip_skip_and_refuses_another(skip_project, base_dir):
    work, shards = skip_project
    clip = load_clip("builtin", base_dir=base_dir, clip_skip=1)
    constants = load_file(str(shards / "constants.safetensors"))
    model = build_deprojector("vicinity-batch", clip.hidden_size, clip.projection_size, constants)
    record_base(model, "builtin", clip_skip=1)
    model.config.base_fingerprint = ""  # recorded from the committed world, not the micro one
    model.save_pretrained(work / "models" / "skip1")
    assert load_deprojector(work / "models" / "skip1").config.clip_skip == 1
    # None: the deprojector's own clip skip; the reference of that encoder is the same layer.
    encoder = PromptEncoder.from_pretrained(work / "models" / "skip1", base_dir=base_dir)
    assert encoder.clip.clip_skip == 1
    torch.testing.assert_close(
        encoder.encode_prompt("red circle", deproject=False),
        encode_texts(clip, ["red circle"]).hidden,
    )
    with pytest.raises(BaseMismatchError, match="trained on the states of clip_skip 1.*not 0"):
        PromptEncoder.from_pretrained(work / "models" / "skip1", clip_skip=0, base_dir=base_dir)
    # The CLI: the params file's extract.clip_skip (0 by default) is what is asked for.
    previous = os.getcwd()
    os.chdir(work)
    try:
        (work / "params.yaml").write_text("extract:\n  clip_skip: 0\n")
        refused = CliRunner().invoke(app, ["encode", "red", "-m", "models/skip1", "-o", "c.st"])
        assert refused.exit_code == 2 and "--clip-skip 1" in refused.output, refused.output
        taken = CliRunner().invoke(
            app, ["encode", "red", "-m", "models/skip1", "--clip-skip", "1", "-o", "c.st"]
        )
        assert taken.exit_code == 0, taken.output
    finally:
        (work / "params.yaml").unlink(missing_ok=True)
        os.chdir(previous)
    torch.testing.assert_close(
        load_file(str(work / "c.st"))["prompt_embeds"], encoder.encode_prompt("red")
    )


def test_an_old_folder_without_clip_skip_is_the_last_layer(tmp_path, clip) -> None:
    model = build_deprojector(
        "vicinity-batch",
        clip.hidden_size,
        clip.projection_size,
        {
            "sos": torch.zeros(clip.hidden_size),
            "null": torch.zeros(clip.hidden_size),
            "deprojection": torch.zeros(clip.hidden_size, clip.projection_size),
        },
    )
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["clip_skip"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert load_deprojector(tmp_path / "old").config.clip_skip == 0


def test_the_blend_baseline_blends_the_clip_skip_states(base_dir) -> None:
    """evaluate's `blend` row (compel's .blend()) of a clip-skip run: the weighted mean of the
    chosen layer's states, as the reference row's are."""
    from pipeline.prompting.grammar import PromptError

    encoder = PromptEncoder(load_clip("builtin", base_dir=base_dir, clip_skip=1))
    parts = [encoder.encode_prompt(p, deproject=False) for p in ("red circle", "blue square")]
    blend = encoder.encode_blend("red circle, blue square:3")
    torch.testing.assert_close(blend, (parts[0] + 3 * parts[1]) / 4, rtol=0, atol=1e-5)
    deeper = PromptEncoder(load_clip("builtin", base_dir=base_dir, clip_skip=2))
    with pytest.raises(PromptError, match="knows clip skip 0 and 1, not 2"):
        deeper.encode_blend("red circle")
