"""Prompts beyond one text: the weight grammar, the formulas, image prompts and the modality
gap, the Python API, and the CLI that must give the same tensors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.base.clip_encode import encode_texts
from pipeline.base.files import BaseModelError
from pipeline.base.vision import ImageTower
from pipeline.cli import app
from pipeline.core.conventions import combine_embeddings, interpolate_embeddings
from pipeline.data.pairs import FolderPairs
from pipeline.models import build_deprojector
from pipeline.prompting.bridges import GAP_FILE, ModalityGap
from pipeline.prompting.encoder import ImagePart, PromptEncoder
from pipeline.prompting.grammar import (
    KEYWORD,
    MAX_WEIGHT,
    WEIGHT_NUMBER,
    PromptError,
    WeightedPart,
    parse_weighted,
)
from pipeline.prompting.images import ImagePromptError, load_image
from pipeline.stages.captions import run_captions_stage
from pipeline.stages.gap import run_gap_stage
from pipeline.world import scenes as world
from pipeline.world.embedded import World
from tests.conftest import project_dir, small_params

# --- the grammar --------------------------------------------------------------------------


def test_weights_default_to_one_and_may_be_negative() -> None:
    assert parse_weighted("red circle:1.2, blue square:-0.6, white background") == [
        WeightedPart("red circle", 1.2, True),
        WeightedPart("blue square", -0.6, True),
        WeightedPart("white background", 1.0, False),
    ]
    assert parse_weighted(" a : .5 ,, b:2e-1 ") == [
        WeightedPart("a", 0.5, True),
        WeightedPart("b", 0.2, True),
    ]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("red:abc", r"prompt part 1 'red:abc': .* character 5 'a' is not part of a number"),
        ("red:", r"prompt part 1 'red:': ':' at character 4 is followed by no weight"),
        ("cat, red: 1.2x", r"prompt part 2 'red: 1.2x': .* character 14 'x'"),
        ("a, b:1..2", r"prompt part 2 'b:1..2': .* '1..2' is not a number"),
        ("a:1:2", r"prompt part 1 'a:1:2': .* character 4 ':'"),
        (":2", r"prompt part 1 ':2': a weight without text"),
        (" , ", r"has no text"),
    ],
)
def test_malformed_weights_name_the_part_and_the_character(prompt: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        parse_weighted(prompt)


@given(st.text(max_size=40))
def test_parsing_never_crashes(prompt: str) -> None:
    try:
        parts = parse_weighted(prompt)
    except PromptError:
        return
    for part in parts:
        assert part.text == part.text.strip() and part.text
        assert "," not in part.text and ":" not in part.text and math.isfinite(part.weight)


# Texts without other tools' emphasis, A1111's keywords or a number alone (tests/test_prompts.py).
words = st.text(
    st.characters(blacklist_characters=",:()[]+-\\", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=10,
).filter(
    lambda t: t.strip() == t and t and not WEIGHT_NUMBER.fullmatch(t) and not KEYWORD.search(t)
)
weights = st.floats(
    allow_nan=False, allow_infinity=False, min_value=-MAX_WEIGHT, max_value=MAX_WEIGHT
)


@given(st.lists(st.tuples(words, st.one_of(st.none(), weights)), min_size=1, max_size=5))
def test_weights_round_trip(parts: list[tuple[str, float | None]]) -> None:
    written = [WeightedPart(t, 1.0 if w is None else w, w is not None) for t, w in parts]
    prompt = ", ".join(f"{p.text}:{p.weight!r}" if p.explicit else p.text for p in written)
    assert parse_weighted(prompt) == written


# --- the formulas -------------------------------------------------------------------------


def test_weighted_combination_scales_offsets_from_null() -> None:
    torch.manual_seed(0)
    null, a, b = torch.randn(3, 8)
    combined = combine_embeddings(torch.stack([a, b]), null, torch.tensor([1.5, -0.5]))
    torch.testing.assert_close(combined, 1.5 * (a - null) - 0.5 * (b - null) + null)
    torch.testing.assert_close(
        combine_embeddings(torch.stack([a, b]), null, torch.ones(2)),
        combine_embeddings(torch.stack([a, b]), null),
    )


def test_interpolation_ends_and_slerp_keeps_the_norm_around_null() -> None:
    torch.manual_seed(0)
    null, u, v = torch.randn(3, 1, 8)
    v = v * u.norm() / v.norm()  # equal norms around null
    a, b = null + u, null + v
    for spherical in (False, True):
        torch.testing.assert_close(interpolate_embeddings(a, b, null, 0.0, spherical), a)
        torch.testing.assert_close(interpolate_embeddings(a, b, null, 1.0, spherical), b)
    torch.testing.assert_close(interpolate_embeddings(a, b, null, 0.5), (a + b) / 2)
    for t in (0.25, 0.5, 0.8):
        middle = interpolate_embeddings(a, b, null, t, spherical=True)
        torch.testing.assert_close((middle - null).norm(), u.norm())
    assert (interpolate_embeddings(a, b, null, 0.5) - null).norm() < u.norm()  # the chord
    # Parallel offsets fall back to the straight line instead of dividing by sin 0.
    torch.testing.assert_close(
        interpolate_embeddings(a, null + 2 * u, null, 0.5, True), null + 1.5 * u
    )


def test_modality_gap_moves_image_embeddings_onto_their_texts() -> None:
    torch.manual_seed(0)
    text = torch.randn(64, 8) + 3.0
    image = text + torch.tensor([9.0] + [0.0] * 7)  # the same things, across a gap
    gap = ModalityGap.measure(text, image)
    torch.testing.assert_close(
        gap.mean_image - gap.mean_text, torch.tensor([9.0] + [0.0] * 7), atol=1e-5, rtol=0
    )
    corrected = gap.correct(image)
    torch.testing.assert_close(corrected.norm(dim=-1), torch.full((64,), gap.text_norm))
    before = torch.nn.functional.cosine_similarity(text, image).mean()
    after = torch.nn.functional.cosine_similarity(text, corrected).mean()
    assert after > 0.9999 and before < 0.9


def test_each_bridge_brings_image_embeddings_to_their_texts(tmp_path) -> None:
    torch.manual_seed(0)
    text = torch.randn(300, 8)
    rotation = torch.linalg.qr(torch.randn(8, 8))[0]
    mixed = 2 * text @ rotation + 5.0  # the images: a linear map of the texts, shifted
    shifted = text + 5.0  # the images: the texts across a pure gap
    gap = ModalityGap.measure(text, mixed, bank=text, temperature=0.01, bridge="linear")

    def cosine(images: torch.Tensor, kind: str | None) -> float:
        return torch.nn.functional.cosine_similarity(text, gap.correct(images, kind)).mean()

    assert cosine(mixed, None) > 0.99 > cosine(mixed, "mean-shift")  # default: linear
    torch.testing.assert_close(gap.correct(mixed, "none"), mixed)
    for kind in ("mean-shift", "linear", "text-projection"):  # each on the mean text norm
        torch.testing.assert_close(
            gap.correct(mixed, kind).norm(dim=-1), torch.full((300,), gap.text_norm)
        )
    # Projection onto a bank holding the texts: the mean shift finds each image's own text
    # (the nearest by far at this temperature), so the answer is that text.
    pure = ModalityGap.measure(text, shifted, bank=text, temperature=0.01)
    assert (
        torch.nn.functional.cosine_similarity(text, pure.correct(shifted, "text-projection")).min()
        > 0.99
    )
    with pytest.raises(ImagePromptError, match="unknown bridge 'nearest'"):
        gap.correct(mixed, "nearest")
    # Saved and loaded: every tensor and the default bridge (the bank in half precision).
    gap.save(tmp_path / GAP_FILE)
    loaded = ModalityGap.load(tmp_path)
    assert loaded.bridge == "linear" and loaded.temperature == pytest.approx(0.01)
    torch.testing.assert_close(loaded.correct(mixed), gap.correct(mixed))
    torch.testing.assert_close(
        loaded.correct(mixed, "text-projection"),
        gap.correct(mixed, "text-projection"),
        atol=2e-2,
        rtol=0,
    )


# --- image prompts and the gap stage --------------------------------------------------------

GAP_PARAMS = small_params(gap={"pairs": 48, "seed": 7})


@pytest.fixture(scope="module")
def project(tmp_path_factory, base_dir, clip, small_shards) -> Path:
    """A project with an untrained deprojector and the micro-world's gap statistics."""
    work = project_dir(tmp_path_factory.mktemp("prompts"), base_dir)
    constants = load_file(str(small_shards / "constants.safetensors"))
    torch.manual_seed(0)
    build_deprojector(
        "vicinity-batch", clip.hidden_size, clip.projection_size, constants, vicinity=2
    ).eval().save_pretrained(work / "models" / "vb")
    World.scene_for("red circle blue square white background", 0).save(work / "scene.png")
    (work / "params.yaml").write_text("render:\n  steps: 2\n")
    previous = os.getcwd()
    os.chdir(work)
    try:
        run_captions_stage(GAP_PARAMS)  # the training captions: text-projection's bank
        run_gap_stage(GAP_PARAMS, Path("data/gap"))
    finally:
        os.chdir(previous)
    # As training does: the deprojector carries its base CLIP's statistics.
    (work / "models" / "vb" / GAP_FILE).write_bytes((work / "data" / "gap" / GAP_FILE).read_bytes())
    return work


