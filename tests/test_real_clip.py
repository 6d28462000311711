"""The real-CLIP path end to end (issue 20): a CLIP shaped like ViT-L/14 (text and projection
768 wide, vision 1024 wide on 224 px in 14 px patches; one layer each, random weights, built
offline) and an SD 1.x pipeline that cross-attends to 768-wide states, with a folder of
image/caption pairs: every stage runs from the CLI, image rows included, and bad paired data
fails naming the file without losing the shards already written."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.world.diffusion import build_unet, save_pipeline
from pipeline.world.vae import build_vae
from tests.test_base_checks import text_config, tiny_tokenizer

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
}
SHAPES = ("square", "circle", "stripe")


def build_bases(folder: Path) -> tuple[Path, Path]:
    """clip/ (both towers, CLIP-L widths) and sd/ (a tiny UNet, 768-wide cross-attention)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text = text_config(
        tokenizer,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=1,
        num_attention_heads=12,
        projection_dim=768,
    ).to_dict()
    vision = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=1,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
    model.save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(folder / "clip")
    from transformers import CLIPTextModel

    save_pipeline(
        folder / "sd",
        build_vae(8, 1, 0),
        build_unet(16, 768, 0),
        CLIPTextModel.from_pretrained(folder / "clip"),
        tokenizer,
    )
    return folder / "clip", folder / "sd"


