"""The ComfyUI node pack (comfyui_deprojector/) against ComfyUI's documented interface, without
ComfyUI: a stand-in for its CLIP object (`tokenize`, `encode_from_tokens(tokens,
return_pooled=...)`) wrapping the world's CLIP, a CLIP vision output with `image_embeds`, and
the CONDITIONING layout CLIPTextEncode returns. What the nodes give must equal PromptEncoder's
tensors for the same prompt and deprojector folder."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfyui_deprojector import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, nodes
from pipeline.base.clip_encode import encode_texts, encode_tokens, token_ids, tokenize
from pipeline.base.loaders import ClipText
from pipeline.models import BaseMismatchError, build_deprojector
from pipeline.prompting.bridges import GAP_FILE, ModalityGap
from pipeline.prompting.encoder import ImagePart, PromptEncoder
from pipeline.prompting.grammar import PromptError
from pipeline.prompting.images import ImagePromptError
from pipeline.world.embedded import World

PROMPTS = [
    "red circle",
    "red circle:1.2, blue square:-0.6, white background",
    "yellow star, yellow star:0.5, black background",  # a repeated part is encoded once
]


class ComfyClip:
    """ComfyUI's CLIP object (comfy/sd.py `CLIP`) as nodes use it, around the world's CLIP.

    tokenize(text) -> {"l": [[(token, weight), ...] per 77-token chunk]}, reading "(...)" as
    emphasis (the brackets dropped here; weights are ignored by this stand-in) and "\\(" as a
    literal bracket, as comfy/sd1_clip.py's tokenizer does. encode_from_tokens(tokens,
    return_pooled) -> (cond [1, 77 x chunks, D], pooled): `return_pooled="unprojected"` the
    pooled output [1, D], `True` the projected one [1, P] (SDClipModel's default).
    `layer_idx`: what CLIPSetLastLayer sets (None: the last layer)."""

    def __init__(self, clip: ClipText, shift: float = 0.0) -> None:
        self.clip, self.shift, self.layer_idx = clip, shift, None

    def tokenize(self, text: str) -> dict[str, list[list[tuple[int, float]]]]:
        text = text.replace("\\(", "\0\2").replace("\\)", "\0\1")
        text = text.replace("(", "").replace(")", "")
        text = text.replace("\0\2", "(").replace("\0\1", ")")
        ids = tokenize(self.clip, [text])["input_ids"][0].tolist()
        chunks = [[(t, 1.0) for t in ids]]
        if len(token_ids(self.clip, [text])[0]) > 77:
            chunks.append(chunks[0])  # ComfyUI's second chunk (its content is not read here)
        return {"l": chunks}

    def encode_from_tokens(self, tokens, return_pooled=False):
        ids = torch.tensor([[t for t, _ in chunk] for chunk in tokens["l"]])
        out = encode_tokens(self.clip, ids, torch.ones_like(ids))
        cond = out.hidden.reshape(1, -1, out.hidden.shape[-1])
        pooled = (
            out.pooled[:1] + self.shift if return_pooled == "unprojected" else out.text_embeds[:1]
        )
        return (cond, pooled) if return_pooled else cond


def clip_text_encode(clip: ComfyClip, text: str) -> list:
    """ComfyUI's CLIPTextEncode node (nodes.py): tokens -> [[cond, {"pooled_output": ...}]]."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@dataclass
class VisionOutput:
    """What ComfyUI's CLIPVisionEncode returns (comfy/clip_vision.py `Output`), in part."""

    image_embeds: torch.Tensor


@pytest.fixture(scope="module")
def models(tmp_path_factory, clip, small_shards, base_dir) -> Path:
    """A ComfyUI models/deprojectors folder: 'world/vb' (an untrained vicinity-batch
    deprojector of the micro-world with modality-gap statistics) and 'plain' (without)."""
    root = tmp_path_factory.mktemp("comfy") / "deprojectors"
    constants = load_file(str(small_shards / "constants.safetensors"))
    torch.manual_seed(0)
    model = build_deprojector(
        "vicinity-batch", clip.hidden_size, clip.projection_size, constants, vicinity=2
    ).eval()
    model.save_pretrained(root / "world" / "vb")
    model.save_pretrained(root / "plain")
    from pipeline.base.vision import ImageTower

    captions = World.captions(16, seed=3)
    tower = ImageTower.load("builtin", "cpu", base_dir)
    images = tower.embed([World.scene_for(c, seed=k) for k, c in enumerate(captions)])
    texts = encode_texts(clip, captions).text_embeds
    ModalityGap.measure(texts, images, bank=texts).save(root / "world" / "vb" / GAP_FILE)
    return root


@pytest.fixture(scope="module")
def encoder(models, base_dir) -> PromptEncoder:
    return PromptEncoder.from_pretrained(models / "world" / "vb", clip="builtin", base_dir=base_dir)


@pytest.fixture
def comfy_models(models, monkeypatch) -> Path:
    """ComfyUI's folder_paths answering with `models`."""
    monkeypatch.setattr(nodes, "model_dirs", lambda: [models])
    return models


@pytest.fixture
def loaded(comfy_models) -> nodes.Loaded:
    return NODE_CLASS_MAPPINGS["DeprojectorLoader"]().load("world/vb")[0]


def text(clip, loaded, prompt):
    return NODE_CLASS_MAPPINGS["DeprojectText"]().encode(ComfyClip(clip), loaded, prompt)


def assert_clip_text_encode_layout(cond: list, reference: list) -> None:
    """The layout CLIPTextEncode returns: one [states, {"pooled_output": pooled}] pair."""
    assert isinstance(cond, list) and len(cond) == len(reference) == 1
    (states, extra), (ref_states, ref_extra) = cond[0], reference[0]
    assert isinstance(cond[0], list) and len(cond[0]) == 2
    assert states.shape == ref_states.shape and states.dtype == ref_states.dtype
    assert set(extra) == set(ref_extra) == {"pooled_output"}
    assert extra["pooled_output"].dim() == 2 and extra["pooled_output"].dtype == torch.float32


# --- the node contract ----------------------------------------------------------------------


def test_every_node_keeps_comfyuis_node_contract(comfy_models) -> None:
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for name, node in NODE_CLASS_MAPPINGS.items():
        inputs = node.INPUT_TYPES()
        assert set(inputs) == {"required"}, name
        for spec in inputs["required"].values():
            kind = spec[0]
            assert isinstance(kind, str | list) and isinstance(spec, tuple), (name, spec)
        assert all(isinstance(kind, str) for kind in node.RETURN_TYPES), name
        assert len(node.RETURN_NAMES) == len(node.RETURN_TYPES), name
        assert node.CATEGORY == "conditioning/deprojector" and node.DESCRIPTION, name
        # ComfyUI calls FUNCTION with the inputs as keyword arguments.
        parameters = list(inspect.signature(getattr(node(), node.FUNCTION)).parameters)
        assert parameters == list(inputs["required"]), name
    assert NODE_CLASS_MAPPINGS["DeprojectText"].RETURN_TYPES == (
        "CONDITIONING",
        "DEPROJECTOR_EMBEDDING",
    )
    listed = NODE_CLASS_MAPPINGS["DeprojectorLoader"].INPUT_TYPES()["required"]
    assert listed["deprojector_name"][0] == ["plain", "world/vb"]


def test_the_model_folder_is_registered_with_folder_paths(monkeypatch, tmp_path) -> None:
    calls = []
    fake = types.SimpleNamespace(
        models_dir=str(tmp_path),
        add_model_folder_path=lambda *args, **kwargs: calls.append((args, kwargs)),
        get_folder_paths=lambda name: [str(tmp_path / name)],
    )
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    nodes.register_model_folder()
    assert calls == [(("deprojectors", str(tmp_path / "deprojectors")), {"is_default": True})]
    assert (tmp_path / "deprojectors").is_dir()
    assert nodes.model_dirs() == [tmp_path / "deprojectors"]


def test_a_missing_deprojector_names_the_folders(comfy_models) -> None:
    with pytest.raises(nodes.NodeError, match=r"no deprojector 'nope' .*deprojectors"):
        NODE_CLASS_MAPPINGS["DeprojectorLoader"]().load("nope")


# --- text prompts -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_conditioning_equals_the_prompt_encoders(clip, loaded, encoder, prompt) -> None:
    cond, embeds = text(clip, loaded, prompt)
    assert_clip_text_encode_layout(cond, clip_text_encode(ComfyClip(clip), prompt))
    states, extra = cond[0]
    expected = encoder.encode_prompt(prompt)
    assert states.shape == (1, 77, clip.hidden_size)
    assert (states - expected).abs().max().item() < 1e-5
    torch.testing.assert_close(extra["pooled_output"], encoder.embedding(prompt))
    assert extra["pooled_output"] is embeds


def test_brackets_are_text_not_comfyuis_emphasis(clip, loaded, encoder) -> None:
    """ComfyUI's tokenizer reads "(a)" as emphasis; a part's literal brackets (the grammar's
    \\( \\), pipeline/prompting/grammar.py) reach CLIP as written, as they do in
    PromptEncoder; emphasis on a whole part is the part's weight, inside a part an error."""
    prompt = "red \\(circle\\), blue square"
    cond, _ = text(clip, loaded, prompt)
    torch.testing.assert_close(cond[0][0], encoder.encode_prompt(prompt), atol=1e-5, rtol=0)
    unescaped = ComfyClip(clip).tokenize("red (circle)")
    assert unescaped != ComfyClip(clip).tokenize(nodes.literal("red (circle)"))
    weighted, _ = text(clip, loaded, "(red circle:1.2), blue square")
    torch.testing.assert_close(
        weighted[0][0], encoder.encode_prompt("red circle:1.2, blue square"), atol=1e-5, rtol=0
    )
    with pytest.raises(PromptError, match="weights words inside a part"):
        text(clip, loaded, "red (circle), blue square")


def test_bad_prompts_get_the_grammars_errors(clip, loaded) -> None:
    with pytest.raises(PromptError, match=r"prompt part 1 'red:abc'.*character 5"):
        text(clip, loaded, "red:abc")
    with pytest.raises(PromptError, match="has no text"):
        text(clip, loaded, " , ")


def test_a_clip_set_to_another_layer_is_refused(clip, loaded) -> None:
    comfy = ComfyClip(clip)
    comfy.layer_idx = -2
    with pytest.raises(nodes.NodeError, match=r"stop at layer -2 \(CLIPSetLastLayer\).* -1"):
        NODE_CLASS_MAPPINGS["DeprojectText"]().encode(comfy, loaded, "red circle")
    # A deprojector trained on clip_skip 1 (the penultimate layer) wants stop_at_clip_layer -2.
    skip = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    skip.model.config.clip_skip = 1
    nodes.check_clip(comfy, skip)
    comfy.layer_idx = None
    with pytest.raises(nodes.NodeError, match=r"stop at layer -1 .* layer -2's \(clip skip\)"):
        nodes.check_clip(comfy, skip)


def test_another_clip_is_refused_or_warned_about(clip, loaded) -> None:
    comfy = ComfyClip(clip, shift=1.0)  # same width, another text encoder's null
    with pytest.warns(UserWarning, match=r"empty prompt is \d+\.\d% away from the one"):
        NODE_CLASS_MAPPINGS["DeprojectText"]().encode(comfy, loaded, "red circle")
    with pytest.raises(BaseMismatchError, match=r"width D=\d+ .* has 7"):
        nodes.check_base(torch.zeros(1, 7), loaded)


def test_a_long_part_is_warned_about(clip, loaded) -> None:
    with pytest.warns(UserWarning, match="longer than CLIP's 75 tokens"):
        text(clip, loaded, " ".join(["red circle"] * 60))


# --- image prompts, combination, interpolation -------------------------------------------------


def test_image_conditioning_equals_the_prompt_encoders(loaded, encoder) -> None:
    scene = World.scene_for("yellow star black background", seed=0)
    output = VisionOutput(encoder.tower.embed([scene]))
    node = NODE_CLASS_MAPPINGS["DeprojectImage"]()
    for weight, bridge, expected_bridge in ((1.0, "default", None), (2.0, "none", "none")):
        cond, embeds = node.encode(loaded, output, weight, bridge)
        expected = encoder.encode_prompt("", [ImagePart(scene, weight)], bridge=expected_bridge)
        assert (cond[0][0] - expected).abs().max().item() < 1e-5
        assert set(cond[0][1]) == {"pooled_output"} and embeds.shape == (
            1,
            loaded.model.null.numel(),
        )


def test_image_prompts_without_statistics_or_of_another_width_say_what_to_do(
    comfy_models, loaded
) -> None:
    plain = NODE_CLASS_MAPPINGS["DeprojectorLoader"]().load("plain")[0]
    width = loaded.model.config.projection_size
    node = NODE_CLASS_MAPPINGS["DeprojectImage"]()
    with pytest.raises(ImagePromptError, match="modality-gap statistics.*bridge='none'"):
        node.encode(plain, VisionOutput(torch.randn(1, width)), 1.0, "default")
    node.encode(plain, VisionOutput(torch.randn(1, width)), 1.0, "none")
    with pytest.raises(BaseMismatchError, match=r"width P=\d+.*\[1, 1024\]"):
        node.encode(loaded, VisionOutput(torch.randn(1, 1024)), 1.0, "default")


def test_combine_and_interpolate_equal_the_api(clip, loaded, encoder) -> None:
    _, a = text(clip, loaded, "red circle")
    _, b = text(clip, loaded, "blue square")
    cond, _ = NODE_CLASS_MAPPINGS["DeprojectorCombine"]().combine(loaded, a, 0.5, b, 2.0)
    expected = encoder.encode_prompt("red circle:0.5, blue square:2")
    assert (cond[0][0] - expected).abs().max().item() < 1e-5
    start, end = encoder.embedding("red circle"), encoder.embedding("blue square")
    node = NODE_CLASS_MAPPINGS["DeprojectorInterpolate"]()
    for method in ("linear", "slerp"):
        cond, embeds = node.interpolate(loaded, a, b, 0.25, method)
        expected = encoder.interpolate(start, end, [0.25], spherical=method == "slerp")
        assert (cond[0][0] - expected).abs().max().item() < 1e-5
        assert cond[0][1]["pooled_output"] is embeds
    with pytest.raises(nodes.NodeError, match=r"shapes \[1, \d+\] and \[1, 3\]"):
        node.interpolate(loaded, a, torch.zeros(1, 3), 0.5, "linear")


# --- downstream ---------------------------------------------------------------------------------


def test_downstream_conditioning_nodes_take_it(clip, loaded) -> None:
    """What ConditioningCombine (a + b), ConditioningSetTimestepRange (node_helpers.
    conditioning_set_values) and the samplers' convert_cond (comfy/sampler_helpers.py) do with
    CONDITIONING works on ours as on CLIPTextEncode's."""
    ours, _ = text(clip, loaded, "red circle")
    theirs = clip_text_encode(ComfyClip(clip), "blue square")
    combined = ours + theirs
    ranged = [[c[0], {**c[1], "start_percent": 0.0, "end_percent": 0.5}] for c in combined]
    converted = [{**c[1], "cross_attn": c[0], "model_conds": {}} for c in ranged]
    assert [c["cross_attn"].shape for c in converted] == [(1, 77, clip.hidden_size)] * 2
    assert converted[0]["end_percent"] == 0.5


def test_the_pack_carries_the_registrys_metadata() -> None:
    import re

    import tomllib

    meta = tomllib.loads((Path(nodes.__file__).parent / "pyproject.toml").read_text())
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", meta["project"]["name"])
    assert "comfyui" not in meta["project"]["name"].lower()  # the registry's naming rule
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["project"]["version"])
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