@pytest.fixture(scope="module")
def encoder(project, base_dir) -> PromptEncoder:
    return PromptEncoder.from_pretrained(
        project / "models" / "vb", clip="builtin", gap=project / "data" / "gap", base_dir=base_dir
    )


def test_gap_stage_writes_statistics_and_is_deterministic(project, tmp_path) -> None:
    summary = json.loads((project / "data" / "gap" / "modality_gap.json").read_text())
    assert summary["computed"] and summary["pairs"] == 48
    assert summary["source"] == "world scenes (seed 7)"
    gap = ModalityGap.load(project / "data" / "gap")
    width = gap.mean_text.shape[0]
    assert gap.mean_image.shape == (width,) and gap.text_norm > 0
    os.chdir(project)
    try:
        run_gap_stage(GAP_PARAMS, tmp_path / "again")
    finally:
        os.chdir(Path(__file__).parent.parent)
    assert (tmp_path / "again" / GAP_FILE).read_bytes() == (
        project / "data" / "gap" / GAP_FILE
    ).read_bytes()


def test_gap_without_pairs_for_a_real_clip_says_so(tmp_path) -> None:
    params = small_params(
        base={"clip": "some/real-clip", "sd": "some/real-sd"},
        gap={"pairs": 10, "source": str(tmp_path / "empty")},
    )
    (tmp_path / "empty").mkdir()
    summary = run_gap_stage(params, tmp_path / "gap")
    assert summary["computed"] is False and "--bridge none" in summary["why"]
    assert not (tmp_path / "gap" / GAP_FILE).exists()
    with pytest.raises(ImagePromptError, match="no modality-gap statistics"):
        ModalityGap.load(tmp_path / "gap")