def write_pairs(folder: Path, count: int) -> None:
    """`count` pictures (a coloured shape on grey, various sizes) with a caption file each."""
    folder.mkdir(parents=True)
    names = list(COLORS)
    for k in range(count):
        color, shape = names[k % len(names)], SHAPES[k % len(SHAPES)]
        image = Image.new("RGB", (48 + 4 * k, 40), (128, 128, 128))
        image.paste(COLORS[color], (8, 8, 30, 30 if shape != "stripe" else 14))
        image.save(folder / f"pair-{k:02d}.png")
        (folder / f"pair-{k:02d}.txt").write_text(f"a {color} {shape} on grey\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("real-clip")
    clip, sd = build_bases(work / "bases")
    write_pairs(work / "pairs", 12)
    captions = [
        f"{size} {color} {shape} on grey"
        for size in ("a small", "a big", "one", "a tiny")
        for color in COLORS
        for shape in SHAPES
    ]  # 48 distinct
    (work / "captions.txt").write_text("\n".join(captions) + "\n")
    params = {
        "base": {"clip": str(clip), "sd": str(sd)},
        "captions": {"source": "captions.txt", "train_size": 30, "test_size": 8},
        "augment": {"split": 0.3, "combine": 0.2, "image": 0.3},
        "extract": {"batch_size": 16, "rows_per_shard": 4},
        "gap": {"source": "pairs", "pairs": 12, "bank": 30, "bridge": "linear"},
        "train": {"epochs": 1, "batch_size": 8},
        "evaluate": {"adherence_prompts": 0, "image_prompts": 0, "combination_pairs": 4},
        "render": {"steps": 2, "height": 16, "width": 16},
        "models": {"vb": {"type": "vicinity-batch", "vicinity": 2, "norm": "layer"}},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def cli(project: Path, *args: str):
    previous = os.getcwd()
    os.chdir(project)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


@pytest.mark.slow
def test_every_stage_runs_with_a_clip_l_shaped_base_and_image_rows(project) -> None:
    for stage in (
        ["base"],
        ["captions"],
        ["gap"],
        ["extract"],
        ["train", "vb"],
        ["evaluate"],
        ["render"],
    ):
        cli(project, *stage)
    gap = json.loads((project / "data" / "gap" / "modality_gap.json").read_text())
    assert gap["computed"] and gap["pairs"] == 12 and gap["bank"] == 30
    assert set(gap["paired_cosine_held_out"]) == {"none", "mean-shift", "linear", "text-projection"}
    meta = json.loads((project / "data" / "shards" / "meta.json").read_text())
    assert meta["hidden_size"] == 768 and meta["projection_size"] == 768
    train, test = meta["splits"]["train"], meta["splits"]["test"]
    # Training: 9 of its 30 rows are images (the steps per epoch stay the same); the test
    # split keeps its 8 caption rows and gains 2 image rows, from other pairs.
    assert train["rows"] == 30 and train["kinds"]["image"] == 9
    assert test["rows"] == 10 and test["kinds"]["image"] == 2
    assert train["image_pairs"] == {"wanted": 9, "used": 9, "bridge": "linear", "source": "pairs"}
    metrics = json.loads((project / "reports" / "metrics" / "vb.json").read_text())
    assert metrics["image_rows"]["rows"] == 2
    assert -1 <= metrics["image_rows"]["autoregressive"]["cosine_masked"] <= 1
    assert (project / "reports" / "grid_single.png").is_file()
    assert "cat maid" in (project / "reports" / "report.md").read_text()  # article prompts
    # The trained folder carries the bridge it was trained with, for image prompts.
    encoded = cli(
        project,
        "encode",
        "--model",
        "models/vb",
        "",
        "--image",
        "pairs/pair-00.png",
        "--out",
        "image.safetensors",
    )
    assert (project / "image.safetensors").is_file(), encoded.output


@pytest.mark.slow  # works on the shards the test above extracted
def test_bad_paired_data_names_the_file_and_keeps_what_was_extracted(project) -> None:
    shards = project / "data" / "shards"
    assert sorted(shards.glob("*/shard-*.arrow"))
    bad = project / "pairs" / "pair-05.png"
    kept = bad.read_bytes()
    Image.new("RGBA", (30, 30)).save(bad)  # an alpha channel: refused, not guessed
    previous = os.getcwd()
    os.chdir(project)
    try:
        result = CliRunner().invoke(app, ["extract"])
    finally:
        os.chdir(previous)
    assert result.exit_code != 0
    assert "paired image '" in result.output
    assert "pair-05.png' has mode 'RGBA' (an alpha channel)" in result.output
    written = {p: p.read_bytes() for p in shards.glob("*/shard-*.arrow")}
    assert written  # the shards that do not hold that image are still there
    bad.write_bytes(kept)
    cli(project, "extract")
    for path, data in written.items():
        assert path.read_bytes() == data, path
    (project / "pairs" / "pair-05.txt").unlink()
    os.chdir(project)
    try:
        missing = CliRunner().invoke(app, ["extract"])
    finally:
        os.chdir(previous)
    assert missing.exit_code != 0 and "pair-05.png: no caption file pair-05.txt" in missing.output


# --- the real-model block of docs/experiments.md, as written --------------------------------

EXPERIMENTS = Path(__file__).parent.parent / "docs" / "experiments.md"


def block_settings() -> dict[str, object]:
    """The `-S key=value` settings of docs/experiments.md's real-model block (values read as
    YAML, as `dvc exp run -S` reads them)."""
    text = EXPERIMENTS.read_text()
    block = next(
        b.split("```")[0]
        for b in text.split("```bash\n")[1:]
        if "-S base.clip=openai/clip-vit-large-patch14" in b and "captions.source" in b
    )
    words = shlex.split(block.replace("\\\n", " "))
    values = [words[k + 1] for k, word in enumerate(words) if word == "-S"]
    return {key: yaml.safe_load(value) for key, value in (v.split("=", 1) for v in values)}


def set_key(params: dict, key: str, value: object) -> None:
    *parents, last = key.split(".")
    node = params
    for parent in parents:
        node = node[parent]
    assert last in node, f"{key}: not in params.yaml"
    node[last] = value


@pytest.fixture(scope="module")
def block_project(tmp_path_factory) -> Path:
    """The repository's params.yaml with the block's settings, in a project whose base folders
    are the offline form's `clip-l` and `sd15` (CLIP-L-shaped, random weights) and whose
    gap.source is empty, as this repository's data/gap-pairs/. Only what a CPU cannot do as
    written is scaled: the hub captions become a local parquet file of the same column, the
    device the CPU, the sizes and steps small, and two of the runs: the block's settings, not
    the architectures, are this test's subject."""
    work = tmp_path_factory.mktemp("block")
    build_bases(work)
    (work / "clip").rename(work / "clip-l")
    (work / "sd").rename(work / "sd15")
    (work / "data" / "gap-pairs").mkdir(parents=True)
    (work / "data" / "gap-pairs" / "README.md").write_text("pairs go here\n")
    settings = block_settings()
    assert settings["captions.source"] == "Gustavosta/Stable-Diffusion-Prompts"
    assert settings["render.height"] == 512 and settings["render.guidance_scale"] == 7.5
    column = settings["captions.column"]
    prompts = [
        f"a {size} {color} {shape} on grey, digital art"
        for size in ("small", "big", "tiny", "huge")
        for color in COLORS
        for shape in SHAPES
    ]
    pd.DataFrame({column: prompts}).to_parquet(work / "prompts.parquet")
    params = yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text())
    settings |= {"base.clip": "clip-l", "base.sd": "sd15", "captions.source": "prompts.parquet"}
    scaled = {
        "captions.train_size": 30,
        "captions.test_size": 8,
        "extract.batch_size": 16,
        "extract.rows_per_shard": 16,
        "train.epochs": 1,
        "train.batch_size": 10,
        "evaluate.adherence_prompts": 2,
        "evaluate.combination_pairs": 4,
        "render.height": 16,
        "render.width": 16,
        "render.steps": 2,
    }
    for key, value in {**settings, **scaled}.items():
        set_key(params, key, "cpu" if value == "cuda" else value)
    params["models"] = {name: params["models"][name] for name in ("vicinity-batch", "vt-rollout")}
    params["render"]["showcase_model"] = "vt-rollout"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


@pytest.mark.slow
def test_the_real_model_block_runs_as_written_on_clip_l_shaped_folders(block_project) -> None:
    for stage in (["base"], ["captions"], ["gap"]):
        cli(block_project, *stage)
    extracted = cli(block_project, "extract")
    # No paired data: said once, and the caption rows are extracted.
    assert extracted.output.count("warning: augment.image = 0.3, but gap.source") == 1
    meta = json.loads((block_project / "data" / "shards" / "meta.json").read_text())
    assert "no image rows" in meta["no_image_rows"]
    assert meta["hidden_size"] == 768 and meta["clip_skip"] == 0
    assert meta["splits"]["train"]["rows"] == 30 and meta["splits"]["train"]["kinds"]["image"] == 0
    params = yaml.safe_load((block_project / "params.yaml").read_text())
    for name in params["models"]:
        cli(block_project, "train", name)
    cli(block_project, "evaluate")
    cli(block_project, "render")
    assert (block_project / "reports" / "grid_single.png").is_file()
    assert "cat maid" in (block_project / "reports" / "report.md").read_text()
    adherence = json.loads((block_project / "reports" / "metrics" / "adherence.json").read_text())
    assert {"reference", *params["models"]} <= set(adherence["single"])  # and the baselines