def test_gap_folder_pairs_need_captions(tmp_path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    with pytest.raises(ImagePromptError, match=r"a.png: no caption file a.txt"):
        FolderPairs(tmp_path, 10)
    (tmp_path / "a.txt").write_text("a red square\n")
    pairs = FolderPairs(tmp_path)
    assert pairs.captions == ["a red square"] and pairs.image(0).mode == "RGB"
    assert pairs.ids[0].startswith("a.png sha256:")
    (tmp_path / "b.txt").write_text("a caption without its image\n")
    with pytest.raises(ImagePromptError, match=r"b\.txt: a caption without an image"):
        FolderPairs(tmp_path)
    (tmp_path / "b.txt").unlink()
    (tmp_path / "c.txt").write_text("\n")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "c.png")
    with pytest.raises(ImagePromptError, match=r"c\.txt:1: empty caption"):
        FolderPairs(tmp_path)
    (tmp_path / "c.txt").write_text("a grey picture\n")
    Image.new("L", (8, 8)).save(tmp_path / "c.png")
    with pytest.raises(ImagePromptError, match=r"paired image '.*c\.png' has mode 'L'.*not RGB"):
        FolderPairs(tmp_path).image(1)


def test_image_files_get_specific_errors(tmp_path) -> None:
    with pytest.raises(ImagePromptError, match="'.*missing.png': no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImagePromptError, match="not an image file Pillow can read"):
        load_image(tmp_path / "text.png")
    Image.new("RGBA", (8, 8)).save(tmp_path / "alpha.png")
    with pytest.raises(ImagePromptError, match="mode 'RGBA' \\(an alpha channel\\), not RGB"):
        load_image(tmp_path / "alpha.png")
    Image.new("L", (8, 8)).save(tmp_path / "grey.png")
    with pytest.raises(ImagePromptError, match="mode 'L' \\(not three colour channels\\)"):
        load_image(tmp_path / "grey.png")


def header_only_png(width: int, height: int) -> bytes:
    """A 45-byte PNG: signature, an IHDR claiming width × height RGB pixels, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def sideways_jpeg(path: Path) -> None:
    """A 40 × 20 picture, blue left half, stored as 20 × 40 with EXIF orientation 8 (turn
    90° clockwise to show), as a phone writes a photo taken upright."""
    upright = Image.new("RGB", (40, 20), "red")
    upright.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 8
    upright.transpose(Image.Transpose.ROTATE_270).save(path, exif=exif, quality=95)


def test_images_are_read_upright_as_their_exif_says(tmp_path) -> None:
    sideways_jpeg(tmp_path / "photo.jpg")
    with Image.open(tmp_path / "photo.jpg") as stored:
        assert stored.size == (20, 40)  # what Pillow decodes without the EXIF turn
    image = load_image(tmp_path / "photo.jpg")
    assert image.size == (40, 20) and image.mode == "RGB"
    left, right = image.getpixel((5, 10)), image.getpixel((35, 10))
    assert left[2] > 200 > left[0] and right[0] > 200 > right[2]
    # Paired images (gap.source) are read by the same function.
    (tmp_path / "photo.txt").write_text("a blue and red picture\n")
    image = FolderPairs(tmp_path).image(0)
    assert image.size == (40, 20) and image.getpixel((5, 10)) == left


def test_a_header_claiming_a_giant_image_is_refused_naming_the_size(tmp_path) -> None:
    from pipeline.prompting.images import MAX_IMAGE_PIXELS

    (tmp_path / "bomb.png").write_bytes(header_only_png(20_000, 10_000))
    assert len((tmp_path / "bomb.png").read_bytes()) == 45
    with pytest.raises(
        ImagePromptError,
        match=r"image prompt '.*bomb\.png': its header claims "
        rf"200,000,000 pixels, more than the limit of {MAX_IMAGE_PIXELS:,}",
    ):
        load_image(tmp_path / "bomb.png")
    # Between Pillow's limit and twice it Pillow only warns: refused too, with the size.
    (tmp_path / "big.png").write_bytes(header_only_png(10_000, 9_000))
    with pytest.raises(
        ImagePromptError,
        match=r"big\.png': its header claims 10000 × 9000 = "
        r"90,000,000 pixels, more than the limit",
    ):
        load_image(tmp_path / "big.png")
    (tmp_path / "bomb.txt").write_text("bomb")
    (tmp_path / "big.txt").write_text("big")
    with pytest.raises(ImagePromptError, match=r"paired image '.*big\.png': its header"):
        FolderPairs(tmp_path).image(0)


def test_bad_gap_folder_files_name_the_file(tmp_path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"a red\nsq\xe9are\n")
    with pytest.raises(ImagePromptError, match=r"a\.txt:2: not valid UTF-8 \(byte offset 8 "):
        FolderPairs(tmp_path)
    (tmp_path / "a.txt").write_bytes(b"a red\x00square")
    with pytest.raises(ImagePromptError, match=r"a\.txt:1: contains a NUL byte \(byte offset 5"):
        FolderPairs(tmp_path)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImagePromptError, match=r"'.*folder\.png': is a folder, expected an image"):
        load_image(tmp_path / "folder.png")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"modality_gap\.safetensors: incomplete or corrupt safetensors file"),
        (None, r"modality_gap\.safetensors: incomplete or corrupt .*run `deprojector gap` again"),
    ],
)
def test_a_damaged_gap_file_names_the_file(project, tmp_path, content, message) -> None:
    data = (project / "data" / "gap" / GAP_FILE).read_bytes()
    (tmp_path / GAP_FILE).write_bytes(data[: len(data) - 7] if content is None else content)
    with pytest.raises(ImagePromptError, match=message):
        ModalityGap.load(tmp_path)


def test_a_clip_without_vision_tower_is_named(tmp_path, base_dir) -> None:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path / "text-only"
    CLIPTextModelWithProjection.from_pretrained(base_dir / "clip").save_pretrained(folder)
    CLIPTokenizer.from_pretrained(base_dir / "clip").save_pretrained(folder)
    with pytest.raises(BaseModelError, match="has no vision tower .*clip_text_model"):
        ImageTower.load(str(folder))


def test_image_part_argument_parsing() -> None:
    assert ImagePart.parse("scene.png:0.5") == ImagePart("scene.png", 0.5)
    assert ImagePart.parse("scene.png") == ImagePart("scene.png", 1.0)
    assert ImagePart.parse("C:/images/a.png") == ImagePart("C:/images/a.png", 1.0)
    assert ImagePart.parse("dir:x/a.png:-1") == ImagePart("dir:x/a.png", -1.0)


def test_image_part_enters_pooled_space_through_the_gap_and_pinv(encoder, project) -> None:
    scene = load_image(project / "scene.png")
    projected = encoder.tower.embed([scene])
    expected = encoder.gap.correct(projected) @ encoder.deprojector.deprojection.T
    torch.testing.assert_close(encoder.image_embedding([scene]), expected)
    raw = encoder.image_embedding([scene], bridge="none")
    torch.testing.assert_close(raw, projected @ encoder.deprojector.deprojection.T)
    # Mixed with text parts and weights: Σ w_k (e_k − null) + null over all of them.
    null = encoder.deprojector.null
    text = encode_texts(encoder.clip, ["red circle"]).pooled
    embeds = encoder.embedding("red circle:0.5", [ImagePart(project / "scene.png", 2.0)])
    torch.testing.assert_close(embeds, 0.5 * (text - null) + 2.0 * (expected - null) + null)


def test_without_statistics_image_prompts_say_what_to_do(project, base_dir) -> None:
    with pytest.raises(ImagePromptError, match="no modality-gap statistics.*--bridge none"):
        PromptEncoder.from_pretrained(
            project / "models" / "vb", clip="builtin", gap=project / "nowhere", base_dir=base_dir
        )
    folder = project / "models" / "vb-without-gap"  # as trained before the gap stage ran
    folder.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((project / "models" / "vb" / name).read_bytes())
    bare = PromptEncoder.from_pretrained(folder, clip="builtin", base_dir=base_dir)
    with pytest.raises(ImagePromptError, match="run `deprojector gap`.*--bridge none"):
        bare.encode_prompt("", [ImagePart(project / "scene.png")])
    embeds = bare.encode_prompt("", [ImagePart(project / "scene.png")], bridge="none")
    assert embeds.shape == (1, 77, bare.clip.hidden_size)


# --- the API and the CLI agree --------------------------------------------------------------

runner = CliRunner()


def _cli(project: Path, *args: str):
    previous = os.getcwd()
    os.chdir(project)
    try:
        return runner.invoke(app, list(args))
    finally:
        os.chdir(previous)


def test_cli_encode_equals_the_python_api(project, encoder) -> None:
    prompt = "red circle:1.2, blue square:-0.4"
    result = _cli(
        project,
        "encode",
        prompt,
        "-m",
        "models/vb",
        "--image",
        "scene.png:0.7",
        "--negative",
        "black background",
        "-o",
        "cond.safetensors",
    )
    assert result.exit_code == 0, result.output
    saved = load_file(str(project / "cond.safetensors"))
    expected = encoder.encode_prompt(prompt, [ImagePart(project / "scene.png", 0.7)])
    torch.testing.assert_close(saved["prompt_embeds"], expected, rtol=0, atol=0)
    torch.testing.assert_close(
        saved["negative_prompt_embeds"], encoder.encode_negative("black background"), rtol=0, atol=0
    )


@pytest.mark.slow
def test_cli_interpolation_strip_equals_the_api(project, encoder) -> None:
    result = _cli(
        project,
        "encode",
        "red circle",
        "-m",
        "models/vb",
        "--mix",
        "blue square",
        "--t",
        "0",
        "--t",
        "0.5",
        "--t",
        "1",
        "--slerp",
        "-o",
        "strip.safetensors",
    )
    assert result.exit_code == 0, result.output
    embeds = load_file(str(project / "strip.safetensors"))["prompt_embeds"]
    start, end = encoder.embedding("red circle"), encoder.embedding("blue square")
    torch.testing.assert_close(embeds, encoder.interpolate(start, end, [0, 0.5, 1], True))
    torch.testing.assert_close(embeds[0:1], encoder.encode_prompt("red circle"))
    result = _cli(
        project,
        "generate",
        "red circle",
        "-m",
        "models/vb",
        "--mix",
        "blue square",
        "--t",
        "0",
        "--t",
        "1",
        "--steps",
        "2",
        "-o",
        "strip.png",
    )
    assert result.exit_code == 0, result.output
    assert "2 images" in result.output and Image.open(project / "strip.png").width > 64


def test_cli_negative_rows_match_the_prompt_rows(project, encoder) -> None:
    """diffusers refuses negative_prompt_embeds of another shape than prompt_embeds."""
    result = _cli(
        project,
        "encode",
        "red circle",
        "-m",
        "models/vb",
        "--mix",
        "blue square",
        "--t",
        "0",
        "--t",
        "0.5",
        "--t",
        "1",
        "--negative",
        "black background",
        "-o",
        "strip.safetensors",
    )
    assert result.exit_code == 0, result.output
    saved = load_file(str(project / "strip.safetensors"))
    assert saved["negative_prompt_embeds"].shape == saved["prompt_embeds"].shape
    torch.testing.assert_close(
        saved["negative_prompt_embeds"],
        encoder.encode_negative("black background").expand(3, -1, -1),
    )


def test_blend_is_the_weighted_mean_of_the_parts_ordinary_states(encoder) -> None:
    """The `blend` baseline (compel's `.blend()`): Σ w_k H(part_k) / Σ w_k of the reference."""
    parts = [encoder.encode_prompt(p, deproject=False) for p in ("red circle", "blue square")]
    blend = encoder.encode_blend("red circle, blue square:3")
    torch.testing.assert_close(blend, (parts[0] + 3 * parts[1]) / 4, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.encode_blend("red circle"), parts[0], rtol=0, atol=0)
    with pytest.raises(PromptError, match="do not sum to 0"):
        encoder.encode_blend("red circle:1, blue square:-1")


def test_huge_weights_are_refused_before_they_reach_the_deprojector(encoder) -> None:
    for prompt in ("red circle:1e30", "red circle:1e39", "red circle:-101"):
        with pytest.raises(PromptError, match=r"outside \[-100, 100\]"):
            encoder.encode_prompt(prompt)
    with pytest.raises(PromptError, match=r"outside \[-100, 100\]"):
        ImagePart("scene.png", 1e30)
    # At the bound every architecture's states stay finite.
    assert torch.isfinite(encoder.encode_prompt("red circle:100, blue square:-100")).all()


def test_non_finite_states_are_an_error_not_a_black_picture(encoder) -> None:
    with pytest.raises(PromptError, match="its pooled embedding is not finite"):
        encoder.deproject(torch.full((1, encoder.clip.hidden_size), float("inf")))

    class Overflowing(torch.nn.Module):  # what a deprojector far outside its range returns
        null = encoder.deprojector.null

        def check_base(self, *args) -> None:
            pass

        def generate(self, embeds: torch.Tensor) -> torch.Tensor:
            return torch.full((len(embeds), 77, embeds.shape[-1]), float("nan"))

    with pytest.raises(PromptError, match="the deprojector's states are not finite"):
        encoder.with_deprojector(Overflowing()).encode_prompt("red circle")
    from pipeline.config.params import RenderParams
    from pipeline.sampling.sd import GenerationError, generate_images

    nan = torch.full((1, 77, encoder.clip.hidden_size), float("nan"))
    with pytest.raises(GenerationError, match="prompt_embeds contain NaN"):
        generate_images(None, nan, nan, RenderParams())


def test_negative_prompt_deprojected_or_ordinary(encoder) -> None:
    torch.testing.assert_close(
        encoder.encode_negative("black background", deproject=False),
        encode_texts(encoder.clip, ["black background"]).hidden,
    )
    torch.testing.assert_close(
        encoder.encode_negative(""), encoder.deprojector.generate(encoder.deprojector.null[None])
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["red:abc"], "character 5 'a' is not part of a number"),
        (["x", "--image", "missing.png"], "image prompt 'missing.png': no such file"),
        (["x", "--image", "scene.png", "--no-deprojector"], "--image needs a deprojector"),
        (["x", "--image", "scene.png", "--no-combine"], "--image works on combined parts"),
        (["x", "--t", "0.3"], "--t, --mix-image and --slerp need --mix"),
        (["x", "--mix", "y", "--t", "1.5"], "--t must lie in [0, 1], got 1.5"),
        (["x:2", "--no-deprojector"], "the weight of 'x' needs a deprojector"),
        (["x, y", "--blend", "--no-deprojector"], "--blend averages the CLIP states"),
        (["x", "--blend", "--image", "scene.png"], "text parts: drop --image"),
        (["x, y", "--blend", "--no-combine"], "drop --no-combine"),
        (["x", "--image", "scene.png", "--gap", "nowhere"], "no modality-gap statistics"),
        (["red circle:1e30"], "the weight 1e+30 is outside [-100, 100]"),
        (["red circle:1e39"], "the weight 1e+39 is outside [-100, 100]"),
    ],
)
def test_cli_errors_are_one_clear_line(project, args: list[str], message: str) -> None:
    result = _cli(project, "encode", *args, "-m", "models/vb", "-o", "e.safetensors")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split())
    assert "Traceback" not in result.output


def test_cli_bad_image_model_and_gap_files_are_one_clear_line(project, tmp_path) -> None:
    import shutil

    (project / "bomb.png").write_bytes(header_only_png(20_000, 10_000))
    shutil.copytree(project / "models" / "vb", project / "models" / "vb-cut")
    weights = project / "models" / "vb-cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    shutil.copytree(project / "data" / "gap", project / "gap-cut")
    (project / "gap-cut" / GAP_FILE).write_bytes(b"\x08\x00\x00")
    for args, message in [
        (["--image", "bomb.png"], "image prompt 'bomb.png': its header claims 200,000,000 pixels"),
        (
            ["-m", "models/vb-cut"],
            "models/vb-cut/model.safetensors: incomplete or corrupt safetensors file",
        ),
        (
            ["--image", "scene.png", "--gap", "gap-cut"],
            "gap-cut/modality_gap.safetensors: incomplete or corrupt safetensors file",
        ),
    ]:
        if "-m" not in args:
            args = [*args, "-m", "models/vb"]
        result = _cli(project, "encode", "x", *args, "-o", "e.safetensors")
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1
        assert message in result.output, result.output


def test_scene_image_has_what_the_prompt_states() -> None:
    image = World.scene_for("red circle blue square white background", 3)
    assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == world.COLORS["white"]  # the background, in a corner


@pytest.mark.slow
def test_readme_python_example_runs_outside_the_repository(tmp_path, monkeypatch) -> None:
    """The README's Python API example, as written, from a directory outside the repository:
    a deprojector saved for the committed world's CLIP (`builtin`) finds its base and its
    modality-gap statistics on its own."""
    from pipeline.base.loaders import load_clip
    from pipeline.config.params import load_params
    from pipeline.data.extraction import compute_constants
    from pipeline.training.loop import record_base, record_sampling
    from pipeline.world.config import CHECKOUT_WORLD_DIR

    if not (CHECKOUT_WORLD_DIR / "sd").is_dir():
        pytest.skip("the committed world is not in this checkout")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = next(
        block.split("```")[0]
        for block in readme.split("```python\n")[1:]
        if "PromptEncoder.from_pretrained" in block
    )
    project = tmp_path / "project"  # stands in for the repository folder
    (project / "models" / "world").mkdir(parents=True)
    (project / "models" / "world" / "sd").symlink_to(CHECKOUT_WORLD_DIR / "sd")
    clip = load_clip("builtin", base_dir=CHECKOUT_WORLD_DIR)
    torch.manual_seed(0)
    model = build_deprojector(
        "vicinity-batch",
        clip.hidden_size,
        clip.projection_size,
        compute_constants(clip),
        vicinity=2,
    ).eval()
    record_base(model, "builtin")
    # as `deprojector train` records them: the repository's render.* settings
    record_sampling(model.config, load_params(Path(__file__).parent.parent / "params.yaml"))
    model.save_pretrained(project / "models" / "vicinity-batch")
    ModalityGap.measure(
        torch.randn(8, clip.projection_size), torch.randn(8, clip.projection_size)
    ).save(project / "models" / "vicinity-batch" / GAP_FILE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    setup = 'project = Path(".")'
    assert setup in example
    scope: dict = {}
    exec(
        compile(example.replace(setup, f"project = Path({str(project)!r})"), "README.md", "exec"),
        scope,
    )
    assert (elsewhere / "weighted.png").is_file() and len(scope["images"]) == 4
    assert scope["settings"]["guidance_scale"] == 2.5  # the world's, not diffusers' 7.5
    assert scope["strip"].shape[0] == 3
    assert scope["encoder"].deprojector.config.base_clip == "builtin"


def test_a_deprojector_refuses_another_clip_of_the_same_width(project, base_dir) -> None:
    from pipeline.models import BaseMismatchError, load_deprojector
    from pipeline.training.loop import record_base

    model = load_deprojector(project / "models" / "vb")
    record_base(model, "builtin")  # in the project: the micro-world's CLIP
    model.config.base_fingerprint = "0" * 64  # as if trained on another CLIP of this width
    model.save_pretrained(project / "other")
    with pytest.raises(BaseMismatchError, match="trained on the base CLIP 'builtin'"):
        PromptEncoder.from_pretrained(project / "other", base_dir=base_dir)
    result = _cli(project, "encode", "red circle", "-m", "other", "-o", "x.safetensors")
    assert result.exit_code == 2 and "not on this one" in result.output


def test_hub_dataset_pairs_read_an_image_and_a_text_column(tmp_path, monkeypatch) -> None:
    """A `datasets` set with an image column and a COCO-style list of captions (here a local
    parquet folder, as load_dataset reads a downloaded hub set)."""
    import datasets

    from pipeline.data.pairs import HubPairs

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "set"
    folder.mkdir()
    images = [Image.new("RGB", (16, 16), color) for color in ("red", "blue")]
    datasets.Dataset.from_dict(
        {"image": images, "caption": [["a red square", "red"], ["a blue square"]]}
    ).cast_column("image", datasets.Image()).to_parquet(str(folder / "train.parquet"))
    pairs = HubPairs(str(folder), "train", "image", "caption")
    assert pairs.captions == ["a red square", "a blue square"]  # the first caption of each
    assert pairs.image(1).mode == "RGB" and pairs.image(1).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(
        ImagePromptError,
        match=r"no column 'text' \(columns: image, caption\); "
        r"set gap.text_column",
    ):
        HubPairs(str(folder), "train", "image", "text")
    with pytest.raises(
        ImagePromptError,
        match=r"row 0, column 'caption' holds list, expected "
        r"an image",
    ):
        HubPairs(str(folder), "train", "caption", "caption").image(0)
